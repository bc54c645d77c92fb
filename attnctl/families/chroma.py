"""Chroma: `ChromaTransformer2DModel`, FLUX.1's blocks with FLUX's own `FluxAttention` /
`FluxAttnProcessor` (so its kernel calls go through `transformer_flux`), without CLIP or guidance input.

Token order as FLUX: [text ; image] in double and single blocks, image tokens the packed latent's 2x2
patches with `img_ids` (0, row, col). Text keys are the T5 tokens, padded to `max_sequence_length`.
Every block passes a float 0/1 mask [B, 1, S, S] (the prompt's tokens and one pad token kept):
attention adds it to the logits as it is (it does not mask), and attnctl hands it on unchanged.
The pipeline runs the prompt's forward and then the negative prompt's at each step, unnamed.
"""

from __future__ import annotations

from typing import Any

from ..core.tokens import token_positions
from .flux import FluxAdapter


class ChromaAdapter(FluxAdapter):
    name = "chroma"
    title = "Chroma"
    denoisers = ("ChromaTransformer2DModel",)
    processors = ("FluxAttnProcessor",)
    cfg_forwards = ("cond", "uncond")
    refuses = {  # noqa: RUF012 - read only
        "Layout": "Chroma's blocks take a mask per pair of tokens [B, 1, S, S], and Layout's grouped "
        "kernels honour only masks of keys alike for every query",
    }

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """T5: the words, then `</s>`; the pad token after it, which the mask keeps, is in neither."""
        m = len(pipe.tokenizer(prompt, truncation=True)["input_ids"])
        return list(range(m - 1)), [m - 1]
