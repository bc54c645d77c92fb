"""DraftAttention: block-sparse attention guided by a low-resolution draft.

Shen et al., "DraftAttention: Fast Video Diffusion via Low-Resolution Attention Guidance",
arXiv 2505.14708 (spec: specs/draft-attention.md). Per head: average-pool each frame's queries and
keys over pool = (ph, pw) regions (Sec. 3.2), take the draft map softmax(Q̃K̃ᵀ/√d), keep the
(1 − sparsity) fraction of its entries above the head's global percentile (Sec. 3.3), reorder the
tokens so that every region is one contiguous block (Sec. 3.4) and run block-sparse attention.

The kernel layout of the tokens (`layout.DraftLayout`) is what the backends in `sparse.py` see.
"""

from __future__ import annotations

import collections
import math

import torch

from .layout import DraftLayout, check, check_positive, visual_order
from .memory import threads
from .sparse import SparsePlan

BACKENDS = ("auto", "flex", "flex_eager", "gather", "dense")


def draft_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    text: int,
    text_first: bool,
    frames: int,
    height: int,
    width: int,
    pool: tuple[int, int] = (8, 16),
    sparsity: float,
    backend: str = "auto",
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DraftAttention (arXiv 2505.14708, Alg. 1) for q, k, v shaped [batch, heads, seq, head_dim].

    seq = text + frames * height * width, text tokens before (`text_first`) or after the visual
    tokens, which are in natural (frame, row, column) order. The block mask is computed per batch
    element and head from that element's own draft ([batch, heads, g, g]: with CFG the conditional
    and unconditional rows each select their own blocks). Pass `block_mask` (bool, [batch, heads,
    g, g] or broadcastable [heads, g, g]) to reuse a mask, e.g. across steps; then `sparsity` only
    names the intent and is not re-applied. The draft uses the attention `scale` (default 1/√d,
    the paper's). Query rows whose kept set is empty output zeros (the
    SDPA/FlexAttention convention for fully masked rows). Returns [batch, heads, seq, head_dim].
    """
    layout = DraftLayout.of(
        text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool
    )
    _check_qkv(query, key, value, layout)
    check_sparsity(sparsity)
    check(backend in BACKENDS, "backend", backend, f"one of {', '.join(BACKENDS)}")
    if scale is not None:
        check_positive("scale", scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    # Permutation copies, draft and block selection are memory bound or tiny: one thread (see
    # memory.threads); the attention itself uses them all.
    with threads(1):
        q, k, v = (layout.to_kernel(x, name) for x, name in ((query, "q"), (key, "k"), (value, "v")))
        if block_mask is None:
            keep = select_blocks(layout, q, k, sparsity, scale)
            plan = SparsePlan(backend, layout.kernel_block_mask(keep), layout)
        else:
            plan = _cached_plan(block_mask, backend, layout, query.shape[0], query.shape[1], query.device)
    out = plan.attend(q, k, v, scale)
    with threads(1):
        return layout.from_kernel(out)


def draft_block_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    frames: int,
    height: int,
    width: int,
    pool: tuple[int, int] = (8, 16),
    sparsity: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Draft block mask of DraftAttention (arXiv 2505.14708, Sec. 3.2-3.3) -> bool [heads, g, g].

    query, key: visual tokens [tokens, heads, head_dim] in natural (frame, row, column) order;
    g = frames * ceil(height / ph) * ceil(width / pw). Per head, keeps exactly
    round((1 - sparsity) * g * g) blocks: the largest draft entries softmax(Q̃K̃ᵀ * scale) over
    the whole map (global percentile), ties broken towards the lower flat index.
    """
    layout = DraftLayout.of(text=0, text_first=False, frames=frames, height=height, width=width, pool=pool)
    for name, x in (("query", query), ("key", key)):
        check(
            isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == layout.seq,
            name,
            tuple(x.shape) if isinstance(x, torch.Tensor) else x,
            f"a tensor [tokens={layout.seq} (frames*height*width), heads, head_dim]",
        )
    check(query.shape == key.shape, "key", tuple(key.shape), f"the query's shape {tuple(query.shape)}")
    check_sparsity(sparsity)
    if scale is not None:
        check_positive("scale", scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q = layout.to_kernel(query.transpose(0, 1).unsqueeze(0))
    k = layout.to_kernel(key.transpose(0, 1).unsqueeze(0))
    return select_blocks(layout, q, k, sparsity, scale)[0]


def patch_permutation(
    frames: int, height: int, width: int, pool: tuple[int, int] = (8, 16)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token reordering of DraftAttention (arXiv 2505.14708, Sec. 3.4) for one video.

    Returns (order, inverse): `order[p]` is the natural (frame, row, column) index of the token at
    kernel position p, or -1 for a padding slot of an edge region (g * ph * pw positions in all);
    `inverse[t]` is the kernel position of natural token t, so `order[inverse] == arange(tokens)`.
    """
    layout = DraftLayout.of(text=0, text_first=False, frames=frames, height=height, width=width, pool=pool)
    order, inverse = visual_order(frames, height, width, layout.pool)
    return order.clone(), inverse.clone()


def select_blocks(
    layout: DraftLayout, q: torch.Tensor, k: torch.Tensor, sparsity: float, scale: float
) -> torch.Tensor:
    """Keep the round((1 - sparsity) * g²) largest draft entries per (batch, head) -> [b, h, g, g].

    q, k in the kernel layout; the draft is softmax(Q̃K̃ᵀ * scale) of the block averages.
    """
    b, h, g = q.shape[0], q.shape[1], layout.visual_blocks
    kept = round((1.0 - sparsity) * g * g)
    if kept >= g * g or kept == 0:
        return torch.full((b, h, g, g), kept > 0, dtype=torch.bool, device=q.device)
    q_draft, k_draft = layout.pool_blocks(q), layout.pool_blocks(k)
    draft = torch.softmax(q_draft @ k_draft.transpose(-1, -2) * scale, dim=-1).flatten(2)
    # A global threshold per head (paper Sec. 3.3), not per row: the kept-th largest entry. Entries
    # equal to it are kept lowest flat index first, so that exactly `kept` blocks survive.
    # (Selection, not a sort: 5.7 ms against 33 ms for a stable sort at g = 256, 8 heads.)
    threshold = torch.kthvalue(draft, g * g - kept + 1, dim=-1, keepdim=True).values
    above, ties = draft > threshold, draft == threshold
    keep = above | (ties & (ties.cumsum(-1) <= kept - above.sum(-1, keepdim=True)))
    return keep.view(b, h, g, g)


# Prepared plans for caller-supplied block masks, keyed by the mask's identity and version (the
# entry holds the mask, so its id cannot be reused while cached): reusing a mask across steps or
# layers then skips building the FlexAttention BlockMask / gather groups again.
_PLANS: collections.OrderedDict[tuple, tuple[torch.Tensor, SparsePlan]] = collections.OrderedDict()
_PLAN_CACHE_SIZE = 8


def _cached_plan(
    block_mask: torch.Tensor, backend: str, layout: DraftLayout, batch: int, heads: int, device: torch.device
) -> SparsePlan:
    g = layout.visual_blocks
    ok = isinstance(block_mask, torch.Tensor) and block_mask.dtype == torch.bool
    ok = ok and block_mask.dim() in (3, 4) and block_mask.shape[-2:] == (g, g)
    shape = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else block_mask
    check(ok, "block_mask", shape, f"a bool tensor [batch, heads, {g}, {g}] or [heads, {g}, {g}]")
    key = (id(block_mask), block_mask._version, backend, layout, batch, heads, str(device))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key][1]
    try:
        keep = block_mask.to(device).expand(batch, heads, g, g)
    except RuntimeError:
        check(False, "block_mask", shape, f"broadcastable to [batch={batch}, heads={heads}, {g}, {g}]")
    plan = SparsePlan(backend, layout.kernel_block_mask(keep), layout)
    _PLANS[key] = (block_mask, plan)
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def check_sparsity(sparsity: float) -> None:
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0
    check(ok, "sparsity", sparsity, "a number in [0, 1) (the fraction of draft blocks dropped)")


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DraftLayout) -> None:
    need = f"a tensor [batch, heads, seq={layout.seq} (text + frames*height*width), head_dim]"
    for name, x in (("query", query), ("key", key), ("value", value)):
        ok = isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] == layout.seq
        check(ok, name, tuple(x.shape) if isinstance(x, torch.Tensor) else x, need)
    check(key.shape == query.shape, "key", tuple(key.shape), f"the query's shape {tuple(query.shape)}")
    check(
        value.shape[:3] == query.shape[:3],
        "value",
        tuple(value.shape),
        f"batch, heads and seq of the query {tuple(query.shape[:3])}",
    )
