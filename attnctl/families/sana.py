"""Sana: `SanaTransformer2DModel`. `attn1`: linear self-attention over the image tokens (ReLU
kernels and matmuls: no softmax, no kernel call); `attn2`: cross-attention to the Gemma-2 text via
SDPA, padding masked by an additive key bias. Image tokens: the latent's patches, row-major.

Text keys: the pipeline lower-cases and strips the prompt, prepends the complex human instruction
(CHI, on by default), tokenizes to n_chi + L - 2 tokens and keeps token 0 (`<bos>`) and the last
L - 1: key j >= 1 is token j + n_chi - 2 (the prompt starts at key 1; without CHI too). A call's own
CHI and `max_sequence_length` are not seen: `__call__`'s defaults are (shorter L: checked by the session).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import prompt_positions, token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers

_LINEAR = (
    "Sana's self-attention is linear (ReLU kernels, no softmax kernel call): no attention map to perturb"
)


class SanaAdapter(FamilyAdapter):
    name = "sana"
    title = "Sana"
    denoisers = ("SanaTransformer2DModel",)
    processors = ("SanaAttnProcessor2_0", "SanaLinearAttnProcessor2_0")
    seam = "sdpa"  # attn2's kernel; attn1 calls none
    refuses = {"SoftPAG": _LINEAR, "PAG": _LINEAR}  # noqa: RUF012 - read only

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(
            denoiser, lambda path, module: "cross" if module.is_cross_attention else "self"
        )

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        p = session.denoisers[0].config.patch_size
        session.grid = (1, inputs["hidden_states"].shape[-2] // p, inputs["hidden_states"].shape[-1] // p)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        _, h, w = session.grid
        if queries != h * w:
            raise ValueError(f"{layer.name}: {queries} queries are not the {h}x{w} token grid of the latent")
        if layer.kind == "cross":  # q: image, k: text
            return Layout(slice(0, queries), slice(0, 0), slice(0, keys), 1, h, w)
        return Layout(slice(0, queries), slice(0, queries), None, 1, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        template, shift, limit = _text_template(pipe)
        found = token_positions(
            pipe.tokenizer, prompt.lower().strip(), word, occurrence, max_length=limit, template=template
        )
        return [p - shift for p in found]

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """The prompt's tokens, and `<bos>` (key 0); Gemma adds no end token."""
        template, shift, limit = _text_template(pipe)
        found = prompt_positions(pipe.tokenizer, prompt.lower().strip(), template=template, max_length=limit)
        return [p - shift for p in found], [0]


def _text_template(pipe: Any) -> tuple[str, int, int]:
    """(template, shift, tokens kept) of `SanaPipeline.__call__`'s defaults: text key = token - shift."""
    params = inspect.signature(type(pipe).__call__).parameters
    chi = params["complex_human_instruction"].default if "complex_human_instruction" in params else None
    length = params["max_sequence_length"].default if "max_sequence_length" in params else 300
    if not chi:
        return "{}", 0, length
    head = "\n".join(chi)
    n_chi = len(pipe.tokenizer.encode(head))
    return head + "{}", n_chi - 2, n_chi + length - 2
