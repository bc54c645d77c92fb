"""CogView4: `CogView4Transformer2DModel` with `CogView4AttnProcessor` (SDPA). Every block's `attn1`
is joint attention over [text, image], text first (RoPE on the image part only; the pipeline passes
no mask, so padding is attended). Image tokens: the latent's 2x2 patches, row-major.

Text keys: GLM-4 tokens `[gMASK] <sop> prompt`, padded on the LEFT to the batch's longest prompt and
then to a multiple of 16, so token p of `tokenizer(prompt)` is key p + pad. A call whose prompts pad
to another length than each alone (lengths crossing a multiple of 16, or a `max_sequence_length`
below the default that cuts them) raises: their positions would shift.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import prompt_positions, token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class CogView4Adapter(FamilyAdapter):
    name = "cogview4"
    title = "CogView4"
    denoisers = ("CogView4Transformer2DModel",)
    processors = ("CogView4AttnProcessor",)
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        p = session.denoisers[0].config.patch_size
        session.grid = (1, inputs["hidden_states"].shape[-2] // p, inputs["hidden_states"].shape[-1] // p)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        text, (_, h, w) = session.text_len, session.grid
        if text is None or queries != text + h * w:
            raise ValueError(f"{layer.name}: {queries} tokens are not {text} text tokens and a {h}x{w} grid")
        prompts = set(session.prompts()) if session.rows.cond and session.prompt is not None else ()
        padded = {_padded(session.pipe, p)[1] for p in prompts}
        if len(padded) > 1 or (padded and padded.pop() > text):  # tokens appended after them may follow
            raise ValueError(
                f"{layer.name}: the prompts of this call pad to different lengths, or max_sequence_length cut "
                "them: positions would shift; attnctl needs prompts of one padded length, uncut"
            )
        image = slice(text, queries)
        return Layout(image, image, slice(0, text), 1, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        limit, (pad, _) = _max_length(pipe), _padded(pipe, prompt)
        return [pad + p for p in token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=limit)]

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """The prompt's tokens, and `[gMASK] <sop>` before them; no end token, padding in neither."""
        pad, words = (
            _padded(pipe, prompt)[0],
            prompt_positions(pipe.tokenizer, prompt, max_length=_max_length(pipe)),
        )
        return [pad + p for p in words], list(range(pad, pad + words[0]))


def _max_length(pipe: Any) -> int:
    return inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default


def _padded(pipe: Any, prompt: str) -> tuple[int, int]:
    """(left padding, padded length) of the prompt encoded alone, as `_get_glm_embeds` pads it."""
    n = len(pipe.tokenizer(prompt, truncation=True, max_length=_max_length(pipe))["input_ids"])
    return (16 - n % 16) % 16, n + (16 - n % 16) % 16
