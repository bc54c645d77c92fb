"""Attention Regulation math: the checks of specs/attention-regulation.md that pure tensors can show."""

from __future__ import annotations

import math

import pytest
import torch

from attnctl.processors.regulation_math import (
    RegulationState,
    add_target_bias,
    gaussian_basis,
    regulate_logits,
    regulation_loss,
    regulation_supported,
)

SOT, EOT = 0, 7
TARGETS = [2, 4]
DOMINANT = 5


def synthetic_logits(
    rows: int = 4, height: int = 16, width: int = 16, tokens: int = 10, seed: int = 0
) -> torch.Tensor:
    """Random logits where one non-target token dominates every pixel (the case AR fixes)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, height * width, tokens, generator=g)
    logits[..., DOMINANT] += 4.0
    return logits


def regulate(logits: torch.Tensor, state: RegulationState | None = None, **kwargs):
    height = kwargs.pop("height", 16)
    width = kwargs.pop("width", 16)
    return regulate_logits(
        logits,
        TARGETS,
        restore_columns=[SOT, EOT],
        height=height,
        width=width,
        state=state if state is not None else RegulationState(seed=0),
        **kwargs,
    )


@pytest.mark.parametrize("side, sigma", [(16, 1), (32, 2), (64, 4)])
def test_basis_has_49_bumps_with_reference_centres_and_sigma(side: int, sigma: int) -> None:
    basis = gaussian_basis(side, side)
    assert basis.shape == (49, side, side)
    centres = [divmod(int(b.argmax()), side) for b in basis]
    grid = list(range(2 * sigma, side, 2 * sigma))
    assert centres == [(y, x) for y in grid for x in grid]
    for b, (y, x) in zip(basis, centres, strict=True):
        assert b[y, x] == pytest.approx(1.0)
        # exp(-d²/(2σ²)) at distance σ along either axis.
        assert b[y, x + sigma] == pytest.approx(math.exp(-0.5), rel=1e-6)
        assert b[y + sigma, x] == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_non_square_basis_uses_shorter_side_sigma_and_per_axis_grid() -> None:
    basis = gaussian_basis(16, 24)  # σ = 1: rows 2..14 (7), columns 2..22 (11)
    assert basis.shape == (77, 16, 24)
    first, last = basis[0], basis[-1]
    assert divmod(int(first.argmax()), 24) == (2, 2)
    assert divmod(int(last.argmax()), 24) == (14, 22)
    assert first[2, 3] == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_eight_pixel_maps_get_sigma_one_and_smaller_maps_are_unsupported() -> None:
    assert regulation_supported(8, 8) and regulation_supported(8, 32) and regulation_supported(16, 40)
    basis = gaussian_basis(8, 8)  # σ = max(1, 8 // 16) = 1: centres 2, 4, 6 per axis
    assert basis.shape == (9, 8, 8)
    assert [divmod(int(b.argmax()), 8) for b in basis] == [(y, x) for y in (2, 4, 6) for x in (2, 4, 6)]
    assert basis[0][2, 3] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert not regulation_supported(4, 4) and not regulation_supported(4, 32)
    with pytest.raises(ValueError, match="at least 8"):
        gaussian_basis(4, 4)
    with pytest.raises(ValueError, match="at least 8"):
        regulate(torch.zeros(2, 16, 10), height=4, width=4)


def test_loss_matches_formula() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 256, 2, generator=g)
    weights = torch.rand(3, 49, 2, generator=g)
    tau = min(1.0, 0.2 * 2)
    expected = (
        ((torch.quantile(probs, 0.9, dim=1) - 0.9) ** 2).mean()
        + 80 * ((probs.mean(1) - tau / 2) ** 2).mean()
        + 0.09 * (weights**2).mean()
    )
    assert regulation_loss(probs, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_falls_and_keep_best_never_rises() -> None:
    _, info = regulate(synthetic_logits())
    assert info.losses.shape == (20,)
    assert torch.all(info.best_losses[1:] <= info.best_losses[:-1])
    assert info.best_losses[-1] < 0.5 * info.losses[0]
    assert info.losses[info.best_index] == info.best_losses[-1]


def test_targets_move_towards_mean_02_and_q90_09() -> None:
    logits = synthetic_logits()
    probs, _ = regulate(logits)
    before = logits.softmax(-1)[..., TARGETS]
    after = probs[..., TARGETS]
    mean_before, mean_after = before.mean(1).mean(), after.mean(1).mean()
    q_before = torch.quantile(before, 0.9, dim=1).mean()
    q_after = torch.quantile(after, 0.9, dim=1).mean()
    assert abs(mean_after - 0.2) < 0.5 * abs(mean_before - 0.2)
    assert abs(q_after - 0.9) < 0.7 * abs(q_before - 0.9)


def test_start_and_end_columns_keep_unedited_probabilities() -> None:
    logits = synthetic_logits()
    probs, _ = regulate(logits)
    unedited = logits.softmax(-1)
    assert torch.equal(probs[..., [SOT, EOT]], unedited[..., [SOT, EOT]])
    # The other columns come from the edited softmax, so rows no longer sum to 1.
    assert not torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]))
    others = [c for c in range(10) if c not in (SOT, EOT)]
    assert not torch.allclose(probs[..., others], unedited[..., others])


def test_bias_touches_target_columns_only() -> None:
    logits = synthetic_logits()
    _, info = regulate(logits)
    edited = add_target_bias(logits, TARGETS, info.bias)
    others = [c for c in range(10) if c not in TARGETS]
    assert torch.equal(edited[..., others], logits[..., others])
    assert torch.equal(edited[..., TARGETS], logits[..., TARGETS] + info.bias)
    # Rebuilding the probabilities from the bias gives the returned result.
    probs, _ = regulate(logits)
    rebuilt = edited.softmax(-1)
    rebuilt[..., [SOT, EOT]] = logits.softmax(-1)[..., [SOT, EOT]]
    assert torch.allclose(probs, rebuilt)


def test_bias_is_row_major_over_the_map() -> None:
    # With one iteration the kept bias is Σ_c w0·g_c; on a non-square map its flat H*W axis must
    # read back as [height, width] row-major (flat index y * width + x).
    height, width = 16, 32
    state = RegulationState(seed=0)
    logits = torch.zeros(1, height * width, 3)
    _, info = regulate_logits(
        logits, [1], restore_columns=[0, 2], height=height, width=width, state=state, steps=1
    )
    basis = gaussian_basis(height, width)
    w0 = torch.rand(1, basis.shape[0], 1, generator=torch.Generator().manual_seed(0))
    image = (w0[0, :, 0, None, None] * basis).sum(0)  # [height, width]
    assert torch.allclose(info.raw_best_bias[0, :, 0].reshape(height, width), image, atol=1e-6)
    assert not torch.allclose(info.raw_best_bias[0, :, 0].reshape(width, height).T, image)


@pytest.mark.parametrize(
    "rows, height, width, targets",
    [(2, 16, 16, [2, 4]), (3, 16, 24, [1, 3, 6]), (1, 32, 16, [4])],
)
def test_matches_autograd_full_softmax_implementation(rows, height, width, targets) -> None:
    # The hand-written gradient and the log-sum-exp shortcut over non-target columns must equal
    # plain autograd through a full softmax and torch.quantile-style interpolation.
    logits = synthetic_logits(rows=rows, height=height, width=width)
    probs, info = regulate_logits(
        logits, targets, restore_columns=[SOT, EOT], height=height, width=width,
        state=RegulationState(seed=0), steps=5,
    )  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    basis = gaussian_basis(height, width).reshape(-1, height * width)
    w = torch.rand(rows, basis.shape[0], len(targets), generator=gen).requires_grad_(True)
    init_bias = torch.einsum("rck,ci->rik", w.detach(), basis)
    best, best_bias = float("inf"), None
    for _ in range(5):
        bias = torch.einsum("rck,ci->rik", w, basis)
        p = add_target_bias(logits, targets, bias).softmax(-1)
        loss = regulation_loss(p[..., targets], w)
        if loss.item() < best:
            best, best_bias = loss.item(), bias.detach()
        (grad,) = torch.autograd.grad(loss, [w])
        w = (w - rows * 100.0 * grad).detach().requires_grad_(True)
    expected = add_target_bias(logits, targets, 0.25 * init_bias + 0.75 * best_bias).softmax(-1)
    expected[..., [SOT, EOT]] = logits.softmax(-1)[..., [SOT, EOT]]
    assert info.best_losses[-1].item() == pytest.approx(best, rel=1e-5)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_temporal_smoothing_uses_previous_raw_best_and_decay() -> None:
    state = RegulationState(seed=0)
    first_logits, second_logits = synthetic_logits(seed=0), synthetic_logits(seed=1)
    _, first = regulate(first_logits, state)
    assert state.step == 1 and torch.equal(state.prev_bias, first.raw_best_bias)
    _, second = regulate(second_logits, state)
    expected = (0.25 * first.raw_best_bias + 0.75 * second.raw_best_bias) * 0.99**1
    assert torch.allclose(second.bias, expected)
    # The stored bias is the raw best, not the smoothed one.
    assert torch.equal(state.prev_bias, second.raw_best_bias)
    assert state.step == 2


def test_first_step_smooths_with_initial_random_bias() -> None:
    state = RegulationState(seed=3)
    _, info = regulate(synthetic_logits(), state)
    w0 = torch.rand(4, 49, 2, generator=torch.Generator().manual_seed(3))
    init = torch.einsum("rck,ci->rik", w0, gaussian_basis(16, 16).reshape(49, -1))
    assert torch.allclose(info.bias, 0.25 * init + 0.75 * info.raw_best_bias)


def test_decay_uses_state_step() -> None:
    logits = synthetic_logits()
    fresh = RegulationState(seed=0)
    late = RegulationState(seed=0)
    late.step = 10
    _, a = regulate(logits, fresh)
    _, b = regulate(logits, late)
    assert torch.allclose(b.bias, a.bias * 0.99**10)


def test_seeded_and_reset_is_reproducible() -> None:
    logits = synthetic_logits()
    state = RegulationState(seed=7)
    p1, _ = regulate(logits, state)
    state.reset()
    p2, _ = regulate(logits, state)
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_optimised_in_fp32_returned_in_input_dtype(dtype: torch.dtype) -> None:
    logits = synthetic_logits().to(dtype)
    probs, info = regulate(logits)
    assert probs.dtype == dtype
    assert info.losses.dtype == torch.float32 and info.bias.dtype == torch.float32
    # Same result as optimising the fp32 copy of the same (rounded) logits.
    reference, ref_info = regulate(logits.float())
    assert torch.equal(info.losses, ref_info.losses)
    assert torch.equal(probs, reference.to(dtype))


def test_works_under_no_grad_and_inference_mode() -> None:
    logits = synthetic_logits()
    expected, _ = regulate(logits)
    with torch.no_grad():
        a, _ = regulate(logits)
    with torch.inference_mode():
        b, _ = regulate(logits.clone())
    assert torch.equal(a, expected) and torch.equal(b, expected)


def test_input_is_not_modified_and_gets_no_grad() -> None:
    logits = synthetic_logits().requires_grad_(True)
    before = logits.detach().clone()
    probs, _ = regulate(logits)
    assert torch.equal(logits.detach(), before)
    assert not probs.requires_grad


def test_state_shape_mismatch_and_bad_columns_raise() -> None:
    state = RegulationState(seed=0)
    regulate(synthetic_logits(rows=4), state)
    with pytest.raises(ValueError, match="prev_bias"):
        regulate(synthetic_logits(rows=2), state)
    with pytest.raises(ValueError, match="overlap"):
        regulate_logits(
            synthetic_logits(),
            [0, 2],
            restore_columns=[0],
            height=16,
            width=16,
            state=RegulationState(),
        )
    with pytest.raises(ValueError, match="out of range"):
        regulate_logits(
            synthetic_logits(),
            [12],
            restore_columns=[0],
            height=16,
            width=16,
            state=RegulationState(),
        )
