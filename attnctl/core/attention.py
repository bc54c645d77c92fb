"""Attention calls and the protocol controls fill in (attnctl's processor, `processor.py`, runs them).

A control contributes to an attention call through an `AttentionEdit`, overriding only what it needs
(in the spirit of FlexAttention's score_mod / mask_mod):
- `logit_bias(call, logits)`: edit the pre-softmax logits of image queries to text keys (Attention
  Regulation's bias);
- `post_softmax(call, probs, unedited)`: edit those probabilities (AR restores start/end columns);
- `kernel(call)`: compute the output with another kernel (DraftAttention);
- `mix_output(call, out)`: mix the output O with the values V per batch row / head, after the kernel
  and the logit / probability edits, whichever kernel ran (SoftPAG: O' = (1-u)·O + u·V);
- `observe(call)`: read the attention (maps), e.g. through `call.text_probs(columns)`;
- `key_bias(call, rows, queries)`: which keys a block of queries may see, as an additive bias
  (-inf: hidden), like FlexAttention's mask_mod; it is asked per query block, so no N x N tensor is
  needed. Explicit logits and `text_probs` include it; an edit that gives one also gives the
  kernel that honours it (layout masks).
The model's own kernel always runs; logit and probability edits change its output through the text
columns they touch and each row's softmax denominator, and observers read just the text columns
they ask for, so no N x N matrix is ever built.

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

    # Whether a call run again inside a control's gradient forward (a gradient checkpoint recomputes
    # blocks during the backward) gives the same result and leaves the edit as it was: False for an
    # edit that is active there and keeps state per call (Attention Regulation's optimisation).
    replayable: bool = True

    def active(self, session: Any, layer: LayerInfo) -> bool:
        """Whether this edit takes part in the current call of `layer` (e.g. only on some steps)."""
        return True

    def logit_bias(self, call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the conditional rows' image queries to the text keys, [Bc, H, N_image, T] fp32;
        the call's own tensor, which the edit may change in place."""
        return logits

    def post_softmax(self, call: AttentionCall, probs: torch.Tensor, unedited: torch.Tensor) -> torch.Tensor:
        """Probabilities of the same entries after the logit edits (softmax over all keys), and before
        any edit; [Bc, H, N_image, T]. Rows need not sum to 1 afterwards; `probs` may be changed in
        place."""
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

    def __init__(
        self,
        session: Any,
        layer: LayerInfo,
        prepared: Prepared,
        default_kernel: Callable,
        native: bool = False,
    ):
        self.session = session
        self.layer = layer
        self.query, self.key, self.value = prepared.query, prepared.key, prepared.value
        self.layout = prepared.layout
        self.mask = prepared.mask
        self.scale = prepared.scale if prepared.scale is not None else 1.0 / math.sqrt(self.query.shape[-1])
        self.kernel_scale = prepared.scale  # passed on as given, so the default path is the model's own
        self.default_kernel = default_kernel
        # the model's kernel is PyTorch's own SDPA on the CPU (no other backend, no sharding): where
        # SDPA picks its flash kernel, one call of it gives the output and the softmax denominators
        self.native = native
        self.image_streams = prepared.image_streams  # IP-Adapter streams the family adds after attend()
        # which batch rows are uncond / cond / perturbed (of the rows this call holds)
        rows = prepared.layout.rows
        self.rows: BatchRows = session.rows if rows is None else session.rows.subset(rows)
        # edited probabilities of the conditional rows' image queries to the text keys, set by attend()
        self.probs: torch.Tensor | None = None
        self.edits: list[AttentionEdit] = []  # the edits taking part in this call (set by attend)
        self._text_probs: dict[tuple[int, ...], torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def release(self) -> None:
        """Drop what the call derived from q and k (denominators, text and edited probabilities) when
        it ends. Under a gradient, those tensors' graph holds this call (the chunked denominators'
        backward reads its bias), and a cycle through autograd's nodes is one Python's collector
        cannot see: each guided step would keep its layers' activations until the process ends."""
        self._cache.clear()
        self._text_probs.clear()
        self.probs = None

    @property
    def cond_rows(self) -> list[int]:
        """Batch rows of this call that belong to the conditional (prompted) branch."""
        return list(self.rows.cond)

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

    def model_output(self, stop: int | None = None) -> torch.Tensor:
        """The model's own kernel on q, k, v: [B, H, Sq, D]; `stop`: on the batch rows before it only
        (an edit computes the others itself). Where that kernel is PyTorch's CPU flash attention and
        an edit will read the conditional rows' softmax denominators (maps, logit edits), the same
        kernel call returns them too (`image_lse`), bit for bit the model's output."""
        reads = any(overrides(e, m) for e in self.edits for m in ("observe", "logit_bias", "post_softmax"))
        rows = self.cond_rows
        q, k, v, mask = self.query, self.key, self.value, self.mask
        if stop is not None and stop < q.shape[0]:
            q, k, v = q[:stop], k[:stop], v[:stop]
            if mask is not None and mask.shape[0] > 1:
                mask = mask[:stop]
            reads = reads and all(r < stop for r in rows)
        if not (self.native and reads and rows and self.layout.text_k is not None):
            return self.default_kernel(q, k, v, mask, self.kernel_scale)
        if any(overrides(e, "key_bias") for e in self.edits) or torch.is_grad_enabled():
            return self.default_kernel(q, k, v, mask, self.kernel_scale)
        if torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=self.kernel_scale) != _FLASH:
            return self.default_kernel(q, k, v, mask, self.kernel_scale)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_flash_mask(mask, q.dtype), scale=self.kernel_scale
        )
        self._cache[("lse", *rows)] = lse[rows][:, :, self.layout.image_q]
        return out

    def text_logits(self, rows: list[int]) -> torch.Tensor:
        """Logits from the image queries to the text keys of `rows`, mask and key biases included:
        [len(rows), H, N_image, T], fp32 (products of the model-dtype q and k, summed in fp32)."""
        image, text = self.layout.image_q, self._text_keys()
        q, k = self.query[rows][:, :, image].float(), self.key[rows][:, :, text].float()
        logits = (q @ k.transpose(-1, -2)) * self.scale
        bias = self.bias(rows, image, torch.float32)
        return logits if bias is None else logits + bias[..., text]

    def image_lse(self, rows: list[int]) -> torch.Tensor:
        """log Σ_keys exp(logit) of each image query of `rows` over all keys, mask and key biases
        included: [len(rows), H, N_image], fp32. The softmax denominators, so that a change to a few
        columns (maps read them, Attention Regulation biases them) needs no N x N tensor.

        On CPU without key biases and gradients, from PyTorch's flash kernel, which returns them
        (products in fp32 whatever the dtype); else in query chunks of bounded memory, whose backward
        recomputes each chunk's probabilities instead of keeping them (latent guidance)."""
        key = ("lse", *rows)
        if key in self._cache:
            return self._cache[key]
        image = self.layout.image_q
        q, k = self.query[rows][:, :, image], self.key[rows]
        biased = any(overrides(e, "key_bias") for e in self.edits)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if q.device.type == "cpu" and not biased and not grad and q.dtype in (torch.float32, torch.bfloat16):
            mask = self.bias(rows, image, q.dtype)
            lse = _flash_lse(q, k, self.value[rows], mask, self.scale)
        else:

            def bias_at(start: int, stop: int) -> torch.Tensor | None:
                return self.bias(rows, slice(image.start + start, image.start + stop), torch.float32)

            lse = _ChunkedLSE.apply(q, k, self.scale, bias_at)
        self._cache[key] = lse
        return lse

    def text_probs(self, columns: list[int]) -> torch.Tensor:
        """Head-averaged probabilities from image queries to the given text keys, for the conditional
        rows: [len(cond_rows), N_image, C], fp32.

        `columns` index the text keys (0 = first text token). The softmax runs over all keys, as the
        model's own attention does (`image_lse`); only the asked columns are computed. After a logit
        or probability edit, the edited probabilities. Differentiable, so latent guidance can take
        gradients through it.
        """
        key = tuple(columns)
        if key in self._text_probs:
            return self._text_probs[key]
        self._text_keys()
        cols = torch.tensor(columns, device=self.key.device, dtype=torch.long)
        if self.probs is not None:  # edited text probabilities of the conditional rows
            result = self.probs.index_select(-1, cols).mean(1)
        else:
            rows = self.cond_rows
            image, text = self.layout.image_q, self.layout.text_k
            q = self.query[rows][:, :, image].float()
            k = self.key[rows].index_select(2, cols + text.start).float()
            logits = (q @ k.transpose(-1, -2)) * self.scale
            bias = self.bias(rows, image, torch.float32)
            if bias is not None:
                logits = logits + bias.index_select(-1, cols + text.start)
            result = (logits - self.image_lse(rows)[..., None]).exp().mean(1)
        self._text_probs[key] = result
        return result

    def _text_keys(self) -> slice:
        if self.layout.text_k is None:
            raise ValueError(f"layer {self.layer.name} has no text keys")
        return self.layout.text_k


