"""DraftAttention: block-sparse attention guided by a low-resolution draft.

Shen et al., "DraftAttention: Fast Video Diffusion via Low-Resolution Attention Guidance",
arXiv 2505.14708 (spec: specs/draft-attention.md). Per head: average-pool each frame's queries and
keys over pool = (ph, pw) regions (Sec. 3.2), take the draft map softmax(Q̃K̃ᵀ/√d), keep the
(1 − sparsity) fraction of its entries above the head's global percentile (Sec. 3.3), reorder the
tokens so that every region is one contiguous block (Sec. 3.4) and run block-sparse attention.

Kernel layout (what the backends in `sparse.py` see), for `block = ph * pw` tokens per block:

    [ visual blocks: frame-major, region rows, region columns, then in-region rows, columns ]
    [ text blocks: the text tokens, in order ]

Edge regions of frames whose height/width are not multiples of the pool are *padded* to a full
block with dummy tokens (zeros) that are masked out as keys and dropped from the output, so every
block has the same size (FlexAttention needs one block size) and the result is exact. The draft
averages an edge region over its real tokens only. Text tokens always sit after the visual blocks
in the kernel layout (whether they come first or last in the sequence), padded the same way; text
rows and columns are always kept, so text attention stays dense.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import torch

from attnctl.core.controls import check, check_number
from attnctl.kernels.sparse import SparsePlan, take, threads

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
    _check_sparsity(sparsity)
    check(backend in BACKENDS, "backend", backend, f"one of {', '.join(BACKENDS)}")
    if scale is not None:
        check_number("scale", scale, low=0.0, low_open=True)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    # Permutation copies, draft and block selection are memory bound or tiny: one thread (see
    # sparse.threads); the attention itself uses them all.
    with threads(1):
        q, k, v = (layout.to_kernel(x, name) for x, name in ((query, "q"), (key, "k"), (value, "v")))
        if block_mask is None:
            keep = _select_blocks(layout, q, k, sparsity, scale)
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
    _check_sparsity(sparsity)
    if scale is not None:
        check_number("scale", scale, low=0.0, low_open=True)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q = layout.to_kernel(query.transpose(0, 1).unsqueeze(0))
    k = layout.to_kernel(key.transpose(0, 1).unsqueeze(0))
    return _select_blocks(layout, q, k, sparsity, scale)[0]


def patch_permutation(
    frames: int, height: int, width: int, pool: tuple[int, int] = (8, 16)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token reordering of DraftAttention (arXiv 2505.14708, Sec. 3.4) for one video.

    Returns (order, inverse): `order[p]` is the natural (frame, row, column) index of the token at
    kernel position p, or -1 for a padding slot of an edge region (g * ph * pw positions in all);
    `inverse[t]` is the kernel position of natural token t, so `order[inverse] == arange(tokens)`.
    """
    layout = DraftLayout.of(text=0, text_first=False, frames=frames, height=height, width=width, pool=pool)
    order, inverse = _visual_order(frames, height, width, layout.pool)
    return order.clone(), inverse.clone()


