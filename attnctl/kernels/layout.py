"""The block layout of DraftAttention's kernels: where each token of a [text + video] sequence sits.

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

import dataclasses
import functools
from typing import Any

import torch

from .memory import scratch, take


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """The project's error for a bad argument, `name=value is not allowed: allowed` (the kernels
    import nothing of attnctl outside this package, so they state it here)."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def check_positive(name: str, value: Any) -> None:
    """A real number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    check(ok, name, value, "a number in (0.0, inf]")


def _check_count(name: str, value: Any, low: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    check(ok, name, value, f"an integer in [{low}, inf]")


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
        _check_count("text", text, 0)
        check(isinstance(text_first, bool), "text_first", text_first, "True or False")
        for name, n in (("frames", frames), ("height", height), ("width", width)):
            _check_count(name, n, 1)
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
        (`memory.scratch`), valid until the next use of the name in this thread."""
        if not self.padded:
            grad = torch.is_grad_enabled() and x.requires_grad
            shape = (*x.shape[:2], self.length, x.shape[3])
            new = buffer is None or grad  # a scratch buffer only where autograd records nothing
            out = x.new_empty(shape) if new else scratch(x, shape, buffer)
            self._copy_regions(x, out, to_kernel=True)
            return out
        idx = self.indices(x.device)
        out = x.index_select(2, idx.source) if buffer is None else take(x, 2, idx.source, buffer)
        return out.index_fill_(2, idx.padding, 0)

    def from_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_kernel`: drops padding, restores sequence order."""
        if not self.padded:
            out = x.new_empty(*x.shape[:2], self.seq, x.shape[3])
            self._copy_regions(out, x, to_kernel=False)
            return out
        return x.index_select(2, self.indices(x.device).scatter)

    def _copy_regions(self, seq: torch.Tensor, kernel: torch.Tensor, to_kernel: bool) -> None:
        """Without padding the kernel order is a permutation of whole regions: copy between the
        sequence-order and kernel-order tensors ([b, h, seq, d], the same size) as one strided copy
        (rows of pw tokens) plus the text. Measured faster than index_select by token on the CPU
        (16k tokens, 8 heads of 64, fp32, one thread: 6.5 -> 5.0 ms into a reused buffer)."""
        ph, pw = self.pool
        regions = (self.frames, self.height // ph, ph, self.width // pw, pw)
        text = slice(0, self.text) if self.text_first else slice(self.visual, self.seq)
        visual = slice(self.text, self.seq) if self.text_first else slice(0, self.visual)
        natural = seq[:, :, visual].unflatten(2, regions).permute(0, 1, 2, 3, 5, 4, 6, 7)
        blocked = kernel[:, :, : self.visual].unflatten(2, (*regions[:2], regions[3], ph, pw))
        if to_kernel:
            blocked.copy_(natural)
            kernel[:, :, self.visual :].copy_(seq[:, :, text])
        else:
            natural.copy_(blocked)
            seq[:, :, text].copy_(kernel[:, :, self.visual :])

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
    order, inverse = visual_order(layout.frames, layout.height, layout.width, layout.pool)
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
def visual_order(
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
