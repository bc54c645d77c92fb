"""Model-family adapters: the only model-specific code in attnctl."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, LayerInfo, Layout, Prepared, attention_modules
from .chroma import ChromaAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .hunyuanvideo import HunyuanVideoAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter
from .zimage import ZImageAdapter

ADAPTERS: list[FamilyAdapter] = [
    UNetAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    WanAdapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
    ChromaAdapter(),
    Flux2Adapter(),
    QwenImageAdapter(),
    ZImageAdapter(),
]


def adapter_for(denoiser: torch.nn.Module) -> FamilyAdapter:
    """The adapter of a denoiser's family: by its class (or a base class), else by the processors of
    its attention modules (a renamed or re-wrapped model of a known family)."""
    classes = {c.__name__ for c in type(denoiser).__mro__}
    for adapter in ADAPTERS:
        if classes & set(adapter.denoisers):
            return adapter
    processors = {type(m.processor).__name__ for m in attention_modules(denoiser).values()}
    for adapter in ADAPTERS:
        if processors and processors <= set(adapter.processors):
            return adapter
    supported = "; ".join(f"{a.title} ({', '.join(a.denoisers)})" for a in ADAPTERS)
    raise ValueError(f"attnctl does not support {type(denoiser).__name__}; supported families: {supported}")


__all__ = ["ADAPTERS", "FamilyAdapter", "LayerInfo", "Layout", "Prepared", "adapter_for"]
