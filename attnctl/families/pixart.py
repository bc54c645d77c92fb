"""PixArt-Σ / PixArt-α: `PixArtTransformer2DModel` with diffusers' `Attention` modules.

Each `transformer_blocks.N` has `attn1`, self-attention over the image tokens, and `attn2`,
cross-attention to the T5 text, both with `AttnProcessor2_0` (SDPA). The pipeline pads the T5 text to
`max_sequence_length` and passes its padding as `encoder_attention_mask`, which reaches `attn2` as an
additive key mask. It tokenises the prompt after `_text_preprocessing` (lower case; with bs4 and ftfy
installed, caption cleaning). Image tokens are the latent's (H/patch, W/patch) patches, row-major.
Matched by class name only: `AttnProcessor2_0` is the UNet's processor too.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class PixArtAdapter(FamilyAdapter):
    name = "pixart"
    title = "PixArt-Σ / PixArt-α"
    denoisers = ("PixArtTransformer2DModel",)
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(
            denoiser, lambda path, module: "cross" if module.is_cross_attention else "self"
        )

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        patch = session.denoisers[0].config.patch_size
        sample = inputs["hidden_states"]  # latent [B, C, H, W]
        session.grid = (1, sample.shape[-2] // patch, sample.shape[-1] // patch)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        _, h, w = session.grid
        if queries != h * w:
            raise ValueError(f"{layer.name}: {queries} queries are not the {h}x{w} token grid of the latent")
        if layer.kind == "self":
            return Layout(slice(0, queries), slice(0, queries), None, 1, h, w)
        return Layout(slice(0, queries), slice(0, 0), slice(0, keys), 1, h, w)

    def cfg_scale(self, pipe: Any) -> float:
        """PixArt's pipelines keep `guidance_scale` a local of their call, not an attribute."""
        return float(_call_local(pipe, "guidance_scale"))

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        text, limit = _encoded_text(pipe, prompt)
        return token_positions(pipe.tokenizer, text, word, occurrence, max_length=limit)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """T5 has no start-of-text token: the words, then `</s>`."""
        text, limit = _encoded_text(pipe, prompt)
        m = len(pipe.tokenizer(text, truncation=True, max_length=limit)["input_ids"])
        return list(range(m - 1)), [m - 1]


def _encoded_text(pipe: Any, prompt: str) -> tuple[str, int]:
    """The prompt as the pipeline tokenises it (its default `clean_caption`) and its default
    `max_sequence_length` (Σ: 300, α: 120); a shorter call is caught against the text length."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    params = inspect.signature(type(pipe).__call__).parameters
    clean = "clean_caption" in params and params["clean_caption"].default
    clean = bool(clean) and is_bs4_available() and is_ftfy_available()  # else the pipeline falls back
    limit = params["max_sequence_length"].default if "max_sequence_length" in params else None
    return pipe._text_preprocessing(prompt, clean_caption=clean)[0], limit


def _call_local(pipe: Any, name: str) -> Any:
    """A local variable of the pipeline call that is running (the frame of a method of `pipe` that
    holds it), for pipelines that keep e.g. `guidance_scale` local rather than on the pipeline
    (PixArt)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            names = frame.f_locals
            if names.get("self") is pipe and name in names:
                return names[name]
            frame = frame.f_back
    finally:
        del frame
    raise ValueError(
        f"{type(pipe).__name__} does not tell its {name}; attnctl needs it to fold the guidance in"
    )
