"""AuraFlow: `AuraFlowTransformer2DModel` with `AuraFlowAttnProcessor2_0` (SDPA).

Every attention is joint over [8 register tokens ; text ; image]: the MMDiT blocks
(`joint_transformer_blocks.N.attn`) project the context ([registers ; text]) and the image apart and
concatenate them context first; the single DiT blocks (`single_transformer_blocks.N.attn`) run on
the same concatenation. The registers are learned tokens the model puts before the text: they are
not prompt tokens, so they are neither text nor image keys here (controls leave them as they are).
The text is the T5 (Pile-T5) tokens padded to `max_sequence_length`, padding zeroed, not masked.
Image tokens are the latent's (H/patch, W/patch) patches, row-major.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class AuraFlowAdapter(FamilyAdapter):
    name = "auraflow"
    title = "AuraFlow"
    denoisers = ("AuraFlowTransformer2DModel",)
    processors = ("AuraFlowAttnProcessor2_0", "FusedAuraFlowAttnProcessor2_0")
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        patch = session.denoisers[0].config.patch_size
        sample = inputs["hidden_states"]  # latent [B, C, H, W]
        session.grid = (1, sample.shape[-2] // patch, sample.shape[-1] // patch)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        registers = session.denoisers[0].register_tokens.shape[1]
        text, (_, h, w) = session.text_len, session.grid
        start = registers + text
        if start + h * w != queries:
            raise ValueError(
                f"{layer.name}: {queries} tokens are not {registers} registers, {text} text tokens and "
                f"a {h}x{w} token grid"
            )
        image = slice(start, queries)
        return Layout(image, image, slice(registers, start), 1, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=_default_length(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        return special_span(pipe.tokenizer, prompt, _default_length(pipe))


def special_span(
    tokenizer: Any, text: str, max_length: int | None, offset: int = 0
) -> tuple[list[int], list[int]]:
    """(positions of the text's own tokens, positions of the special tokens the tokenizer adds,
    e.g. T5's `</s>` or Llama's BOS) in `tokenizer(text)` truncated at `max_length`, plus `offset`."""
    ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
    special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    words = [offset + i for i, s in enumerate(special) if not s]
    return words, [offset + i for i, s in enumerate(special) if s]


def _default_length(pipe: Any) -> int | None:
    """The pipeline call's default `max_sequence_length` (AuraFlow: 256); a shorter call is caught
    against the text length the denoiser receives."""
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return None if param is None else param.default
