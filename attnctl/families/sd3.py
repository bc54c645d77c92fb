"""Stable Diffusion 3 / 3.5: `SD3Transformer2DModel` with diffusers' `Attention` modules (MMDiT).

`attn` of every joint block attends jointly over [image tokens ; text tokens] (image first); SD3.5's
dual-attention blocks (`dual_attention_layers`) add `attn2`, self-attention over the image tokens only.
Image tokens are the latent's (H/patch, W/patch) patches, row-major. The text sequence is the CLIP
part (CLIP-L and CLIP-G concatenated along channels, so they share positions, `tokenizer_max_length`
= 77 tokens) followed by the T5 part.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import TokenTruncatedError, token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    denoisers = ("SD3Transformer2DModel",)
    processors = ("JointAttnProcessor2_0",)
    seam = "sdpa"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        # attn has added (text) projections; SD3.5's attn2 has none and sees image tokens only
        return attention_layers(
            denoiser,
            lambda path, module: "self" if getattr(module, "added_kv_proj_dim", None) is None else "joint",
        )

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        sample = inputs["hidden_states"]  # latent [B, C, H, W]
        patch = _patch_size(session, self)
        session.grid = (1, sample.shape[-2] // patch, sample.shape[-1] // patch)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        # attn: [image ; text], image first; attn2 (SD3.5): the image tokens alone
        _, h, w = session.grid
        n = h * w
        if queries < n or (layer.kind == "self" and queries != n):
            raise ValueError(
                f"{layer.name}: {queries} tokens do not hold the {h}x{w} token grid of the latent"
            )
        text = slice(n, keys) if layer.kind == "joint" else None
        return Layout(image_q=slice(0, n), image_k=slice(0, n), text_k=text, frames=1, height=h, width=w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        """CLIP positions (0..76) plus T5 positions offset by the CLIP length, when T5 is loaded.

        The word may be truncated away in one encoder and not the other (CLIP keeps 77 tokens);
        it is an error only when no encoder keeps it. Without T5 encoder the pipeline feeds zeros
        in the T5 part, so those positions carry nothing of the word and are left out.
        """
        clip_len = pipe.tokenizer_max_length
        encoders = [(pipe.tokenizer, 0, clip_len)]
        if (
            getattr(pipe, "tokenizer_3", None) is not None
            and getattr(pipe, "text_encoder_3", None) is not None
        ):
            encoders.append((pipe.tokenizer_3, clip_len, None))
        positions: list[int] = []
        truncated: TokenTruncatedError | None = None
        for tokenizer, offset, max_length in encoders:
            try:
                found = token_positions(tokenizer, prompt, word, occurrence, max_length=max_length)
            except TokenTruncatedError as error:
                truncated = error
                continue
            positions += [offset + p for p in found]
        if truncated is not None and not positions:
            raise truncated  # every encoder truncated the word away
        return positions

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """CLIP: start-of-text, the words, end-of-text; T5 (offset 77): the words, then `</s>`."""
        clip_len = pipe.tokenizer_max_length
        n = len(pipe.tokenizer(prompt, truncation=True, max_length=clip_len)["input_ids"])
        words, ends = list(range(1, n - 1)), [0, n - 1]
        if (
            getattr(pipe, "tokenizer_3", None) is not None
            and getattr(pipe, "text_encoder_3", None) is not None
        ):
            m = len(pipe.tokenizer_3(prompt, truncation=True)["input_ids"])
            words += range(clip_len, clip_len + m - 1)
            ends.append(clip_len + m - 1)
        return words, ends


def _patch_size(session: Any, adapter: FamilyAdapter) -> int:
    """Patch size of the session's denoiser that this adapter serves."""
    for denoiser, a in zip(session.denoisers, session.adapters, strict=True):
        if a is adapter:
            return denoiser.config.patch_size
    raise ValueError("no SD3 transformer in this session")
