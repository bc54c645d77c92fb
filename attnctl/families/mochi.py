"""Mochi 1: `MochiTransformer3DModel` with `MochiAttention` modules and `MochiAttnProcessor2_0`.

Every block has one joint attention `transformer_blocks.N.attn1`, asymmetric: the video stream
(`to_q/k/v`, 3D RoPE) and the text stream (`add_q/k/v_proj`) have their own widths and projections,
joined per head. The processor calls SDPA once per batch row, on [video ; that row's unpadded T5
tokens] (the text mask selects them, no mask reaches the kernel; an empty negative prompt is zeroed,
so its row has no text at all). Text key p is token p of `tokenizer(prompt)`. Video tokens are the
latent [F, H/p, W/p] (no temporal patch), frame-major, row-major.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .ltx import default_text_len


class MochiAdapter(FamilyAdapter):
    name = "mochi"
    title = "Mochi 1"
    denoisers = ("MochiTransformer3DModel",)
    processors = ("MochiAttnProcessor2_0",)
    video = True
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latents = inputs["hidden_states"]  # [B, C, F, H, W]
        p = session.denoisers[0].config.patch_size
        session.grid = (latents.shape[2], latents.shape[3] // p, latents.shape[4] // p)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        # kernel call `call` is batch row `call`: [video ; its unpadded text], video first
        if max(len(session.rows.cond), len(session.rows.uncond), len(session.rows.perturbed)) > 1:
            raise ValueError("attnctl controls Mochi's row-by-row attention for one video per call")
        frames, height, width = session.grid
        n = frames * height * width
        if queries < n:
            raise ValueError(
                f"{layer.name}: {queries} tokens do not hold the video token grid {session.grid}"
            )
        text = slice(n, keys) if keys > n else None
        return Layout(slice(0, n), slice(0, n), text, frames, height, width, rows=(call,))

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=default_text_len(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """T5: the words, then `</s>` (the processor drops the padding)."""
        m = len(pipe.tokenizer(prompt, truncation=True, max_length=default_text_len(pipe))["input_ids"])
        return list(range(m - 1)), [m - 1]
