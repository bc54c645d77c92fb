"""FLUX.1: `FluxTransformer2DModel` with `FluxAttention` modules (MMDiT with RoPE).

Every attention is joint over [text tokens ; image tokens] (text first): the double-stream blocks
(`transformer_blocks.N.attn`) project text and image separately and concatenate them, the
single-stream blocks (`single_transformer_blocks.N.attn`) receive the concatenation itself. Image
tokens are the packed latent's 2x2 patches, row-major; `img_ids` holds their (0, row, col). Kontext
appends the reference image's tokens (first id 1) after the generated ones. The text keys are the
T5 (`tokenizer_2`) tokens; CLIP only gives the pooled vector.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class FluxAdapter(FamilyAdapter):
    name = "flux"
    title = "FLUX.1 (incl. Kontext)"
    denoisers = ("FluxTransformer2DModel",)
    processors = ("FluxAttnProcessor",)
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        img_ids = inputs.get("img_ids")
        if img_ids is None:
            raise ValueError(
                "FluxTransformer2DModel was called without img_ids; attnctl reads the token grid from them"
            )
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # 3-d ids are deprecated but accepted
        generated = ids[ids[:, 0] == 0]  # Kontext's reference-image tokens carry 1 here
        rows, cols = generated[:, 1], generated[:, 2]
        h = int(rows.max() - rows.min()) + 1
        w = int(cols.max() - cols.min()) + 1
        session.grid = (1, h, w)

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        # [text ; generated image ; Kontext's reference image] in double and single blocks alike
        text = session.text_len
        _, h, w = session.grid
        if text is None or text + h * w > queries:
            raise ValueError(
                f"{layer.name}: {queries} tokens do not hold {text} text tokens and a {h}x{w} image token grid"
            )
        return Layout(
            image_q=slice(text, text + h * w),  # the generated image only (Kontext: not the reference)
            image_k=slice(text, keys),
            text_k=slice(0, text),
            frames=1,
            height=h,
            width=w,
        )

    def append_text(self, kwargs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
        """Also extends `txt_ids`, with zeros: FLUX pipelines give every text token the id (0, 0, 0)."""
        kwargs = super().append_text(kwargs, tokens)
        ids = kwargs.get("txt_ids")
        if ids is not None:
            extra = ids.new_zeros(*ids.shape[:-2], tokens.shape[1], ids.shape[-1])
            kwargs["txt_ids"] = torch.cat([ids, extra], dim=-2)
        return kwargs

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer_2, prompt, word, occurrence)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """T5 has no start-of-text token: the words, then `</s>`."""
        m = len(pipe.tokenizer_2(prompt, truncation=True)["input_ids"])
        return list(range(m - 1)), [m - 1]
