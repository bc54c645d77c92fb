"""A&E / A-STAR math: the checks of specs/astar-and-excite.md that pure tensors can show."""

from __future__ import annotations

import math

import pytest
import torch

from attnctl.processors.guidance_math import (
    REFINEMENT_THRESHOLDS,
    astar_loss,
    binarize,
    excite_loss,
    gaussian_smooth,
    latent_step,
    normalize_concept_maps,
    refinement_threshold,
    retention_loss,
    segregation_loss,
    smoothing_kernel,
    step_sizes,
)


def random_maps(k: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(k, h, w, generator=torch.Generator().manual_seed(seed))


def test_smoothing_kernel_reference_weights() -> None:
    kernel = smoothing_kernel()
    assert kernel.sum().item() == pytest.approx(1.0)
    assert kernel[0, 0].item() == pytest.approx(0.0449, abs=5e-5)
    assert kernel[0, 1].item() == pytest.approx(0.1221, abs=5e-5)
    assert kernel[1, 1].item() == pytest.approx(0.3319, abs=5e-5)
    assert torch.equal(kernel, kernel.T) and torch.equal(kernel, kernel.flip(0))


def test_smoothing_uses_reflect_padding() -> None:
    # An impulse one pixel in from the corner: reflect padding (edge not repeated) mirrors it
    # onto the three padded neighbours of the corner; zero or replicate padding would not.
    impulse = torch.zeros(1, 5, 5)
    impulse[0, 1, 1] = 1.0
    out = gaussian_smooth(impulse)[0]
    k = smoothing_kernel()
    assert out[1, 1].item() == pytest.approx(k[1, 1].item())
    assert out[0, 0].item() == pytest.approx(4 * k[0, 0].item())
    assert out[0, 1].item() == pytest.approx(2 * k[0, 1].item())
    assert out[2, 2].item() == pytest.approx(k[0, 0].item())
    # A constant map stays constant.
    assert torch.allclose(gaussian_smooth(torch.full((2, 4, 6), 0.3)), torch.full((2, 4, 6), 0.3))


def test_normalisation_drops_special_tokens_and_softmaxes_times_100() -> None:
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4, 4, 8, generator=g)
    text = [1, 2, 3, 4]  # 0 = start-of-text, 5 = end-of-text, 6-7 padding
    maps = normalize_concept_maps(attn, [[2], [4]], text, smooth=False)
    expected = (attn[..., text] * 100).softmax(-1)
    assert maps.shape == (2, 4, 4)
    assert torch.allclose(maps[0], expected[..., 1]) and torch.allclose(maps[1], expected[..., 3])
    # Start/end/padding columns do not matter.
    attn2 = attn.clone()
    attn2[..., [0, 5, 6, 7]] = 50.0
    assert torch.equal(normalize_concept_maps(attn2, [[2], [4]], text, smooth=False), maps)
    smoothed = normalize_concept_maps(attn, [[2], [4]], text)
    assert torch.allclose(smoothed, gaussian_smooth(maps))


def test_subtoken_groups_reduce() -> None:
    attn = torch.rand(3, 3, 6, generator=torch.Generator().manual_seed(1))
    text = [1, 2, 3, 4]
    p = (attn[..., text] * 100).softmax(-1)
    total = normalize_concept_maps(attn, [[2, 3]], text, smooth=False)[0]
    assert torch.allclose(total, p[..., 1] + p[..., 2])
    mean = normalize_concept_maps(attn, [[2, 3]], text, smooth=False, subtoken_reduce="mean")[0]
    assert torch.allclose(mean, (p[..., 1] + p[..., 2]) / 2)
    peak = normalize_concept_maps(attn, [[2, 3]], text, smooth=False, subtoken_reduce="max")[0]
    assert torch.allclose(peak, torch.maximum(p[..., 1], p[..., 2]))


def test_bad_token_groups_raise() -> None:
    attn = torch.rand(3, 3, 6)
    with pytest.raises(ValueError, match="not in text_positions"):
        normalize_concept_maps(attn, [[0]], [1, 2, 3])
    with pytest.raises(ValueError, match="disjoint"):
        normalize_concept_maps(attn, [[1, 2], [2]], [1, 2, 3])
    with pytest.raises(ValueError, match="subtoken_reduce"):
        normalize_concept_maps(attn, [[1]], [1, 2, 3], subtoken_reduce="median")  # type: ignore[arg-type]


def test_non_square_orientation_survives() -> None:
    # An 8×12 map (h=8 rows, w=12 columns) arriving as flattened [H*W, T] in row-major order, with
    # token 1 hot in the top-right corner, token 2 along the bottom row, token 3 elsewhere.
    h, w, tokens = 8, 12, 5
    flat = torch.zeros(h * w, tokens)
    for y in range(h):
        for x in range(w):
            hot = 1 if (y < 2 and x >= 9) else 2 if y == h - 1 else 3
            flat[y * w + x, hot] = 1.0
    maps = normalize_concept_maps(flat.reshape(h, w, tokens), [[1], [2]], [1, 2, 3])
    assert maps.shape == (2, h, w)
    assert divmod(int(maps[0].argmax()), w) in {(0, 10), (0, 11)}
    assert maps[0, :2, 9:].mean() > 0.7 and maps[0, 3:].max() < 1e-6 and maps[0, :, :8].max() < 1e-6
    assert maps[1, -1].min() > 0.5 and maps[1, :6].max() < 1e-6


