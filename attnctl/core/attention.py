"""Attention calls and the protocol controls fill in (attnctl's processor, `processor.py`, runs them).

A control contributes to an attention call through an `AttentionEdit`, overriding only what it needs
(in the spirit of FlexAttention's score_mod / mask_mod):
- `logit_bias(call, logits)`: edit the pre-softmax logits (Attention Regulation, layout masks);
- `post_softmax(call, probs, logits)`: edit the probabilities (AR restores start/end columns);
- `kernel(call)`: compute the output with another kernel (DraftAttention);
- `mix_output(call, out)`: mix the output O with the values V per batch row / head, after the kernel
  and the logit / probability edits, whichever kernel ran (SoftPAG: O' = (1-u)·O + u·V);
- `observe(call)`: read the attention (maps), e.g. through `call.text_probs(columns)`;
- `key_bias(call, rows, queries)`: which keys a block of queries may see, as an additive bias
  (-inf: hidden), like FlexAttention's mask_mod; it is asked per query block, so no N x N tensor is
  needed. Explicit logits and `text_probs` include it; an edit that gives one also gives the
  kernel that honours it (layout masks).
Explicit probabilities are computed only when an edit changes logits or probabilities; observers
alone keep the model's own attention kernel and recompute just the text columns they read, in
query chunks, so no N x N matrix is ever kept.

`session` arguments are the live `Session` (typed Any: this module sits below the session, which
imports it), or a stand-in with the same state, as `AttentionRegulationProcessor` passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..families.base import LayerInfo, Prepared
from .denoiser import BatchRows

# Elements of one logits chunk when text probabilities are recomputed (16 MiB in fp32; a chunk
# lives with ~2 same-sized temporaries, so this bounds the extra peak memory of recording maps).
CHUNK_ELEMENTS = 1 << 22


class AttentionEdit:
    """What a control does inside attention calls. Override what you need; the rest stays a no-op."""

    def active(self, session: Any, layer: LayerInfo) -> bool:
        """Whether this edit takes part in the current call of `layer` (e.g. only on some steps)."""
        return True

    def logit_bias(self, call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def post_softmax(self, call: AttentionCall, probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return probs

    def kernel(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def mix_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """O' from the attention output O [B, H, Sq, D] and `call.value`, for the rows / heads it edits."""
        return out

    def observe(self, call: AttentionCall) -> None:
        return None

    def key_bias(self, call: AttentionCall, rows: list[int], queries: slice) -> torch.Tensor | None:
        """Additive bias over the keys for the query positions `queries` of batch rows `rows`:
        [len(rows) or 1, 1, n, Sk], 0 where a key is seen and -inf where it is hidden."""
        return None


def overrides(edit: AttentionEdit, method: str) -> bool:
    """Whether `edit` fills in `method` of the protocol (the others stay no-ops and are skipped)."""
    return getattr(type(edit), method) is not getattr(AttentionEdit, method)


