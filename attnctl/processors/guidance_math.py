"""Latent-guidance math shared by Attend-and-Excite and A-STAR (pure tensors, fp32).

Chefer et al., "Attend-and-Excite", SIGGRAPH 2023; Agarwal et al., "A-STAR: Test-time Attention
Segregation and Retention for Text-to-image Synthesis", ICCV 2023 (spec: specs/astar-and-excite.md).

Both move the latent along −∇ of a loss on cross-attention maps: z_t ← z_t − α_t·∇_z L.
The sampler-level code (not here) runs a conditional forward with gradients, averages the maps
of one resolution over layers and heads into ``[h, w, tokens]`` (the flattened H*W axis reshaped
row-major: ``[..., H*W, T] -> [..., h, w, T]``), then calls, per guided step::

    maps = normalize_concept_maps(attn, token_groups, text_positions)   # [K, h, w]
    loss = excite_loss(maps)                     # A&E
    loss = astar_loss(maps, prev_masks)          # A-STAR; prev_masks None on the first step
    latent = latent_step(latent, loss, sizes[i]) # sizes = step_sizes(num_inference_steps)

and for A-STAR keeps ``prev_masks = binarize(maps)`` from the last maps of each guided step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# A&E iterative refinement (Chefer et al. 2023, Algorithm 1): at these step indices, while the A&E
# loss is above 1 − threshold, refine the latent with up to REFINEMENT_MAX_ITERS extra gradient steps
# before the step's regular one (the authors' schedule: `AttendAndExcite._more_updates`).
REFINEMENT_THRESHOLDS: dict[int, float] = {0: 0.05, 10: 0.5, 20: 0.8}
REFINEMENT_MAX_ITERS = 20
# A&E: the softmax over prompt tokens runs on maps multiplied by this temperature.
SOFTMAX_SCALE = 100.0
# A&E's smoothing kernel: 3×3, σ = 0.5, with the reference's exp(-((x-μ)/(2σ))²) form.
SMOOTH_KERNEL_SIZE = 3
SMOOTH_SIGMA = 0.5


def normalize_concept_maps(
    attn: Tensor,
    token_groups: Sequence[Sequence[int]],
    text_positions: Sequence[int],
    *,
    smooth: bool = True,
    subtoken_reduce: Literal["sum", "mean", "max"] = "sum",
) -> Tensor:
    """A&E map normalisation (Chefer et al. 2023, Algorithm 1): ``[h, w, T]`` → ``[K, h, w]`` fp32.

    ``attn``: cross-attention probabilities averaged over layers and heads, ``[h, w, T]``.
    ``text_positions``: the columns the softmax runs over: the real prompt tokens (no start/end-of-text,
    no padding), or on SD 1.x the authors' full context (every column between the start token and
    the last one, end-of-text and padding included).
    ``token_groups``: one list of columns per concept (all sub-tokens of the concept's word),
    each a subset of ``text_positions``; groups must be disjoint.

    Keeps those columns, multiplies by 100, softmaxes over them, combines each concept's
    sub-token maps with ``subtoken_reduce`` (default ``sum``: the concept's share of each pixel's
    distribution over prompt tokens, still in [0, 1], so a word split into n pieces is not
    diluted as with ``mean`` nor partly ignored as with ``max``), then smooths each map with the
    3×3 Gaussian using reflect padding.
    """
    if attn.ndim != 3:
        raise ValueError(f"attn must be [h, w, tokens]; got shape {tuple(attn.shape)}")
    positions = [int(p) for p in text_positions]
    index_of = {p: i for i, p in enumerate(positions)}
    if len(index_of) != len(positions):
        raise ValueError(f"text_positions: duplicate columns in {positions}")
    groups = [[int(t) for t in group] for group in token_groups]
    if not groups or any(not group for group in groups):
        raise ValueError(f"token_groups: need at least one non-empty group; got {groups}")
    flat = [t for group in groups for t in group]
    missing = [t for t in flat if t not in index_of]
    if missing:
        raise ValueError(f"token_groups: columns {missing} are not in text_positions {positions}")
    if len(set(flat)) != len(flat):
        raise ValueError(f"token_groups: groups must be disjoint; got {groups}")

    probs = (attn.float()[..., positions] * SOFTMAX_SCALE).softmax(dim=-1)  # [h, w, P]
    maps = []
    for group in groups:
        sub = probs[..., [index_of[t] for t in group]]
        if subtoken_reduce == "sum":
            maps.append(sub.sum(dim=-1))
        elif subtoken_reduce == "mean":
            maps.append(sub.mean(dim=-1))
        elif subtoken_reduce == "max":
            maps.append(sub.amax(dim=-1))
        else:
            raise ValueError(f"subtoken_reduce: {subtoken_reduce!r}; allowed: 'sum', 'mean', 'max'")
    out = torch.stack(maps)  # [K, h, w]
    return gaussian_smooth(out) if smooth else out


def gaussian_smooth(maps: Tensor) -> Tensor:
    """Smooth ``[K, h, w]`` maps with A&E's 3×3 Gaussian (σ = 0.5) and reflect padding, fp32."""
    kernel = _smoothing_kernel_on(maps.device)
    pad = SMOOTH_KERNEL_SIZE // 2
    x = F.pad(maps.float()[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, kernel[None, None])[:, 0]


def smoothing_kernel(device: torch.device | str | None = None) -> Tensor:
    """A&E's normalised 3×3 kernel: outer product of exp(-((x-μ)/(2σ))²), σ = 0.5.

    The reference divides by 2σ (not √2·σ), giving corner .0449, edge .1221, centre .3319.
    """
    x = torch.arange(SMOOTH_KERNEL_SIZE, dtype=torch.float32, device=device)
    mu = (SMOOTH_KERNEL_SIZE - 1) / 2
    g = torch.exp(-(((x - mu) / (2 * SMOOTH_SIGMA)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


@functools.cache
def _smoothing_kernel_on(device: torch.device) -> Tensor:
    """`smoothing_kernel` on `device`, made once: a constant that every guidance update smooths with."""
    return smoothing_kernel(device=device)


def excite_loss(maps: Tensor) -> Tensor:
    """Attend-and-Excite loss (Chefer et al. 2023, Algorithm 1): L = max_k max(0, 1 − max_ij A_k)."""
    peak = maps.float().flatten(1).amax(dim=1)
    return torch.clamp(1.0 - peak, min=0.0).amax()


def segregation_loss(maps: Tensor) -> Tensor:
    """A-STAR attention segregation loss (Agarwal et al. 2023): soft IoU summed over pairs m < n.

    L_seg = Σ_{m<n} Σ_ij min(A^m, A^n) / Σ_ij (A^m + A^n). Each pair's term lies in [0, ½]
    (½ iff the maps are equal); a single concept gives 0.
    """
    a = maps.float().flatten(1)
    m, n = torch.triu_indices(a.shape[0], a.shape[0], offset=1, device=a.device)
    return _soft_overlap(a[m], a[n]).sum()


def retention_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """A-STAR attention retention loss (Agarwal et al. 2023) against the previous step's masks.

    L_ret = Σ_m [1 − Σ_ij min(A^m, B^m) / Σ_ij (A^m + B^m)], ``masks`` = B ``[K, h, w]`` from
    :func:`binarize` (treated as constants). Each concept's term lies in [½, 1].
    """
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} must match maps {tuple(maps.shape)}")
    a = maps.float().flatten(1)
    b = masks.detach().float().flatten(1)
    return (1.0 - _soft_overlap(a, b)).sum()


def binarize(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """High-activation masks ``[K, h, w]`` (fp32 0/1, detached) for A-STAR's retention loss.

    Each map is min-max normalised to [0, 1]; pixels above ``threshold`` (a fraction of the
    normalised max, which is 1) become 1. The paper does not state the rule; this is the spec's
    suggestion. A constant map has no high-activation region and gives an all-zero mask.
    """
    a = maps.detach().float().flatten(1)
    lo = a.amin(dim=1, keepdim=True)
    span = a.amax(dim=1, keepdim=True) - lo
    norm = (a - lo) / span.clamp_min(torch.finfo(torch.float32).tiny)
    return (norm > threshold).float().reshape(maps.shape)


def astar_loss(maps: Tensor, prev_masks: Tensor | None) -> Tensor:
    """A-STAR total loss (Agarwal et al. 2023): L = L_seg + L_ret, unweighted.

    ``prev_masks`` is :func:`binarize` of the previous guided step's maps; on the first guided
    step there is no previous step, so pass None and the retention term is 0.
    """
    loss = segregation_loss(maps)
    if prev_masks is not None:
        loss = loss + retention_loss(maps, prev_masks)
    return loss


def step_sizes(num_steps: int, scale: float = 20.0) -> list[float]:
    """A&E's step-size schedule α_i = scale·sqrt(linspace(1.0, 0.5, num_steps)[i]).

    ``num_steps`` is the number of denoising steps of the whole run (A&E: 50), not the number of
    guided steps; index the list with the denoising step index.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1; got {num_steps}")
    fractions = torch.linspace(1.0, 0.5, num_steps, dtype=torch.float64).tolist()
    return [scale * math.sqrt(f) for f in fractions]


def refinement_threshold(step: int, thresholds: dict[int, float] | None = None) -> float | None:
    """A&E iterative refinement: the threshold T at this step index, or None when none applies.

    At such a step the caller refines while ``excite_loss > 1 − T`` (at most
    :data:`REFINEMENT_MAX_ITERS` extra updates). T is stated for the A&E loss; the A-STAR loss has other
    bounds (each retention term ≥ ½), so it needs its own stopping rule.
    """
    return (REFINEMENT_THRESHOLDS if thresholds is None else thresholds).get(step)


def latent_step(latent: Tensor, loss: Tensor, step_size: float) -> Tensor:
    """One guidance update z ← z − α·∇_z L (Chefer et al. 2023, Algorithm 1; Agarwal et al. 2023).

    ``latent`` must require grad and ``loss`` be computed from it. The gradient comes from
    ``torch.autograd.grad``; the update is done in fp32 and returned detached, in the latent's
    dtype. Raises ``ValueError`` when the loss does not depend on the latent.
    """
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: compute it from the latent with grad enabled")
    (grad,) = torch.autograd.grad(loss, [latent], allow_unused=True)
    if grad is None:
        raise ValueError("loss does not depend on the latent")
    return (latent.detach().float() - step_size * grad.float()).to(latent.dtype)


def _soft_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Σ min(a, b) / Σ (a + b) per row of ``[N, pixels]`` maps; ≤ ½, with equality iff a = b."""
    # The clamp only guards 0/0 for all-zero pairs; any real map's sum is far above it.
    return torch.minimum(a, b).sum(dim=1) / (a + b).sum(dim=1).clamp_min(1e-12)
