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
    query: Tensor, key: Tensor, value: Tensor, image: slice, scale: float, image_q: slice | None = None
) -> Tensor:
    """Joint attention with the image block replaced by the identity (diffusers' SD3 PAG).

    Image queries attend only to their own image key and to every text key; text queries attend to
    everything as usual. Computed from [image query, text keys] logits and one self logit per query,
    merged exactly by log-sum-exp, so no N x N matrix or mask is built. Inputs [B, H, S, D].
    """
    image_q = (
        image if image_q is None else image_q
    )  # the image queries, where they sit elsewhere than its keys
    n, device = query.shape[2], query.device
    text_q = torch.cat([torch.arange(0, image_q.start), torch.arange(image_q.stop, n)]).to(device)
    text = torch.cat([torch.arange(0, image.start), torch.arange(image.stop, key.shape[2])]).to(device)
    full = query.new_empty(query.shape[:3] + (value.shape[-1],))
    if len(text_q):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.index_select(2, text_q), key, value, scale=scale
        )
        full.index_copy_(2, text_q, out)
    acc = torch.promote_types(query.dtype, torch.float32)  # fp16/bf16 logits in fp32
    qi = query[:, :, image_q].to(acc)
    ki, vi = (x[:, :, image].to(acc) for x in (key, value))
    kt, vt = (x.index_select(2, text).to(acc) for x in (key, value))
    text_logits = (qi @ kt.transpose(-1, -2)) * scale  # [B, H, N_image, T]
    own = (qi * ki).sum(-1, keepdim=True) * scale  # [B, H, N_image, 1]
    text_lse = text_logits.logsumexp(-1, keepdim=True)
    text_out = text_logits.softmax(-1) @ vt
    # softmax over [own, text]: weight of the own key = sigmoid(own - lse(text))
    full[:, :, image_q] = torch.lerp(text_out, vi, torch.sigmoid(own - text_lse)).to(full.dtype)
    return full


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
