"""Model-family adapters: the only model-specific code in attnctl."""

from __future__ import annotations

import torch

from .auraflow import AuraFlowAdapter
from .base import FamilyAdapter, LayerInfo, Layout, Prepared, attention_modules
from .chroma import ChromaAdapter
from .cogvideox import CogVideoXAdapter
from .cogview4 import CogView4Adapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .hidream import HiDreamAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .hunyuanvideo15 import HunyuanVideo15Adapter
from .kandinsky5 import Kandinsky5Adapter
from .ltx import LTXAdapter
from .ltx2 import LTX2Adapter
from .lumina2 import Lumina2Adapter
from .mochi import MochiAdapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .qwenimage21 import QwenImage21Adapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .skyreelsv2 import SkyReelsV2Adapter
from .unet import UNetAdapter
from .wan import WanAdapter
from .wanvace import WanVACEAdapter
from .zimage import ZImageAdapter

ADAPTERS: list[FamilyAdapter] = [
    UNetAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    Flux2Adapter(),
    ChromaAdapter(),
    QwenImageAdapter(),
    QwenImage21Adapter(),
    ZImageAdapter(),
    SanaAdapter(),
    PixArtAdapter(),
    Lumina2Adapter(),
    CogView4Adapter(),
    AuraFlowAdapter(),
    HiDreamAdapter(),
    WanAdapter(),
    WanVACEAdapter(),
    SkyReelsV2Adapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
    LTXAdapter(),
    MochiAdapter(),
    HunyuanVideo15Adapter(),
    Kandinsky5Adapter(),
    LTX2Adapter(),
]


def adapter_for(denoiser: torch.nn.Module) -> FamilyAdapter:
    """The adapter of a denoiser's family: by its class (or a base class), else by the processors of
    its attention modules (a renamed or re-wrapped model of a known family; an adapter lists only
    processor classes of its own family, never diffusers' generic ones such as AttnProcessor2_0)."""
    classes = {c.__name__ for c in type(denoiser).__mro__}
    for adapter in ADAPTERS:
        if classes & set(adapter.denoisers):
            return adapter
    processors = {type(m.processor).__name__ for m in attention_modules(denoiser).values()}
    for adapter in ADAPTERS:
        if processors & set(adapter.processors):
            return adapter
    supported = "; ".join(f"{a.title} ({', '.join(a.denoisers)})" for a in ADAPTERS)
    raise ValueError(f"attnctl does not support {type(denoiser).__name__}; supported families: {supported}")


__all__ = ["ADAPTERS", "FamilyAdapter", "LayerInfo", "Layout", "Prepared", "adapter_for"]
