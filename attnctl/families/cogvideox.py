"""CogVideoX 1.0 / 1.5: `CogVideoXTransformer3DModel` with `CogVideoXAttnProcessor2_0`.

Every block has one joint attention `transformer_blocks.N.attn1` over [text, video]: the T5 text
tokens come FIRST (padded to `max_sequence_length`, so text key p is token p of `tokenizer(prompt)`),
then the video tokens, frame-major and row-major. Latents are [B, F, C, H, W]; 1.5 also patches time
(`patch_size_t`). RoPE (when used) applies to the video part only.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import check_grid


class CogVideoXAdapter(FamilyAdapter):
    name = "cogvideox"
    title = "CogVideoX 1.0 / 1.5"
    denoisers = ("CogVideoXTransformer3DModel",)
    processors = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
    video = True
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latents = inputs["hidden_states"]  # [B, F, C, H, W]
        config = session.denoisers[0].config
        frames, _, height, width = latents.shape[1:]
        p, p_t = config.patch_size, config.patch_size_t
        # CogVideoXPatchEmbed: frames // p_t with a temporal patch (1.5), all frames without (1.0)
        session.grid = (frames if p_t is None else frames // p_t, height // p, width // p)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        # [text ; video], text first
        text = session.text_len
        frames, height, width = check_grid(session.grid, queries - text, layer)
        video = slice(text, queries)
        return Layout(
            image_q=video, image_k=video, text_k=slice(0, text), frames=frames, height=height, width=width
        )

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        # The transformer is built for a fixed text length (226 in the released models), which the
        # pipeline's max_sequence_length must match: a word cut off there raises.
        limit = pipe.transformer.config.max_text_seq_length
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=limit)