@dataclasses.dataclass(frozen=True)
class DraftLayout:
    """Where each token of a [text + video] sequence sits in the block-sparse kernel layout."""

    text: int
    text_first: bool
    frames: int
    height: int
    width: int
    pool: tuple[int, int]

    @staticmethod
    def of(
        *, text: int, text_first: bool, frames: int, height: int, width: int, pool: tuple[int, int]
    ) -> DraftLayout:
        """Validated layout; raises ValueError naming the bad argument."""
        check_number("text", text, low=0, integer=True)
        check(isinstance(text_first, bool), "text_first", text_first, "True or False")
        for name, n in (("frames", frames), ("height", height), ("width", width)):
            check_number(name, n, low=1, integer=True)
        ok = isinstance(pool, (tuple, list)) and len(pool) == 2
        ok = ok and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in pool)
        check(ok, "pool", pool, "two positive integers (ph, pw), e.g. (8, 16)")
        return DraftLayout(text, text_first, frames, height, width, (pool[0], pool[1]))

    @property
    def block(self) -> int:
        return self.pool[0] * self.pool[1]

    @property
    def visual(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq(self) -> int:
        return self.text + self.visual

    @property
    def visual_blocks(self) -> int:
        ph, pw = self.pool
        return self.frames * (-(-self.height // ph)) * (-(-self.width // pw))

    @property
    def text_blocks(self) -> int:
        return -(-self.text // self.block)

    @property
    def blocks(self) -> int:
        return self.visual_blocks + self.text_blocks

    @property
    def length(self) -> int:
        """Tokens in the kernel layout, padding included."""
        return self.blocks * self.block

    @property
    def padded(self) -> bool:
        return self.length != self.seq

    def indices(self, device: torch.device) -> _LayoutIndices:
        return _layout_indices(self, torch.device(device))

    def to_kernel(self, x: torch.Tensor, buffer: str | None = None) -> torch.Tensor:
        """[batch, heads, seq, d] in sequence order -> [batch, heads, length, d] in kernel order,
        padding slots zero. With a `buffer` name the result lives in that scratch buffer
        (`sparse.scratch`), valid until the next use of the name in this thread."""
        idx = self.indices(x.device)
        out = x.index_select(2, idx.source) if buffer is None else take(x, 2, idx.source, buffer)
        return out.index_fill_(2, idx.padding, 0) if self.padded else out

    def from_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_kernel`: drops padding, restores sequence order."""
        return x.index_select(2, self.indices(x.device).scatter)

    def pool_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Average of each visual block over its real tokens (padding is zero): [b, h, g, d], fp32."""
        b, h, _, d = x.shape
        blocks = x[:, :, : self.visual_blocks * self.block].reshape(b, h, self.visual_blocks, self.block, d)
        return blocks.sum(3, dtype=torch.float32) / self.indices(x.device).counts[:, None]

    def kernel_block_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Visual block mask [b, h, g, g] -> kernel block mask [b, h, G, G] with dense text."""
        if self.text_blocks == 0:
            return keep
        b, h, g, _ = keep.shape
        full = keep.new_ones(b, h, self.blocks, self.blocks)
        full[:, :, :g, :g] = keep
        return full


@dataclasses.dataclass(frozen=True)
class _LayoutIndices:
    source: torch.Tensor  # [length]: sequence index per kernel position (0 for padding)
    padding: torch.Tensor  # kernel positions of the padding slots
    scatter: torch.Tensor  # [seq]: kernel position per sequence index
    key_valid: torch.Tensor  # [length] bool: real token (not padding)
    block_padded: torch.Tensor  # [blocks] bool: block holds padding
    counts: torch.Tensor  # [visual_blocks] float: real tokens per visual block


@functools.lru_cache(maxsize=64)
def _layout_indices(layout: DraftLayout, device: torch.device) -> _LayoutIndices:
    order, inverse = _visual_order(layout.frames, layout.height, layout.width, layout.pool)
    vis_offset = layout.text if layout.text_first else 0
    text_offset = 0 if layout.text_first else layout.visual
    pad = layout.seq
    visual = torch.where(order >= 0, order + vis_offset, pad)
    text = torch.full((layout.text_blocks * layout.block,), pad, dtype=torch.long)
    text[: layout.text] = torch.arange(layout.text) + text_offset
    gather = torch.cat([visual, text])
    scatter = torch.empty(layout.seq, dtype=torch.long)
    scatter[vis_offset : vis_offset + layout.visual] = inverse
    scatter[text_offset : text_offset + layout.text] = torch.arange(layout.text) + visual.numel()
    key_valid = gather != pad
    real_per_block = key_valid.view(layout.blocks, layout.block).sum(1)
    return _LayoutIndices(
        source=gather.masked_fill(~key_valid, 0).to(device),
        padding=(~key_valid).nonzero().squeeze(1).to(device),
        scatter=scatter.to(device),
        key_valid=key_valid.to(device),
        block_padded=(real_per_block < layout.block).to(device),
        counts=real_per_block[: layout.visual_blocks].to(device, torch.float32),
    )


@functools.lru_cache(maxsize=64)
def _visual_order(
    frames: int, height: int, width: int, pool: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    ph, pw = pool
    rows, cols = -(-height // ph), -(-width // pw)
    natural = torch.arange(frames * height * width).view(frames, height, width)
    # Pad edge regions with -1 so every region is a full ph x pw block, then make regions contiguous.
    padded = torch.nn.functional.pad(natural, (0, cols * pw - width, 0, rows * ph - height), value=-1)
    order = padded.view(frames, rows, ph, cols, pw).permute(0, 1, 3, 2, 4).reshape(-1)
    real = (order >= 0).nonzero().squeeze(1)
    inverse = torch.empty(frames * height * width, dtype=torch.long)
    inverse[order[real]] = real
    return order, inverse


def _select_blocks(
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


def _check_sparsity(sparsity: float) -> None:
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
