"""Head-level perturbation math against explicit attention matrices."""

from __future__ import annotations

import pytest
import torch

from attnctl.processors.softpag_math import (
    fold_into_cond,
    guidance_scale_at,
    image_scope_attention,
    perturbed_output,
)


def _qkv(b=2, h=4, s=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_u_zero_is_bit_identical_and_u_one_is_value_passthrough():
    q, k, v = _qkv()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(perturbed_output(out, v, [1, 3], 0.0, "identity"), out)
    p = perturbed_output(out, v, [1, 3], 1.0, "identity")
    assert torch.equal(p[:, [1, 3]], v[:, [1, 3]])
    assert torch.equal(p[:, [0, 2]], out[:, [0, 2]])  # non-selected heads bit-identical
    assert torch.equal(perturbed_output(out, v, None, 1.0, "identity"), v)


@pytest.mark.parametrize("target", ["identity", "uniform"])
def test_soft_interpolation_equals_the_interpolated_attention_map(target):
    q, k, v = _qkv()
    probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    out = probs @ v
    s = q.shape[2]
    goal = torch.eye(s, dtype=q.dtype) if target == "identity" else torch.full((s, s), 1 / s, dtype=q.dtype)
    u = 0.3
    expected = ((1 - u) * probs + u * goal) @ v
    got = perturbed_output(out, v, [0, 2], u, target)
    torch.testing.assert_close(got[:, [0, 2]], expected[:, [0, 2]], rtol=0, atol=1e-12)
    assert torch.equal(got[:, [1, 3]], out[:, [1, 3]])


def test_identity_needs_self_attention_shapes_and_known_targets():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="as many keys as queries"):
        perturbed_output(q, v[:, :, :5], None, 1.0, "identity")
    with pytest.raises(ValueError, match="target='seg'"):
        perturbed_output(q, v, None, 1.0, "seg")


@pytest.mark.parametrize("image", [slice(0, 9), slice(3, 12)])  # SD3: [image; text], FLUX: [text; image]
def test_image_scope_equals_diffusers_masked_attention(image):
    q, k, v = _qkv(s=12)
    mask = torch.zeros(12, 12, dtype=q.dtype)
    block = torch.full((image.stop - image.start,) * 2, float("-inf"), dtype=q.dtype).fill_diagonal_(0)
    mask[image, image] = block
    scale = 0.3
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(image_scope_attention(q, k, v, image, scale), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("image", [slice(0, 9), slice(3, 12)])
def test_image_scope_takes_the_text_queries_from_a_given_plain_output(image):
    q, k, v = _qkv(s=12)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    given = image_scope_attention(q, k, v, image, 0.3, plain=plain)
    text = [i for i in range(12) if not image.start <= i < image.stop]
    assert torch.equal(given[:, :, text], plain[:, :, text])
    computed = image_scope_attention(q, k, v, image, 0.3)
    assert torch.equal(given[:, :, image], computed[:, :, image])


def test_fold_makes_the_cfg_formula_perturbation_guided():
    g = torch.Generator().manual_seed(1)
    eu, ec, ep = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    w, s = 7.5, 3.0
    folded = fold_into_cond(ec, ep, s, w)
    torch.testing.assert_close(eu + w * (folded - eu), eu + w * (ec - eu) + s * (ec - ep))
    torch.testing.assert_close(fold_into_cond(ec, ep, s, None), ec + s * (ec - ep))


def test_adaptive_scale_schedule():
    assert guidance_scale_at(3.0, 0.0, 10) == 3.0
    assert guidance_scale_at(3.0, 0.01, 900) == pytest.approx(2.0)
    assert guidance_scale_at(3.0, 0.01, 100) == 0.0
