"""Qwen-Image (and its Edit variants, same denoiser): `QwenImageTransformer2DModel`, double-stream
blocks whose `QwenDoubleStreamAttnProcessor2_0` attends jointly over [text ; image] (text first).

Image tokens: the generated image's 2x2 patches (`img_shapes[0][0]` = (frames, h, w)), then the Edit
pipelines' condition images (keys, no image queries). Text keys: the Qwen2.5-VL hidden states of
`prompt_template_encode.format(prompt)` with the template's first `prompt_template_encode_start_idx`
tokens (its system turn) dropped, padded to the batch's longest prompt with a boolean key mask.
"""

from __future__ import annotations

from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class QwenImageAdapter(FamilyAdapter):
    name = "qwenimage"
    title = "Qwen-Image (incl. Edit)"
    denoisers = ("QwenImageTransformer2DModel",)
    processors = ("QwenDoubleStreamAttnProcessor2_0",)
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        first = inputs["img_shapes"][0]  # per sample: [generated (f, h, w), condition images...]
        session.grid = tuple(first[0] if isinstance(first, list) else first)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        text, (f, h, w) = session.text_len, session.grid
        if text + f * h * w > queries:
            raise ValueError(
                f"{layer.name}: {queries} tokens do not hold {text} text and {f}x{h}x{w} image tokens"
            )
        return Layout(slice(text, text + f * h * w), slice(text, keys), slice(0, text), f, h, w)

    def append_text(self, kwargs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
        """Also extends `encoder_hidden_states_mask` where the call has one: region tokens are kept."""
        mask = kwargs.get("encoder_hidden_states_mask")
        kwargs = super().append_text(kwargs, tokens)
        if mask is not None:
            kwargs["encoder_hidden_states_mask"] = torch.cat([mask, mask.new_ones(*tokens.shape[:2])], 1)
        return kwargs

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return chat.positions(pipe.tokenizer, _template(pipe), prompt, word, occurrence, **_options(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's tokens (the first keys); end: `<|im_end|>`; no start token is kept."""
        return chat.span(pipe.tokenizer, _template(pipe), prompt, **_options(pipe))


def _template(pipe: Any) -> str:
    template = pipe.prompt_template_encode
    if "<|image_pad|>" in template:
        raise NotImplementedError(
            f"attnctl maps prompt words to Qwen-Image's text keys for its text-to-image template; "
            f"{type(pipe).__name__} puts the condition image's vision tokens before the prompt"
        )
    return template


def _options(pipe: Any) -> dict[str, Any]:
    drop = pipe.prompt_template_encode_start_idx
    return {"specials": True, "drop": drop, "max_length": pipe.tokenizer_max_length + drop}