class AttentionCall:
    """One call of one attention layer: q, k, v [B, H, S, D], token layout and the session state."""

    def __init__(self, session: Any, layer: LayerInfo, prepared: Prepared, default_kernel: Callable):
        self.session = session
        self.layer = layer
        self.query, self.key, self.value = prepared.query, prepared.key, prepared.value
        self.layout = prepared.layout
        self.mask = prepared.mask
        self.scale = prepared.scale if prepared.scale is not None else 1.0 / math.sqrt(self.query.shape[-1])
        self.kernel_scale = prepared.scale  # passed on as given, so the default path is the model's own
        self.default_kernel = default_kernel
        self.image_streams = prepared.image_streams  # IP-Adapter streams the family adds after attend()
        self.rows: BatchRows = session.rows  # which batch rows are uncond / cond / perturbed
        self.probs: torch.Tensor | None = None  # set when probabilities were computed explicitly
        self.edits: list[AttentionEdit] = []  # the edits taking part in this call (set by attend)
        self._text_probs: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def cond_rows(self) -> list[int]:
        """Batch rows of this call that belong to the conditional (prompted) branch."""
        return list(self.rows.cond)

    def logits(self, rows: list[int] | None = None) -> torch.Tensor:
        """Explicit pre-softmax logits [B, H, Sq, Sk] of the given batch rows (default: all), mask and
        the edits' key biases included."""
        q, k = (self.query, self.key) if rows is None else (self.query[rows], self.key[rows])
        logits = (q @ k.transpose(-1, -2)) * self.scale
        bias = self.bias(rows, slice(0, q.shape[2]), logits.dtype)
        return logits if bias is None else logits + bias

    def bias(self, rows: list[int] | None, queries: slice, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive bias over keys for query positions `queries` of `rows` (None: all rows): the
        call's mask plus every edit's `key_bias`; None when there is neither."""
        parts = []
        if self.mask is not None:
            mask = self.mask if rows is None or self.mask.shape[0] == 1 else self.mask[rows]
            parts.append(_additive(mask if mask.shape[-2] == 1 else mask[..., queries, :], dtype))
        all_rows = list(range(self.query.shape[0])) if rows is None else rows
        for e in self.edits:
            if overrides(e, "key_bias"):
                b = e.key_bias(self, all_rows, queries)
                if b is not None:
                    parts.append(b.to(dtype))
        if not parts:
            return None
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def text_probs(self, columns: list[int]) -> torch.Tensor:
        """Head-averaged probabilities from image queries to the given text keys, for the conditional
        rows: [len(cond_rows), N_image, C], fp32.

        `columns` index the text keys (0 = first text token). The softmax runs over all keys, as the
        model's own attention does; rows are computed in chunks and only the asked columns are kept.
        Differentiable, so latent guidance can take gradients through it.
        """
        key = tuple(columns)
        if key in self._text_probs:
            return self._text_probs[key]
        text = self.layout.text_k
        if text is None:
            raise ValueError(f"layer {self.layer.name} has no text keys")
        cols = torch.tensor([text.start + c for c in columns], device=self.key.device)
        rows = self.cond_rows
        if self.probs is not None:  # already computed explicitly for the conditional rows
            result = self.probs[:, :, self.layout.image_q].index_select(-1, cols).float().mean(1)
        else:
            q = self.query[rows][:, :, self.layout.image_q]
            k = self.key[rows].float()
            b, h, n, _ = q.shape
            chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * k.shape[2]))
            parts = []
            for s in range(0, n, chunk):
                logits = (q[:, :, s : s + chunk].float() @ k.transpose(-1, -2)) * self.scale
                start = self.layout.image_q.start + s
                bias = self.bias(rows, slice(start, start + logits.shape[2]), torch.float32)
                if bias is not None:
                    logits = logits + bias
                lse = logits.logsumexp(-1, keepdim=True)
                parts.append((logits.index_select(-1, cols) - lse).exp().mean(1))
            result = (
                torch.cat(parts, dim=1) if parts else q.new_zeros(b, 0, len(columns), dtype=torch.float32)
            )
        self._text_probs[key] = result
        return result


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def attend(call: AttentionCall, edits: list[AttentionEdit]) -> torch.Tensor:
    """Run one attention call with the edits' contributions; returns [B, H, Sq, D].

    Order: the kernel (an edit's, else the model's own), then logit and probability edits, then output
    mixes, then observers. Logit and probability edits apply to the conditional rows only (given to
    them as [Bc, H, Sq, Sk]); the other rows keep the kernel's output, so the unconditional branch
    stays bit-identical. Output mixes see every row and choose their own (e.g. `call.rows.perturbed`).
    """
    call.edits = edits
    biases = [e for e in edits if overrides(e, "logit_bias")]
    posts = [e for e in edits if overrides(e, "post_softmax")]
    out = None
    for e in edits:
        if overrides(e, "kernel"):
            out = e.kernel(call)
            if out is not None:
                break
    if out is None:
        out = call.default_kernel(call.query, call.key, call.value, call.mask, call.kernel_scale)
    rows = call.cond_rows
    if (biases or posts) and rows:
        unedited = call.logits(rows)
        logits = unedited
        for e in biases:
            logits = e.logit_bias(call, logits)
        probs = logits.softmax(-1)
        for e in posts:
            probs = e.post_softmax(call, probs, unedited)
        call.probs = probs
        edited = probs.to(call.value.dtype) @ call.value[rows]
        out = out.index_copy(0, torch.tensor(rows, device=out.device), edited)
    for e in edits:
        if overrides(e, "mix_output"):
            out = e.mix_output(call, out)
    for e in edits:
        if overrides(e, "observe"):
            e.observe(call)
    return out
