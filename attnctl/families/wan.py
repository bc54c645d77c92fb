"""Wan 2.1 / 2.2: `WanTransformer3DModel` with `WanAttention` modules and `WanAttnProcessor`.

Each block has `attn1`, self-attention over the video tokens (3D RoPE), and `attn2`, cross-attention
to the UMT5 text sequence (the pipeline pads it with zero embeddings to `max_sequence_length`, so text
key p is token p of `tokenizer(prompt)`). Video tokens are the patched latent [F/pt, H/ph, W/pw]
flattened frame-major, then row-major.

Image-to-video (Wan 2.1 I2V): `attn2` also receives CLIP image-embedding tokens in front of the text
(the last 512 context tokens are text, as diffusers hard-codes). The model attends to them in a
*separate* softmax whose output is added to the text attention's output. attnctl exposes only the text
attention to controls (its keys are the text tokens); the image-context attention runs unchanged with
the model's own kernel.

Wan VACE (`WanVACETransformer3DModel`, `wanvace.py`) adds `vace_blocks`: a control branch of the same
blocks whose queries are the control video's tokens (its latents and mask), not the generated video's;
their outputs are hints added to the main blocks. They are not layers: they keep their own processor,
so no control perturbs, sparsifies or maps the conditioning branch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers

# WanPipeline's default max_sequence_length (I2V requires it: diffusers treats the last 512 context
# tokens of an I2V call as text).
WAN_TEXT_CONTEXT = 512


class WanAdapter(FamilyAdapter):
    name = "wan"
    title = "Wan 2.1 / 2.2"
    denoisers = ("WanTransformer3DModel",)
    processors = ("WanAttnProcessor",)
    video = True
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        def kind(path: str, module: torch.nn.Module) -> str | None:
            if path.startswith("vace_blocks."):
                return None  # VACE's control branch: its queries are the control video's tokens
            return "cross" if module.is_cross_attention else "self"

        return attention_layers(denoiser, kind)

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        # I2V passes the image embedding separately (`encoder_hidden_states_image`), so the
        # session's text length (from `encoder_hidden_states`) is text only.
        session.grid = video_grid(inputs["hidden_states"].shape[2:], patch_size(session))

    def seam_layout(
        self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int
    ) -> Layout | None:
        if layer.kind == "cross" and keys != session.text_len:
            return None  # I2V's attention to the image embedding, beside the text attention
        return self_or_cross_layout(session, layer, queries, keys)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        # WanPipeline truncates to max_sequence_length, 512 by default (and I2V requires 512).
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=WAN_TEXT_CONTEXT)


def patch_size(session: Any) -> tuple[int, int, int]:
    """(t, h, w) patch of the session's transformer(s); Wan 2.2's two experts share it."""
    patch = session.denoisers[0].config.patch_size
    return (patch, patch, patch) if isinstance(patch, int) else tuple(patch)


def video_grid(latent_fhw: torch.Size | tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (frames, h, w) of a latent video [F, H, W] cut into (t, h, w) patches."""
    return tuple(size // p for size, p in zip(latent_fhw, patch, strict=True))  # type: ignore[return-value]


def self_or_cross_layout(session: Any, layer: LayerInfo, queries: int, keys: int) -> Layout:
    """A video model's self-attention over the video tokens, or its cross-attention from them to the
    text keys (Wan, LTX-Video, Kandinsky 5)."""
    frames, height, width = check_grid(session.grid, queries, layer)
    video = slice(0, queries)
    if layer.kind == "self":
        return Layout(video, video, None, frames, height, width)
    return Layout(video, slice(0, 0), slice(0, keys), frames, height, width)


def check_grid(grid: tuple[int, int, int], tokens: int, layer: LayerInfo) -> tuple[int, int, int]:
    """The grid, after checking it holds exactly the layer's video tokens (e.g. not a context-parallel shard)."""
    if grid[0] * grid[1] * grid[2] != tokens:
        raise ValueError(
            f"layer {layer.name} sees {tokens} video tokens, but the latent grid {grid} holds "
            f"{grid[0] * grid[1] * grid[2]}; attnctl needs the whole sequence on each device"
        )
    return grid
