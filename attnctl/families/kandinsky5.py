"""Kandinsky 5 text-to-video: `Kandinsky5Transformer3DModel` with `Kandinsky5AttnProcessor`.

Each visual block has `self_attention` over the video tokens (3D RoPE) and `cross_attention` from
the video tokens to the text; the text blocks (`text_transformer_blocks`) refine the text alone (no
layer here). Video tokens: the latent [B, F, H, W, C] (channels last) in (1, 2, 2) patches,
frame-major, row-major (`fractal_flatten` without NABLA's block order). Text keys: the Qwen2.5-VL
hidden states of `prompt_template.format(prompt)` from `prompt_template_encode_start_idx` on, unmasked.
CFG: a forward of the prompt, then one of the negative prompt, unnamed.
"""

from __future__ import annotations

from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import self_or_cross_layout, video_grid


class Kandinsky5Adapter(FamilyAdapter):
    name = "kandinsky5"
    title = "Kandinsky 5 (text-to-video)"
    denoisers = ("Kandinsky5Transformer3DModel",)
    processors = ("Kandinsky5AttnProcessor",)
    video = True
    seam = "dispatch"
    cfg_forwards = ("cond", "uncond")
    refuses = dict.fromkeys(  # noqa: RUF012 - read only
        ("AttentionRegulation", "AttendAndExcite", "AStar"),
        "not working on this family yet: the latent guidance's maps do not line up with its latent, and "
        "Attention Regulation was not run at a size it accepts (8x8 maps)",
    )

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        kinds = {"self_attention": "self", "cross_attention": "cross"}
        return attention_layers(
            denoiser,
            lambda path, module: kinds[path.rsplit(".", 1)[1]] if path.startswith("visual_") else None,
            heads="num_heads",
        )

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        if inputs.get("sparse_params") is not None:
            raise ValueError(
                "attnctl controls Kandinsky 5's regular attention, not NABLA sparse attention "
                "(attention_type='nabla': block-ordered tokens, a flex-attention block mask)"
            )
        patch = session.denoisers[0].config.patch_size
        session.grid = video_grid(inputs["hidden_states"].shape[1:4], tuple(patch))

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        return self_or_cross_layout(session, layer, queries, keys)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return chat.positions(
            pipe.tokenizer, pipe.prompt_template, _clean(prompt), word, occurrence, **_opts(pipe)
        )

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's tokens (the first keys); end: `<|im_end|>`; the crop keeps no start token."""
        return chat.span(pipe.tokenizer, pipe.prompt_template, _clean(prompt), **_opts(pipe))


def _clean(prompt: str) -> str:
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import prompt_clean

    return prompt_clean(prompt)  # what the pipeline encodes


def _opts(pipe: Any) -> dict[str, Any]:
    crop = pipe.prompt_template_encode_start_idx
    return {"drop": crop, "max_length": crop + chat.default_length(pipe)}
