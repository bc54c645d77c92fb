"""Attention Regulation: the pure-tensor edit of one cross-attention layer.

Zhang et al., "Enhancing Semantic Fidelity in Text-to-Image Synthesis: Attention Regulation in
Diffusion Models", ECCV 2024 (spec: specs/attention-regulation.md).

For the conditional rows of one cross-attention layer, a bias D = Σ_c w_c·g_c built from fixed
2-D Gaussian bumps g_c is added to the pre-softmax logits of the target tokens. The weights w are
found by 20 plain gradient steps on a loss that pushes each target's mean attention towards
τ/|K| and its 90th-percentile pixel towards 0.9. No UNet backward pass is needed.

Conventions used throughout:
- logits and probabilities are ``[rows, H*W, tokens]`` with rows = conditional images × heads;
- the H*W axis is row-major over the map: flat index ``i = y * width + x`` (y = row, x = column),
  the order diffusers uses when it flattens a ``[B, C, H, W]`` feature map;
- the bias ``D`` is ``[rows, H*W, |K|]`` and only touches the target columns.

The caller keeps one :class:`RegulationState` per edited layer and calls :func:`regulation_bias`
(the bias alone, what the control adds to the logits) or :func:`regulate_logits` (the edited
probabilities) once per denoising step for that layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# Loss weights of the reference implementation: L = 1·L_q90 + 80·L_mean + 0.09·L_w.
QUANTILE_WEIGHT = 1.0
MEAN_WEIGHT = 80.0
WEIGHT_DECAY = 0.09
# The 90th percentile pixel of every target is pushed towards 0.9.
QUANTILE = 0.9
QUANTILE_TARGET = 0.9
# The smallest map side regulated: σ = max(1, side // 16) gives a 3x3 grid of bumps at 8.
MIN_SIDE = 8


@dataclasses.dataclass
class RegulationState:
    """Per-layer memory between denoising steps (one instance per edited layer).

    ``prev_bias`` is the previous step's raw best bias ``[rows, H*W, |K|]`` (before smoothing and
    decay), used for the temporal smoothing D = 0.25·D_prev + 0.75·D_best. ``step`` is the
    denoising-step index of the next call; it sets the 0.99^step decay and is advanced by one on
    every :func:`regulate_logits` call. A caller that tracks steps itself may assign it before the
    call. ``generator`` draws the initial weights (seeded, on CPU so results match across devices).
    """

    seed: int = 0
    step: int = 0
    prev_bias: Tensor | None = None
    generator: torch.Generator = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def reset(self) -> None:
        """Forget the previous step and reseed, e.g. at the start of a new generation."""
        self.step = 0
        self.prev_bias = None
        self.generator.manual_seed(self.seed)


@dataclasses.dataclass
class RegulationInfo:
    """What one :func:`regulate_logits` call did (all tensors detached, fp32).

    ``losses``: the loss of every evaluated iterate ``[steps]`` (iterate j uses the weights after
    j gradient steps). ``best_losses``: its running minimum (keep-best never rises).
    ``best_index``: which iterate was kept. ``bias``: the bias actually added to the target logits
    after smoothing and decay ``[rows, H*W, |K|]``. ``raw_best_bias``: the kept iterate's bias
    before smoothing, which is also stored in the state for the next step.
    """

    losses: Tensor
    best_losses: Tensor
    best_index: int
    bias: Tensor
    raw_best_bias: Tensor


def regulation_supported(height: int, width: int) -> bool:
    """True when the layer's map can be regulated: its shorter side is at least 8.

    The reference edits 16–32 side maps with σ = side // 16 and divides by zero below 16; attnctl
    uses σ = max(1, side // 16), so 8–15 sides (the bundled testbed's 8×8 text layers) get σ = 1
    and a 3×3 grid of bumps at 8. Smaller maps are skipped.
    """
    return min(height, width) >= MIN_SIDE


def gaussian_basis(height: int, width: int, *, device: torch.device | str | None = None) -> Tensor:
    """Fixed 2-D Gaussian bumps ``[C, height, width]`` (fp32) of Attention Regulation (Zhang et al. 2024).

    g_c(y, x) = exp(-((x - x0)² + (y - y0)²) / (2σ²)) with σ = max(1, side // 16) and centres on a
    grid of stride 2σ starting at 2σ (49 bumps for a 16, 32 or 64 square side, 9 for 8). Non-square maps use one
    isotropic σ from the shorter side and lay the grid out per axis, so a 16×24 map gets 7×11
    bumps. Bumps are ordered row-major by centre (y0 outer, x0 inner).
    Raises ``ValueError`` when :func:`regulation_supported` is False.
    """
    _check_supported(height, width)
    sigma = max(1, min(height, width) // 16)
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    cy = torch.arange(2 * sigma, height, 2 * sigma, dtype=torch.float32, device=device)
    cx = torch.arange(2 * sigma, width, 2 * sigma, dtype=torch.float32, device=device)
    # The Gaussian is separable: g_c(y, x) = exp(-(y-y0)²/2σ²) · exp(-(x-x0)²/2σ²).
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * sigma**2))  # [Cy, H]
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * sigma**2))  # [Cx, W]
    basis = gy[:, None, :, None] * gx[None, :, None, :]  # [Cy, Cx, H, W]
    # Far tails underflow into fp32 denormals (below 1.2e-38), whose arithmetic is many times
    # slower on x86 CPUs and made every GEMM with the basis 3x slower; they are flushed to zero.
    basis = basis.masked_fill(basis < torch.finfo(torch.float32).tiny, 0.0)
    return basis.reshape(-1, height, width)


@functools.lru_cache(maxsize=16)
def _basis_matrix(height: int, width: int, device: torch.device) -> Tensor:
    """`gaussian_basis` flattened to ``[C, H*W]``, cached per map size and device (read-only)."""
    return gaussian_basis(height, width, device=device).reshape(-1, height * width)


def regulation_loss(
    target_probs: Tensor,
    weights: Tensor,
    *,
    quantile_weight: float = QUANTILE_WEIGHT,
    mean_weight: float = MEAN_WEIGHT,
    weight_decay: float = WEIGHT_DECAY,
) -> Tensor:
    """Attention Regulation loss (Zhang et al. 2024, reference loss) as a scalar.

    ``target_probs``: post-softmax probabilities of the target columns ``[rows, H*W, |K|]``;
    ``weights``: the bump weights ``[rows, C, |K|]``.
    L = a·mean((q0.9(P_k) − 0.9)²) + b·mean((mean_HW(P_k) − τ/|K|)²) + c·mean(w²),
    τ = min(1, 0.2·|K|); the quantile and mean run over the H*W pixels of each (row, k).
    """
    num_targets = target_probs.shape[-1]
    tau = min(1.0, 0.2 * num_targets)
    q = _quantile_dim1(target_probs, QUANTILE)
    quantile_term = ((q - QUANTILE_TARGET) ** 2).mean()
    mean_term = ((target_probs.mean(dim=1) - tau / num_targets) ** 2).mean()
    weight_term = (weights**2).mean()
    return quantile_weight * quantile_term + mean_weight * mean_term + weight_decay * weight_term


def regulate_logits(
    logits: Tensor,
    targets: Sequence[int],
    *,
    restore_columns: Sequence[int],
    height: int,
    width: int,
    state: RegulationState,
    **options: Any,
) -> tuple[Tensor, RegulationInfo]:
    """Regulate one layer's conditional cross-attention (Zhang et al. 2024) and return probabilities.

    ``logits``, ``targets``, ``height``, ``width``, ``state`` and ``options`` as in
    :func:`regulation_bias`, which finds the bias D. Returns ``(probs, info)`` with
    P = softmax(S + D on target columns) shaped like ``logits`` in its dtype, where the
    ``restore_columns`` (the start-of-text / end-of-text columns) get their unedited probabilities
    back after the softmax, so rows no longer sum to 1 (as the reference).
    """
    overlap = sorted({int(c) for c in targets} & {int(c) for c in restore_columns})
    if overlap:
        raise ValueError(f"targets and restore_columns overlap at {overlap}")
    bad = [c for c in restore_columns if not 0 <= c < logits.shape[-1]]
    if bad:
        raise ValueError(f"restore_columns: columns {bad} out of range for {logits.shape[-1]} tokens")
    info = regulation_bias(logits, targets, height=height, width=width, state=state, **options)
    with torch.no_grad():
        scores = logits.detach().float()
        probs = add_target_bias(scores, targets, info.bias).softmax(dim=-1)
        if restore_columns:
            cols = list(restore_columns)
            probs[..., cols] = scores.softmax(dim=-1)[..., cols]
    return probs.to(logits.dtype), info


def regulation_bias(
    logits: Tensor,
    targets: Sequence[int],
    *,
    height: int,
    width: int,
    state: RegulationState,
    steps: int = 20,
    lr: float = 100.0,
    smoothing: float = 0.25,
    decay: float = 0.99,
    quantile_weight: float = QUANTILE_WEIGHT,
    mean_weight: float = MEAN_WEIGHT,
    weight_decay: float = WEIGHT_DECAY,
) -> RegulationInfo:
    """The Attention Regulation bias (Zhang et al. 2024) of one layer and step; ``info.bias`` is D.

    ``logits``: pre-softmax scores S = QKᵀ/√d of the **conditional rows only**
    ``[rows, height*width, tokens]``, rows = cond images × heads, H*W row-major.
    ``targets``: token columns to regulate (all sub-tokens of the target words).

    Steps: w ~ U[0, 1) from ``state.generator``; ``steps`` plain gradient steps
    w ← w − (rows·lr)·∇w L, keeping the lowest-loss iterate D_best; D = (s·D_prev + (1−s)·D_best)
    · decay^step with D_prev the previous step's raw D_best (the random initial D when the state
    is fresh). All optimisation is fp32 whatever the input dtype. Updates ``state`` (prev_bias, step).
    """
    rows, pixels, num_tokens = logits.shape
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    targets = _check_targets(targets, num_tokens)
    if pixels != height * width:
        raise ValueError(f"logits have {pixels} pixels but height*width = {height}*{width}")
    _check_supported(height, width)
    if state.prev_bias is not None and state.prev_bias.shape != (rows, pixels, len(targets)):
        raise ValueError(
            f"state.prev_bias has shape {tuple(state.prev_bias.shape)} but this call needs "
            f"{(rows, pixels, len(targets))}; use one RegulationState per layer and call reset()"
        )

    with torch.no_grad():
        basis = _basis_matrix(height, width, logits.device)  # [C, HW]
        weights0 = torch.rand(
            (rows, basis.shape[0], len(targets)), generator=state.generator, dtype=torch.float32
        ).to(logits.device)
        losses, best_bias, best_index = _optimise_bias(
            logits.detach().float(),
            targets,
            basis,
            weights0,
            steps=steps,
            step_size=rows * lr,
            loss_weights=(quantile_weight, mean_weight, weight_decay),
        )
        prev = state.prev_bias if state.prev_bias is not None else _bias(weights0, basis)
        bias = (smoothing * prev + (1.0 - smoothing) * best_bias) * decay**state.step

    state.prev_bias = best_bias
    state.step += 1
    return RegulationInfo(
        losses=losses,
        best_losses=torch.cummin(losses, dim=0).values,
        best_index=best_index,
        bias=bias,
        raw_best_bias=best_bias,
    )


def add_target_bias(logits: Tensor, targets: Sequence[int], bias: Tensor) -> Tensor:
    """Return ``logits`` with ``bias [rows, H*W, |K|]`` added to the ``targets`` columns only.

    Non-target columns are copied unchanged (a new tensor; the input is not modified).
    """
    edited = logits.clone()
    cols = list(targets)
    edited[..., cols] = edited[..., cols] + bias.to(edited.dtype)
    return edited


def _optimise_bias(
    scores: Tensor,
    targets: list[int],
    basis: Tensor,
    weights0: Tensor,
    *,
    steps: int,
    step_size: float,
    loss_weights: tuple[float, float, float],
) -> tuple[Tensor, Tensor, int]:
    """Plain gradient descent on the bump weights; returns (losses, best raw bias, best index).

    The gradient of `regulation_loss` is written out by hand (no autograd graph): on small maps the
    optimisation is dominated by per-op overhead, and the closed form needs about a third of the
    ops. With P = softmax(S + D) over all tokens (only target columns move) and G = ∂L/∂P on the
    target columns, ∂L/∂D = P·(G − Σ_k P_k·G_k) and ∂L/∂w = basisᵀ·∂L/∂D + 2c·w / numel(w).
    ∂L/∂P has a uniform part from the mean term and, from the quantile term, the linear-interpolation
    weights at the two order statistics it reads (as autograd through a sort would give).
    """
    quantile_weight, mean_weight, weight_decay = loss_weights
    rows, pixels, num_targets = scores.shape[0], scores.shape[1], len(targets)
    pairs = rows * num_targets
    # Map-major layout [rows, |K|, HW] throughout: the basis products become small 2-D GEMMs with
    # the pixels contiguous, and the per-map reductions (mean, top-k) run over the last dim.
    shape = (rows, num_targets, pixels)
    columns = torch.tensor(targets, device=scores.device)
    target_scores = scores.index_select(-1, columns).transpose(1, 2).reshape(pairs, pixels)
    # Only target columns change, so the other columns enter the softmax as one fixed column, their
    # log-sum-exp: each iteration costs O(rows·HW·|K|) instead of O(rows·HW·tokens).
    others = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
    others[columns] = False
    rest = scores.index_select(-1, others.nonzero().squeeze(1))
    # [rest, target 1, ..., target |K|] per map: one fused softmax over dim 1 per iteration.
    joint = torch.empty(rows, num_targets + 1, pixels, device=scores.device)
    joint[:, 0] = torch.logsumexp(rest, dim=-1)  # -inf if there are no other columns
    tau = min(1.0, 0.2 * num_targets)
    # The quantile interpolates linearly between order statistics lo and hi (torch.quantile's
    # rule); the top `top` values of each map hold both.
    pos = QUANTILE * (pixels - 1)
    lo = int(pos)
    hi = min(lo + 1, pixels - 1)
    frac = pos - lo
    top = pixels - lo
    at_lo, at_hi = top - 1, pixels - 1 - hi  # positions of s[lo] and s[hi] in the descending top-k
    order = torch.tensor([at_lo, at_hi], device=scores.device)
    # ∂q/∂s[lo] = 1 - frac, ∂q/∂s[hi] = frac, times ∂L/∂q = 2a·(q - 0.9) / (rows·|K|).
    quantile_grad = torch.tensor([1.0 - frac, frac], device=scores.device) * (2 * quantile_weight / pairs)
    mean_grad = 2 * mean_weight / (pairs * pixels)
    basis_t = basis.T.contiguous()  # [HW, C]
    shrink = 1.0 - step_size * 2 * weight_decay / (basis.shape[0] * pairs)  # the weight-decay gradient

    weights = weights0.transpose(1, 2).reshape(pairs, basis.shape[0])  # [rows·|K|, C]
    iterates, quantile_errors, mean_errors = [], [], []
    for _ in range(steps):
        joint[:, 1:] = torch.addmm(target_scores, weights, basis).view(shape)
        probs = joint.softmax(dim=1)[:, 1:]
        values, index = probs.topk(top, dim=-1)
        q_err = torch.lerp(values[..., at_lo], values[..., at_hi], frac) - QUANTILE_TARGET
        m_err = probs.mean(dim=-1, keepdim=True) - tau / num_targets
        iterates.append(weights)
        quantile_errors.append(q_err)
        mean_errors.append(m_err)
        # ∂L/∂P: the mean term spreads evenly over the pixels, the quantile term hits two of them.
        grad_p = (m_err * mean_grad).expand(shape).clone()
        grad_p.scatter_add_(-1, index.index_select(-1, order), q_err.unsqueeze(-1) * quantile_grad)
        grad_bias = probs * (grad_p - (probs * grad_p).sum(dim=1, keepdim=True))
        # w ← w − step·(∂L/∂D·basisᵀ + 2c·w / numel(w)) in one GEMM.
        weights = torch.addmm(
            weights, grad_bias.reshape(pairs, pixels), basis_t, beta=shrink, alpha=-step_size
        )

    stacked = torch.stack(iterates)  # [steps, rows·|K|, C]
    losses = (
        quantile_weight * torch.stack(quantile_errors).square().mean(dim=(1, 2))
        + mean_weight * torch.stack(mean_errors).square().mean(dim=(1, 2, 3))
        + weight_decay * stacked.square().mean(dim=(1, 2))
    )
    # Keep-best: the first iterate with the lowest loss (argmin returns the first minimum).
    best_index = int(torch.argmin(losses))
    best_bias = torch.mm(stacked[best_index], basis).view(shape).transpose(1, 2).contiguous()
    return losses, best_bias, best_index


def _bias(weights: Tensor, basis: Tensor) -> Tensor:
    """D[r, i, k] = Σ_c w[r, c, k] · g_c[i] with ``basis [C, H*W]`` row-major."""
    return torch.einsum("rck,ci->rik", weights, basis)


def _quantile_dim1(x: Tensor, q: float) -> Tensor:
    """Quantile over dim 1 with linear interpolation (torch.quantile's default), differentiable.

    Written with sort because torch.quantile refuses inputs above 16M elements.
    """
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    s = x.sort(dim=1).values
    return s[:, lo] + frac * (s[:, hi] - s[:, lo])


def _check_supported(height: int, width: int) -> None:
    if not regulation_supported(height, width):
        raise ValueError(
            f"Attention Regulation needs a map side of at least {MIN_SIDE}; "
            f"got height={height}, width={width}. Skip this layer."
        )


def _check_targets(targets: Sequence[int], num_tokens: int) -> list[int]:
    cols = [int(t) for t in targets]
    if not cols:
        raise ValueError("targets: need at least one target token column")
    if len(set(cols)) != len(cols):
        raise ValueError(f"targets: duplicate columns in {cols}")
    bad = [c for c in cols if not 0 <= c < num_tokens]
    if bad:
        raise ValueError(f"targets: columns {bad} out of range for {num_tokens} tokens")
    return cols
