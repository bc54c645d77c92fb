"""DraftAttention (Shen et al., arXiv 2505.14708) as a control: draft-guided block-sparse attention.

In the video self-attention (and joint text-video attention) layers of a video DiT, a low-resolution
draft of q and k picks the blocks worth computing; the kernel computes only those. Text rows and
columns stay dense, cross-attention is never sparsified, and the early steps and chosen blocks stay
dense (paper: the first 25% of steps and the first block).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..core.attention import AttentionCall, AttentionEdit
from ..core.controls import Control, _in_range, check, param
from ..core.session import in_steps
from ..families.base import LayerInfo, sdpa
from ..kernels import BACKENDS, draft_attention

DEFAULT_REGION = 8 * 16  # tokens of the paper's draft region, allowed whatever the frame's size


@dataclasses.dataclass
class DraftAttention(Control):
    """Make video attention block-sparse, guided by an average-pooled draft.

    sparsity: fraction of blocks skipped per head (0 = dense).
    pool: (rows, columns) of one draft region; a block is one region of one frame.
    dense_steps: the first fraction of the steps stays dense (paper: 0.25).
    dense_blocks: transformer blocks (indices in model order) that stay dense (paper: the first).
    backend: "auto" (the fastest that works here), "flex", "flex_eager", "gather" or "dense".
    layers: restrict to these layer paths/block indices (None: every video self/joint layer).
    """

    video_only: ClassVar[bool] = True

    sparsity: float = param(
        0.9, low=0, high=1, high_open=True, help="Fraction of blocks skipped per head (0: dense)."
    )
    pool: tuple[int, int] = param(
        kind="data",
        default=(8, 16),
        help="(rows, columns) of one draft region; a block is one region of one frame.",
    )
    dense_steps: float = param(
        0.25, low=0, high=1, help="The first fraction of the steps stays dense (paper: 0.25)."
    )
    dense_blocks: tuple[int, ...] = param(
        kind="data",
        default=(0,),
        help="Transformer blocks (indices in model order) that stay dense (paper: the first).",
    )
    backend: str = param(
        "auto",
        choices=BACKENDS,
        help="Kernel: auto (the fastest that works here), flex, flex_eager, gather or dense.",
    )
    layers: list[str | int] | None = param(
        None,
        kind="layers",
        optional=True,
        help="Layer paths or block indices (None: every video self/joint layer).",
    )

    def validate(self) -> None:
        ok = isinstance(self.pool, (list, tuple)) and len(self.pool) == 2
        ok = ok and all(_in_range(p, True, 1, None) for p in self.pool)
        check(ok, "pool", self.pool, "two integers >= 1: (rows, columns) of a draft region")
        self.pool = tuple(self.pool)
        ok = isinstance(self.dense_blocks, (list, tuple)) and all(
            _in_range(b, True, 0, None) for b in self.dense_blocks
        )
        check(ok, "dense_blocks", self.dense_blocks, "a list of block indices >= 0 (may be empty)")
        self.dense_blocks = tuple(self.dense_blocks)

    def install(self, session: Any) -> None:
        video = [layer for layer in session.layers if layer.kind in ("self", "joint")]
        if self.layers is not None:
            chosen = {layer.name for layer in session.select(self.layers, kinds=("self", "joint"))}
            video = [layer for layer in video if layer.name in chosen]
        blocks = list(dict.fromkeys(layer.block for layer in session.layers))
        too_far = [b for b in self.dense_blocks if b >= len(blocks)]
        check(not too_far, "dense_blocks", list(self.dense_blocks), f"block indices below {len(blocks)}")
        dense = {blocks[b] for b in self.dense_blocks}
        session.add_edit([layer for layer in video if layer.block not in dense], _Sparse(self))


class _Sparse(AttentionEdit):
    def __init__(self, spec: DraftAttention):
        self.spec = spec

    def active(self, session: Any, layer: LayerInfo) -> bool:
        dense = in_steps(session.step, session.num_steps, first=self.spec.dense_steps)
        return self.spec.sparsity > 0 and not dense

    def kernel(self, call: AttentionCall) -> torch.Tensor | None:
        lay = call.layout
        n_text = 0 if lay.text_k is None else lay.text_k.stop - lay.text_k.start
        seq = call.key.shape[2]
        if call.query.shape[2] != seq or lay.frames * lay.height * lay.width + n_text != seq:
            return None  # not a video self/joint call (e.g. image-conditioned keys): keep dense
        if n_text and lay.text_k.start == 0:
            text_first = True
        elif not n_text or lay.text_k.start == lay.image_k.stop:
            text_first = False
        else:
            return None
        ph, pw = self.spec.pool
        most = max(lay.height * lay.width, DEFAULT_REGION)
        if ph * pw > most:  # each frame's region would be padded to ph x pw tokens
            raise ValueError(
                f"pool={list(self.spec.pool)} is not allowed for frames of {lay.height}x{lay.width} tokens: "
                f"regions of at most {most} tokens (one region per frame is ({lay.height}, {lay.width}))"
            )
        options = dict(
            frames=lay.frames, height=lay.height, width=lay.width, pool=self.spec.pool,
            sparsity=self.spec.sparsity, backend=self.spec.backend, scale=call.scale,
        )  # fmt: skip
        if call.mask is None:
            return draft_attention(
                call.query, call.key, call.value, text=n_text, text_first=text_first, **options
            )
        return self._masked(call, n_text, text_first, options)

    def _masked(
        self, call: AttentionCall, n_text: int, text_first: bool, options: dict
    ) -> torch.Tensor | None:
        """Padded text keys (a boolean key mask [B, 1, 1, S], or the pair mask [B, 1, S, S] of valid
        queries and valid keys, HunyuanVideo 1.5's): drop them, run sparse on the rest.

        The padded text queries' own rows are computed densely with the mask, as the model does."""
        mask = call.mask
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return None
        q, k, v = call.query, call.key, call.value
        text = call.layout.text_k
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype, device=v.device)
        for b in range(q.shape[0]):
            row_mask = mask[b : b + 1] if mask.shape[0] > 1 else mask
            # an image query sees every valid key
            valid = row_mask[0, 0, 0 if mask.shape[2] == 1 else call.layout.image_q.start]
            if mask.shape[2] > 1 and not torch.equal(row_mask[0, 0], valid[:, None] & valid[None, :]):
                return None  # a pair mask not made of one key mask
            if not bool(valid[call.layout.image_k].all()):
                return None  # only padded text is supported
            keep, pad = valid.nonzero().flatten(), (~valid).nonzero().flatten()
            sub = [x[b : b + 1, :, keep] for x in (q, k, v)]
            out[b : b + 1, :, keep] = draft_attention(
                *sub, text=int(valid[text].sum()), text_first=text_first, **options
            )
            if len(pad):  # the padded text queries, as the model computes them
                pad_mask = row_mask[:, :, pad] if mask.shape[2] > 1 else row_mask
                out[b : b + 1, :, pad] = sdpa(
                    q[b : b + 1, :, pad], k[b : b + 1], v[b : b + 1], pad_mask, call.kernel_scale
                )
        return out