class _ChunkedLSE(torch.autograd.Function):
    """lse = log Σ_k exp(q·k * scale + bias) per query, fp32, in query chunks of bounded memory.

    Backward recomputes each chunk's probabilities p (as flash attention does), so no [N, S] tensor
    outlives a chunk: ∂lse/∂q = scale · p K and ∂lse/∂k = scale · pᵀ Q, weighted by the incoming
    gradient."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, scale: float, bias_at: Callable) -> torch.Tensor:
        ctx.scale, ctx.bias_at = scale, bias_at
        parts = [_logsumexp_(logits) for _, logits in _logit_chunks(q, k, scale, bias_at)]
        lse = torch.cat(parts, dim=2) if parts else q.new_zeros(*q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, lse)  # the output through save_for_backward: no reference cycle
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        q, k, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        kf = k.float().reshape(b * h, -1, d)
        grad_q = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.zeros(kf.shape, dtype=torch.float32, device=k.device)
        for part, logits in _logit_chunks(q, k, ctx.scale, ctx.bias_at):
            weights = logits.sub_(lse[:, :, part, None]).exp_().mul_(grad[:, :, part, None])
            weights = weights.view(b * h, -1, k.shape[2])
            grad_q[:, :, part] = torch.bmm(weights, kf).view(b, h, -1, d)
            grad_k.baddbmm_(weights.transpose(1, 2), q[:, :, part].float().reshape(b * h, -1, d))
        grad_q.mul_(ctx.scale)
        grad_k.mul_(ctx.scale)
        return grad_q.to(q.dtype), grad_k.view(k.shape).to(k.dtype), None, None


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, using `logits` as its scratch (no chunk-sized temporary)."""
    top = logits.amax(-1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # rows all -inf (masked) stay -inf
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _logit_chunks(q: torch.Tensor, k: torch.Tensor, scale: float, bias_at: Callable):
    """(query slice, fp32 logits of those queries over all keys, bias included), chunk by chunk.

    Every chunk is written into one buffer, which the caller may change in place but not keep: fresh
    chunk-sized tensors, freed in between other allocations, left the process's heap growing by
    about a chunk each (1.5 GB over one FLUX layer at 1024 px) before it reused them."""
    b, h, n, d = q.shape
    keys = k.shape[2]
    kt = k.float().reshape(b * h, keys, d).transpose(1, 2)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * keys))
    buffer = torch.empty(b * h, min(chunk, n), keys, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        rows = part.stop - part.start
        logits = buffer[:, :rows]
        torch.bmm(q[:, :, part].float().reshape(b * h, rows, d), kt, out=logits)
        logits = logits.view(b, h, rows, keys).mul_(scale)
        bias = bias_at(part.start, part.stop)
        yield part, (logits if bias is None else logits.add_(bias))


_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)


