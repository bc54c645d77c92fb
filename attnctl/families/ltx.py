"""LTX-Video: `LTXVideoTransformer3DModel` with `LTXAttention` modules and `LTXVideoAttnProcessor`.

Each block has `attn1`, self-attention over the video tokens (RoPE), and `attn2`, cross-attention from
the video tokens to the T5 text (padded to `max_sequence_length`; the padding is hidden by an additive
-10000 key bias). The latent comes packed, [B, S, C], with the token grid as the `num_frames`,
`height`, `width` arguments (LTXPipeline, LTXImageToVideoPipeline); tokens are frame-major, row-major.
LTXConditionPipeline passes `video_coords` and appends conditioning tokens instead: not supported.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import self_or_cross_layout


class LTXAdapter(FamilyAdapter):
    name = "ltx"
    title = "LTX-Video"
    denoisers = ("LTXVideoTransformer3DModel",)
    processors = ("LTXVideoAttnProcessor",)
    video = True
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "cross" if path.endswith("attn2") else "self")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        if inputs.get("num_frames") is None:
            raise ValueError(
                "LTXVideoTransformer3DModel was called without num_frames/height/width (LTXConditionPipeline's "
                "video_coords and conditioning tokens); attnctl supports LTXPipeline and LTXImageToVideoPipeline"
            )
        config = session.denoisers[0].config
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        dims = (inputs["num_frames"], inputs["height"], inputs["width"])
        session.grid = tuple(int(d) // p for d, p in zip(dims, patch, strict=True))

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        return self_or_cross_layout(session, layer, queries, keys)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=default_text_len(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """T5 has no start-of-text token: the words, then `</s>`; padding follows, hidden."""
        m = len(pipe.tokenizer(prompt, truncation=True, max_length=default_text_len(pipe))["input_ids"])
        return list(range(m - 1)), [m - 1]


def default_text_len(pipe: Any) -> int:
    """The pipeline's default `max_sequence_length` (LTXPipeline: 128), where it truncates the prompt."""
    default = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return 128 if default is None else int(default.default)
