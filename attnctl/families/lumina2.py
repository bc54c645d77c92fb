"""Lumina-Image 2.0: `Lumina2Transformer2DModel` with `Lumina2AttnProcessor2_0` (SDPA, grouped-query
keys repeated to every head before the kernel). `context_refiner.N.attn`: text-only self-attention
(not listed); `noise_refiner.N.attn`: image-only self-attention; `layers.N.attn`: joint attention over
[text, image] per sample, the text UNPADDED (each sample's own length), so the image offset is that
sample's text length. Image tokens: the latent's 2x2 patches, row-major.

Supported: every row of a denoiser call with the same text length (one prompt per call, any
num_images_per_prompt); a call whose rows differ raises at the first controlled joint layer.
Text keys: Gemma tokens of `system_prompt + " <Prompt Start> " + prompt` (`<bos>` first), as many
as the mask keeps. The pipeline runs CFG as two forwards per step, the conditional one first.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import prompt_positions, token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers

_REFINER = (
    "Lumina 2's context refiner mixes every text token before the joint layers: appended region "
    "prompts would change the prompt's own text"
)


class Lumina2Adapter(FamilyAdapter):
    name = "lumina2"
    title = "Lumina-Image 2.0"
    denoisers = ("Lumina2Transformer2DModel",)
    processors = ("Lumina2AttnProcessor2_0",)
    seam = "sdpa"
    cfg_forwards = ("cond", "uncond")  # the prompt's forward, then the negative prompt's, unnamed
    refuses = {"Layout": _REFINER}  # noqa: RUF012 - read only

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        def kind(path: str, module: torch.nn.Module) -> str | None:
            if path.startswith("context_refiner."):  # text-only
                return None
            return "self" if path.startswith("noise_refiner.") else "joint"

        return attention_layers(denoiser, kind)

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        p = session.denoisers[0].config.patch_size
        session.grid = (1, inputs["hidden_states"].shape[-2] // p, inputs["hidden_states"].shape[-1] // p)
        lengths = set(inputs["encoder_attention_mask"].sum(dim=1).tolist())
        session.text_len = lengths.pop() if len(lengths) == 1 else None  # None: rows differ

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        _, h, w = session.grid
        text = 0 if layer.kind == "self" else session.text_len
        if text is None:
            raise ValueError(
                f"{layer.name}: the prompts of this Lumina 2 call have different token lengths, so their image "
                "tokens sit at different offsets; attnctl needs one length per call (one prompt per call)"
            )
        if queries != text + h * w:
            raise ValueError(f"{layer.name}: {queries} tokens are not {text} text tokens and a {h}x{w} grid")
        image = slice(text, queries)
        return Layout(image, image, slice(0, text) if text else None, 1, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence, **_template(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """The prompt's tokens (after the system prompt), and `<bos>`; Gemma adds no end token."""
        return prompt_positions(pipe.tokenizer, prompt, **_template(pipe)), [0]


def _template(pipe: Any) -> dict[str, Any]:
    """The pipeline's default template and text length (a call's `system_prompt` is not seen here)."""
    length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return {"template": pipe.system_prompt + " <Prompt Start> {}", "max_length": length}
