"""The math of head-level perturbation guidance (SoftPAG, PAG), free of any model or pipeline.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (NeurIPS 2025) and
Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (ECCV 2024).
Per selected head the attention map is interpolated toward a target, A' = (1 - u)·A + u·A_target,
which on the output is O' = (1 - u)·O + u·A_target·V: the identity target gives A_target·V = V
(value passthrough, no N x N matrix), the uniform target gives the mean of V over the keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TARGETS = ("identity", "uniform")


def perturbed_output(
    out: Tensor, value: Tensor, heads: Sequence[int] | None, u: float, target: str
) -> Tensor:
    """O' = (1 - u)·O + u·A_target·V for the given heads (None: all); the other heads are untouched.

    `out` is the attention output [B, H, Sq, D] and `value` the values [B, H, Sk, D] of the rows to
    perturb. The identity target needs Sq == Sk (self or joint attention: each query's own value).
    At u = 1 the result is exactly the target's output (the caller may then skip the attention).
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {list(TARGETS)}")
    idx = slice(None) if heads is None else torch.as_tensor(list(heads), device=out.device, dtype=torch.long)
    v = value[:, idx]
    if target == "identity":
        if value.shape[2] != out.shape[2]:
            raise ValueError(
                f"the identity target needs as many keys as queries, got {value.shape[2]} keys and {out.shape[2]} queries"
            )
        goal = v
    else:
        goal = v.mean(dim=2, keepdim=True).expand(-1, -1, out.shape[2], -1)
    mixed = goal.to(out.dtype) if u == 1 else torch.lerp(out[:, idx], goal.to(out.dtype), u)
    result = out.clone()
    result[:, idx] = mixed
    return result


def image_scope_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    image: slice,
    scale: float,
    image_q: slice | None = None,
    plain: Tensor | None = None,
) -> Tensor:
    """Joint attention with the image block replaced by the identity (diffusers' SD3 PAG).

    Image queries attend only to their own image key and to every text key; text queries attend to
    everything as usual. Computed from [image query, text keys] logits and one self logit per query,
    merged exactly by log-sum-exp, so no N x N matrix or mask is built. Inputs [B, H, S, D].
    plain: the ordinary attention output of these q, k, v [B, H, Sq, D] where the caller has it
    already: the text queries' output is taken from it instead of computed.
    """
    image_q = image if image_q is None else image_q  # image queries sitting elsewhere than its keys
    n = query.shape[2]
    text_q, text = _others(image_q, n, query.device), _others(image, key.shape[2], key.device)
    acc = torch.promote_types(query.dtype, torch.float32)  # fp16/bf16 logits in fp32
    qi = _as(query[:, :, image_q], acc)
    ki, vi = (_as(x[:, :, image], acc) for x in (key, value))
    kt, vt = (_as(_take(x, text), acc) for x in (key, value))
    text_logits = _bmm(qi, kt.transpose(-1, -2)) * scale  # [B, H, N_image, T]
    own = (qi * ki).sum(-1, keepdim=True) * scale  # [B, H, N_image, 1]
    text_lse = text_logits.logsumexp(-1, keepdim=True)
    text_out = _bmm(text_logits.softmax(-1), vt)
    # softmax over [own, text]: weight of the own key = sigmoid(own - lse(text))
    image_out = _as(torch.lerp(text_out, vi, torch.sigmoid(own - text_lse)), query.dtype)
    if isinstance(text_q, slice) and text_q.start == text_q.stop:  # no text queries
        return image_out
    if plain is not None:
        text_out = _take(plain, text_q)
    else:
        text_out = torch.nn.functional.scaled_dot_product_attention(
            _take(query, text_q), key, value, scale=scale
        )
    if isinstance(text_q, slice):  # the text queries before or after the image queries
        parts = (text_out, image_out) if text_q.start < image_q.start else (image_out, text_out)
        return cat_tokens_last(parts, dim=2)
    full = query.new_empty(query.shape[:3] + (value.shape[-1],))
    full.index_copy_(2, text_q, text_out)
    full[:, :, image_q] = image_out
    return full


def cat_tokens_last(parts: Sequence[Tensor], dim: int) -> Tensor:
    """`torch.cat(parts, dim)` of [B, H, S, D] tensors (dim 0 or 2), laid out in memory as
    [B, S, H, D], as SDPA returns its output: the processor's transpose(1, 2).reshape(B, S, H * D)
    that follows is then a view, not another copy. The same values as `torch.cat`."""
    return torch.cat([p.transpose(1, 2) for p in parts], dim={0: 0, 2: 1}[dim]).transpose(1, 2)


def _others(block: slice, n: int, device: torch.device) -> slice | Tensor:
    """The positions of [0, n) outside `block`: a slice where they are one run, else an index."""
    if block.start == 0:
        return slice(block.stop, n)
    if block.stop == n:
        return slice(0, block.start)
    return torch.cat([torch.arange(0, block.start), torch.arange(block.stop, n)]).to(device)


def _take(x: Tensor, positions: slice | Tensor) -> Tensor:
    """`x` at the given sequence positions (dim 2)."""
    return x[:, :, positions] if isinstance(positions, slice) else x.index_select(2, positions)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for [..., n, k] and [..., k, m] of the same leading dims: the batched product matmul
    computes for them (the same values), without its broadcasting steps around it."""
    if a.shape[:-2] != b.shape[:-2]:
        return a @ b
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], *out.shape[-2:])


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def guidance_scale_at(scale: float, adaptive_scale: float, timestep: float) -> float:
    """s_t = max(0, s - adaptive·(1000 - t)) (diffusers' PAG schedule); s when adaptive is 0."""
    if adaptive_scale == 0:
        return scale
    return max(0.0, scale - adaptive_scale * (1000 - float(timestep)))


def fold_into_cond(cond: Tensor, perturbed: Tensor, scale: float, cfg_scale: float | None) -> Tensor:
    """The conditional prediction that makes the pipeline's own guidance formula perturbation-guided.

    With CFG (cfg_scale w), ε_u + w·(c' - ε_u) = ε_u + w·(ε_c - ε_u) + s·(ε_c - ε_p) for
    c' = ε_c + (s / w)·(ε_c - ε_p); without CFG (None: the pipeline uses ε_c as it is),
    c' = ε_c + s·(ε_c - ε_p). Works alike for noise and flow (velocity) predictions.
    """
    factor = scale if cfg_scale is None else scale / cfg_scale
    return cond + factor * (cond - perturbed)
