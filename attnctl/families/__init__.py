"""Model-family adapters: the only model-specific code in attnctl."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, LayerInfo, Layout, Prepared
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

ADAPTERS: list[FamilyAdapter] = [
    UNetAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    WanAdapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
]

SUPPORTED = (
    "Stable Diffusion 1.x/2.x/XL (UNet2DConditionModel), SD3 (SD3Transformer2DModel), "
    "FLUX (FluxTransformer2DModel), Wan (WanTransformer3DModel), CogVideoX (CogVideoXTransformer3DModel), "
    "HunyuanVideo (HunyuanVideoTransformer3DModel)"
)


def adapter_for(denoiser: torch.nn.Module) -> FamilyAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(denoiser):
            return adapter
    raise ValueError(f"attnctl does not support {type(denoiser).__name__}; supported families: {SUPPORTED}")


__all__ = ["ADAPTERS", "FamilyAdapter", "LayerInfo", "Layout", "Prepared", "adapter_for", "SUPPORTED"]
