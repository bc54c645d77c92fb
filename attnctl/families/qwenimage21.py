"""Qwen-Image 2.1: `QwenImage21Transformer2DModel`, single-stream blocks over one joint sequence
[prefix ; target image], the prefix being the Qwen3-VL text (condition images' tokens in their slots).

Attention is block-causal; `QwenImage21AttnProcessor` runs it as kernel calls with a KV cache. On a
prefill (first step) one call per prefix segment (keys [0, end): the target takes no part in it),
then the target image's call over all keys; on a decode (later steps) only the target's call, over
[cached prefix ; target]. Controls see only the target's call: image queries = its queries, text
keys = the prefix. Text keys: `prompt_template_t2i.format(prompt)` less its system turn (`_drop_idx`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers, attention_modules

_FLEX = "QwenImage21FlexAttnProcessor"


class QwenImage21Adapter(FamilyAdapter):
    name = "qwenimage21"
    title = "Qwen-Image 2.1"
    denoisers = ("QwenImage21Transformer2DModel",)
    processors = ("QwenImage21AttnProcessor",)
    seam = "dispatch"
    refuses = {  # noqa: RUF012 - read only
        "Layout": "region prompts would join the causal text prefix (and img_mask), shifting the image's RoPE",
    }

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        _refuse_flex(m.processor for m in attention_modules(denoiser).values())
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        for denoiser in session.denoisers:
            _refuse_flex(m.processor for m in attention_modules(denoiser).values())
        target = tuple(inputs["img_shapes"][0][-1])  # condition images first, the target last
        joint = int(torch.where(inputs["img_mask"][0], 4, 1).sum())  # a VLM image slot: 2x2 tokens
        session.grid, session.text_len = target, joint - math.prod(target)  # text_len: the prefix

    def seam_layout(
        self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int
    ) -> Layout | None:
        prefix, (f, h, w) = session.text_len, session.grid
        if queries != f * h * w or keys != prefix + queries:
            return None  # a prefix segment's call: no target-image query
        return Layout(slice(0, queries), slice(prefix, keys), slice(0, prefix), f, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return chat.positions(
            pipe.processor, pipe.prompt_template_t2i, prompt, word, occurrence, drop=pipe._drop_idx
        )

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's tokens after `<|im_start|>user\\n` (key 0: `<|im_start|>`); end: `<|im_end|>`."""
        return chat.span(pipe.processor, pipe.prompt_template_t2i, prompt, drop=pipe._drop_idx)


def _refuse_flex(processors: Any) -> None:
    if any(_FLEX in (type(p).__name__, type(getattr(p, "original", p)).__name__) for p in processors):
        raise ValueError(f"attnctl does not control {_FLEX}: its prefill is one flex call under a BlockMask")