def _flash_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as the CPU flash kernel takes it (additive, in the query's dtype), as SDPA converts it."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _flash_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The log-sum-exp PyTorch's CPU flash-attention kernel returns beside its output."""
    if mask is not None:
        mask = mask.to(q.dtype).expand(q.shape[0], -1, q.shape[2], -1)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return lse


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def attend(call: AttentionCall, edits: list[AttentionEdit]) -> torch.Tensor:
    """Run one attention call with the edits' contributions; returns [B, H, Sq, D].

    Order: the kernel (an edit's, else the model's own), then logit and probability edits, then output
    mixes, then observers. Logit and probability edits act on the conditional rows' image queries and
    text keys (given to them as [Bc, H, N_image, T]); the change they make to the kernel's output is
    added exactly from those columns and the rows' softmax denominators (`image_lse`), so no N x N
    tensor is built, and every other row and query keeps the kernel's output bit for bit. Output
    mixes see every row and choose their own (e.g. `call.rows.perturbed`).
    """
    call.edits = edits
    try:
        return _attend(call, edits)
    finally:
        call.release()


def _attend(call: AttentionCall, edits: list[AttentionEdit]) -> torch.Tensor:
    biases = [e for e in edits if overrides(e, "logit_bias")]
    posts = [e for e in edits if overrides(e, "post_softmax")]
    out = None
    for e in edits:
        if overrides(e, "kernel"):
            out = e.kernel(call)
            if out is not None:
                break
    if out is None:
        out = call.model_output()
    rows = call.cond_rows
    if (biases or posts) and rows:
        out = _edit_text_columns(call, out, rows, biases, posts)
    for e in edits:
        if overrides(e, "mix_output"):
            out = e.mix_output(call, out)
    for e in edits:
        if overrides(e, "observe"):
            e.observe(call)
    return out


def _edit_text_columns(
    call: AttentionCall, out: torch.Tensor, rows: list[int], biases: list, posts: list
) -> torch.Tensor:
    """The kernel's output of the conditional rows' image queries after logit edits (b) and
    probability edits on the text columns T: with p = softmax(l) of the whole row and Z'/Z =
    1 - Σ_T p + Σ_T e^(l+b-lse), the other keys' probabilities are scaled by Z/Z', so
    O' = (O - p_T V_T) Z/Z' + p'_T V_T, p'_T the edited text probabilities."""
    image, text = call.layout.image_q, call._text_keys()
    lse = call.image_lse(rows)[..., None]
    logits = call.text_logits(rows)
    unedited = (logits - lse).exp()
    for e in biases:  # edits may change the logits in place: they are this call's own
        logits = e.logit_bias(call, logits)
    # e^(l+b-lse) / (Z'/Z): in place, one [Bc, H, N, T] tensor fewer, unless autograd records it
    # (latent guidance through an edited call keeps exp's output for its backward)
    grad = torch.is_grad_enabled() and logits.requires_grad
    probs = (logits - lse).exp() if grad else logits.sub_(lse).exp_()
    ratio = 1 - unedited.sum(-1, keepdim=True) + probs.sum(-1, keepdim=True)  # Z'/Z
    probs = probs / ratio if grad else probs.div_(ratio)
    for e in posts:
        probs = e.post_softmax(call, probs, unedited)
    call.probs = probs
    values = call.value[rows][:, :, text].float()
    index = torch.tensor(rows, device=out.device)
    before = out.index_select(0, index)[:, :, image].float()
    edited = (before - unedited @ values) / ratio + probs @ values
    rows_out = out.index_select(0, index)
    rows_out[:, :, image] = edited.to(out.dtype)
    return out.index_copy(0, index, rows_out)
