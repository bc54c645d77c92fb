"""The one attention processor attnctl installs, and the kernel seam where it takes q, k and v.

Two ways to reach a layer's q, k, v, chosen by its family adapter:
- **the kernel seam** (`adapter.seam` is "dispatch" or "sdpa"): the model's own, unmodified processor
  runs, and attnctl receives q, k, v at its attention-kernel call — diffusers'
  `dispatch_attention_fn` (q/k/v [B, S, H, D], already projected, normed and rotated), or
  `F.scaled_dot_product_attention` ([B, H, S, D]) for processors that call SDPA directly. The
  kernel's name is replaced in the module that defines the processor, for as long as a session
  needs it; the replacement passes every call straight through unless attnctl's processor of a
  controlled layer is running (a context variable), so other models, other threads and idle layers
  are untouched. The adapter only declares where text and image tokens sit in each call
  (`seam_layout`). As ComfyUI reaches every model through one attention function, one seam reaches
  every family that goes through it;
- **`prepare`**: the adapter re-does the processor's work up to the kernel and finishes it (the
  UNet, whose IP-Adapter streams the layout control takes over).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..families.base import FamilyAdapter, LayerInfo, Prepared, sdpa
from .attention import AttentionCall, attend

SEAMS = ("dispatch", "sdpa")
# The attention-kernel parameters both seams share, in positional order.
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_BACKEND_ATTRS = ("_attention_backend", "_parallel_config")


class AttnctlProcessor:
    """Stands in for a layer's processor while controls are installed; calls the original when idle.

    diffusers filters the keyword arguments it passes by the processor's `__call__` signature, so
    this processor exposes the signature of the one it replaces. A backend set on it (the model's
    `set_attention_backend` inside the block) reaches the original processor too.
    """

    def __init__(self, original: Any, session: Any, layer: LayerInfo, adapter: FamilyAdapter):
        self.original = original
        self.session = session
        self.layer = layer
        self.adapter = adapter
        # Keep the model's attention backend choice on this layer (principle: fast path untouched).
        for name in _BACKEND_ATTRS:
            object.__setattr__(self, name, getattr(original, name, None))
        call = functools.partial(type(self).__call__, self)
        call.__signature__ = inspect.signature(original.__call__)  # type: ignore[attr-defined]
        self.__call__ = call  # what inspect.signature(processor.__call__) sees

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BACKEND_ATTRS and hasattr(self, "original"):
            setattr(self.original, name, value)
        object.__setattr__(self, name, value)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        edits = self.session.edits_for(self.layer)
        if not edits:
            return self.original(attn, hidden_states, *args, **kwargs)
        if self.adapter.seam is not None:
            token = _CAPTURE.set(_Capture(self.session, self.layer, self.adapter, edits))
            try:
                return self.original(attn, hidden_states, *args, **kwargs)
            finally:
                _CAPTURE.reset(token)
        prepared = self.adapter.prepare(
            self.session, self.layer, attn, hidden_states, *args, processor=self.original, **kwargs
        )
        kernel = self.adapter.kernel_for(self)
        native = kernel is sdpa and prepared.query.device.type == "cpu"
        call = AttentionCall(self.session, self.layer, prepared, kernel, native=native)
        return prepared.finish(attend(call, edits))


def open_seam(processor: Any, seam: str) -> Callable[[], None]:
    """Route the attention kernel that `processor` calls through attnctl; returns the undo.

    The kernel name is replaced in the module that defines the processor's `__call__` (Chroma's
    processor is FLUX's, defined in transformer_flux). Sessions share one replacement per module,
    counted, so nested or concurrent sessions restore in any order."""
    module = sys.modules[type(processor).__call__.__module__]
    name = "dispatch_attention_fn" if seam == "dispatch" else "F"
    current = getattr(module, name, None)
    ok = callable(current) if seam == "dispatch" else current is torch.nn.functional or _is_proxy(current)
    if not ok:
        raise ValueError(
            f"{type(processor).__name__} does not call the attention kernel attnctl captures "
            f"({'dispatch_attention_fn' if seam == 'dispatch' else 'F.scaled_dot_product_attention'} in "
            f"{module.__name__}); attnctl controls diffusers' own processors"
        )
    key = (module.__name__, name)
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            original = current
            patched = _dispatch_seam(original) if seam == "dispatch" else _FunctionalSeam(original)
            entry = _OPEN[key] = [original, 0]
            setattr(module, name, patched)
        entry[1] += 1

    def close() -> None:
        with _OPEN_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                setattr(module, name, entry[0])
                del _OPEN[key]

    return close


_OPEN: dict[tuple[str, str], list] = {}
_OPEN_LOCK = threading.Lock()


class _Capture:
    """The kernel calls of one processor call of a controlled layer."""

    def __init__(self, session: Any, layer: LayerInfo, adapter: FamilyAdapter, edits: list):
        self.session, self.layer, self.adapter, self.edits = session, layer, adapter, edits
        self.calls = 0

    def run(self, seam: str, kernel: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """One kernel call: the edits run on it where the adapter places its tokens, else it runs as is."""
        index, self.calls = self.calls, self.calls + 1
        params = dict(zip(_PARAMS, args, strict=False)) | kwargs
        extra = {k: v for k, v in params.items() if k not in _PARAMS}
        if len(args) > len(_PARAMS) or params.get("dropout_p") or params.get("is_causal"):
            return kernel(*args, **kwargs)
        query, key, value = params["query"], params["key"], params["value"]
        seq = 1 if seam == "dispatch" else 2
        layout = self.adapter.seam_layout(self.session, self.layer, index, query.shape[seq], key.shape[seq])
        if layout is None:
            return kernel(*args, **kwargs)
        heads = _heads_first if seam == "dispatch" else _same
        q, k, v = heads(query), heads(key), heads(value)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves several queries
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        mask = params.get("attn_mask")
        call_mask = mask[:, None, None, :] if mask is not None and mask.dim() == 2 else mask

        def model_kernel(q, k, v, m, scale):  # noqa: ANN001, ANN202 - f(q, k, v, mask, scale) on [B, H, S, D]
            out = kernel(
                heads(q), heads(k), heads(v), attn_mask=mask if m is call_mask else m, scale=scale, **extra
            )
            return heads(out)

        prepared = Prepared(q, k, v, layout, finish=_same, mask=call_mask, scale=params.get("scale"))
        native = q.device.type == "cpu" and (seam == "sdpa" or _native_dispatch(extra))
        call = AttentionCall(self.session, self.layer, prepared, model_kernel, native=native)
        return heads(attend(call, self.edits))


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("attnctl_capture", default=None)


def _dispatch_seam(original: Callable) -> Callable:
    @functools.wraps(original)
    def dispatch_attention_fn(*args: Any, **kwargs: Any) -> Any:
        capture = _CAPTURE.get()
        if capture is None:
            return original(*args, **kwargs)
        return capture.run("dispatch", original, args, kwargs)

    dispatch_attention_fn.attnctl_seam = True  # type: ignore[attr-defined]
    return dispatch_attention_fn


class _FunctionalSeam:
    """`torch.nn.functional` as a processor module sees it while a session is open: the same, but
    `scaled_dot_product_attention` goes through attnctl."""

    def __init__(self, functional: Any):
        self._functional = functional
        sdpa = functional.scaled_dot_product_attention

        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
            capture = _CAPTURE.get()
            if capture is None:
                return sdpa(*args, **kwargs)
            return capture.run("sdpa", sdpa, args, kwargs)

        self.scaled_dot_product_attention = scaled_dot_product_attention

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)


def _native_dispatch(kwargs: dict) -> bool:
    """Whether a dispatch_attention_fn call runs PyTorch's own SDPA: diffusers' native backend, by
    name or as the active default, on the whole sequence (no context-parallel sharding)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = kwargs.get("backend")
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return kwargs.get("parallel_config") is None and str(getattr(backend, "value", backend)) == "native"


def _is_proxy(value: Any) -> bool:
    return isinstance(value, _FunctionalSeam)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] <-> [B, H, S, D]."""
    return x.transpose(1, 2)


def _same(x: Any) -> Any:
    return x
