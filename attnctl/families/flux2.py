"""FLUX.2 [dev] / [klein]: `Flux2Transformer2DModel`, double-stream blocks (`Flux2AttnProcessor`) and
single-stream blocks with fused projections (`Flux2ParallelSelfAttnProcessor`).

As FLUX.1, every attention is joint over [text ; generated image ; reference images]; `img_ids` are
(t, row, col, l): t = 0 for the generated image, 10, 20, ... for the reference images appended after
it (keys, no image queries). Text keys: the chat encoder's tokens, padded to `max_sequence_length`,
no mask; [dev] tokenizes Mistral's system + user turn as rendered, [klein] a Qwen3 user turn with
the tokenizer's special tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout
from .flux import FluxAdapter


class Flux2Adapter(FluxAdapter):
    name = "flux2"
    title = "FLUX.2 [dev] / [klein]"
    denoisers = ("Flux2Transformer2DModel",)
    processors = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        if queries != keys:  # Flux2KleinKVPipeline's processors: reference keys without their queries
            raise ValueError(
                f"{layer.name}: attnctl does not control FLUX.2's key-value-cached reference images"
            )
        return super().seam_layout(session, layer, call, queries, keys)

    def append_text(self, kwargs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
        """Also extends `txt_ids` (0, 0, 0, l): the appended tokens continue the text's positions l."""
        ids, n = kwargs["txt_ids"], kwargs["encoder_hidden_states"].shape[1]
        extra = ids.new_zeros(*ids.shape[:-2], tokens.shape[1], ids.shape[-1])
        extra[..., 3] = torch.arange(n, n + tokens.shape[1], device=ids.device)
        return {**FamilyAdapter.append_text(self, kwargs, tokens), "txt_ids": torch.cat([ids, extra], -2)}

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        template, options = _template(pipe)
        return chat.positions(pipe.tokenizer, template, prompt, word, occurrence, **options)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's tokens; start/end: `<s>` and `[/INST]` ([klein]: `<|im_end|>`)."""
        template, options = _template(pipe)
        return chat.span(pipe.tokenizer, template, prompt, **options)


def _template(pipe: Any) -> tuple[str, dict[str, Any]]:
    """The pipeline's chat template (with `{}`) and how it tokenizes it, for `chat.positions`."""
    options = {"specials": True, "max_length": chat.default_length(pipe)}
    if not hasattr(pipe, "_get_mistral_3_small_prompt_embeds"):  # [klein]: a Qwen3 user turn
        return chat.user_turn(pipe.tokenizer, enable_thinking=False), options
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    def render(prompt: str) -> str:  # [dev]: a system and a user turn, tokenized as rendered
        return pipe.tokenizer.apply_chat_template(
            format_input([prompt], pipe.system_message)[0], tokenize=False
        )

    return chat.render_template(render), {**options, "specials": False}