def test_everything_is_fp32_whatever_the_input_dtype() -> None:
    attn = torch.rand(4, 6, 5).to(torch.bfloat16)
    maps = normalize_concept_maps(attn, [[1], [2]], [1, 2, 3])
    assert maps.dtype == torch.float32
    half = maps.half()
    for loss in (
        excite_loss(half),
        segregation_loss(half),
        retention_loss(half, binarize(half)),
        astar_loss(half, None),
    ):
        assert loss.dtype == torch.float32
    assert binarize(half).dtype == torch.float32


def test_excite_loss_values() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 0.9
    maps[1, 2, 3] = 0.3
    maps[2, 0, 0] = 1.2
    assert excite_loss(maps).item() == pytest.approx(0.7)  # worst concept: 1 - 0.3
    maps[1, 2, 3] = 1.0
    assert excite_loss(maps).item() == pytest.approx(0.1)
    maps[0, 1, 1] = 1.0
    assert excite_loss(maps).item() == 0.0  # above 1 clamps at 0


@pytest.mark.parametrize("seed", range(5))
def test_loss_bounds_on_random_maps(seed: int) -> None:
    maps = random_maps(4, seed=seed) ** 3
    for m in range(4):
        for n in range(m + 1, 4):
            term = segregation_loss(maps[[m, n]]).item()
            assert 0.0 <= term <= 0.5
        masks = binarize(random_maps(4, seed=seed + 100))
        term = retention_loss(maps[[m]], masks[[m]]).item()
        assert 0.5 <= term <= 1.0
    assert 0.0 <= segregation_loss(maps).item() <= 0.5 * 6
    assert 2.0 <= retention_loss(maps, binarize(maps)).item() <= 4.0


def test_segregation_disjoint_is_zero_equal_is_half_per_pair() -> None:
    disjoint = torch.zeros(3, 4, 6)
    disjoint[0, :2] = 1.0
    disjoint[1, 2:, :3] = 0.5
    disjoint[2, 2:, 3:] = 0.7
    assert segregation_loss(disjoint).item() == 0.0
    same = random_maps(1).expand(3, -1, -1)
    assert segregation_loss(same).item() == pytest.approx(0.5 * 3)
    assert segregation_loss(random_maps(1)).item() == 0.0  # one concept: no pairs


def test_retention_equal_map_and_mask_is_half() -> None:
    mask = binarize(random_maps(2))
    assert retention_loss(mask, mask).item() == pytest.approx(0.5 * 2)


def test_binarize() -> None:
    maps = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 11.0]]])  # min-max: 0, .1, .2, .3, .4, 1
    assert torch.equal(binarize(maps)[0], torch.tensor([[0.0, 0, 0], [0, 0, 1]]))
    assert torch.equal(binarize(maps, threshold=0.25)[0], torch.tensor([[0.0, 0, 0], [1, 1, 1]]))
    assert binarize(torch.full((1, 2, 2), 0.4)).sum() == 0  # constant map: no region
    grad_maps = maps.clone().requires_grad_(True)
    assert not binarize(grad_maps).requires_grad


def test_astar_loss_without_previous_masks_is_segregation_only() -> None:
    maps = random_maps(3)
    assert torch.equal(astar_loss(maps, None), segregation_loss(maps))
    masks = binarize(random_maps(3, seed=1))
    expected = segregation_loss(maps) + retention_loss(maps, masks)
    assert torch.allclose(astar_loss(maps, masks), expected)


def test_step_sizes_and_refinement_thresholds() -> None:
    sizes = step_sizes(50)
    assert len(sizes) == 50
    assert sizes[0] == pytest.approx(20.0)
    assert sizes[-1] == pytest.approx(20.0 * math.sqrt(0.5))
    assert sizes[25] == pytest.approx(20.0 * math.sqrt(1.0 - 0.5 * 25 / 49))
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    assert step_sizes(1, scale=3.0) == [3.0]
    assert REFINEMENT_THRESHOLDS == {0: 0.05, 10: 0.5, 20: 0.8}
    assert refinement_threshold(10) == 0.5 and refinement_threshold(11) is None
    assert refinement_threshold(3, {3: 0.2}) == 0.2


def test_latent_step_is_minus_alpha_grad() -> None:
    latent = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    latent.requires_grad_(True)
    loss = (latent**2).sum()
    out = latent_step(latent, loss, 0.1)
    assert torch.allclose(out, latent.detach() - 0.1 * 2 * latent.detach())
    assert not out.requires_grad
    half = latent.detach().half().requires_grad_(True)
    out_half = latent_step(half, (half.float() ** 2).sum(), 0.1)
    assert out_half.dtype == torch.float16
    with pytest.raises(ValueError):
        latent_step(latent, torch.tensor(1.0), 0.1)


def _maps_from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Stand-in for a UNet forward: softmax attention of an [h, w, T] learnable tensor."""
    return normalize_concept_maps(latent.softmax(-1), [[1], [2, 3]], [1, 2, 3, 4])


def test_excite_steps_decrease_loss() -> None:
    latent = torch.randn(8, 12, 6, generator=torch.Generator().manual_seed(0))
    latent[..., 5] += 3.0  # a non-concept token dominates
    losses = []
    for _ in range(5):
        latent.requires_grad_(True)
        loss = excite_loss(_maps_from_latent(latent))
        losses.append(loss.item())
        latent = latent_step(latent, loss, 20.0)
    assert losses[-1] < 0.8 * losses[0]


def test_astar_steps_decrease_loss() -> None:
    latent = torch.randn(8, 12, 6, generator=torch.Generator().manual_seed(0))
    masks = binarize(_maps_from_latent(latent))
    losses = []
    for _ in range(5):
        latent.requires_grad_(True)
        loss = astar_loss(_maps_from_latent(latent), masks)
        losses.append(loss.item())
        latent = latent_step(latent, loss, 20.0)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
