"""FLUX.1: `FluxTransformer2DModel` with `FluxAttention` modules (MMDiT with RoPE).

Every attention is joint over [text tokens ; image tokens] (text first): the double-stream blocks
(`transformer_blocks.N.attn`) project text and image separately and concatenate them, the
single-stream blocks (`single_transformer_blocks.N.attn`) receive the concatenation itself. Image
tokens are the packed latent's 2x2 patches, row-major; `img_ids` holds their (0, row, col). Kontext
appends the reference image's tokens (first id 1) after the generated ones. The text keys are the
T5 (`tokenizer_2`) tokens; CLIP only gives the pooled vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, Prepared, block_of, dispatch_kernel


class FluxAdapter(FamilyAdapter):
    name = "flux"
    denoisers = ("FluxTransformer2DModel",)

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        out = []
        for name in denoiser.attn_processors:
            path = name.removesuffix(".processor")
            module = denoiser.get_submodule(path)
            out.append(LayerInfo(path, "joint", module.heads, block_of(path), len(out)))
        return out

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

    def prepare(
        self,
        session: Any,
        layer: LayerInfo,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Prepared:
        # Mirrors diffusers' FluxAttnProcessor up to its dispatch_attention_fn call ([B, S, H, D]).
        if kwargs.get("ip_hidden_states") is not None:
            raise NotImplementedError(f"{layer.name}: attnctl does not control Flux IP-Adapter attention")
        query, key, value, text_q, text_key, text_v = _projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_q, text_key, text_v = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (text_q, text_key, text_v)
            )
            text_q = attn.norm_added_q(text_q)
            text_key = attn.norm_added_k(text_key)
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # Double blocks see the text tokens as encoder_hidden_states; single blocks get text and
        # image already concatenated, so the text length comes from the denoiser call.
        seq = query.shape[1]
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else session.text_len
        _, h, w = session.grid
        if text is None or text + h * w > seq:
            raise ValueError(
                f"{layer.name}: {seq} tokens do not hold {text} text tokens and a {h}x{w} image token grid"
            )
        layout = Layout(
            image_q=slice(text, text + h * w),  # the generated image only (Kontext: not the reference)
            image_k=slice(text, seq),
            text_k=slice(0, text),
            frames=1,
            height=h,
            width=w,
        )
        dtype = query.dtype

        def finish(out: torch.Tensor) -> Any:
            out = out.transpose(1, 2).flatten(2, 3).to(dtype)
            if encoder_hidden_states is None:
                return out
            text_out, out = out.split_with_sizes([text, seq - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text_out.contiguous())

        return Prepared(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            layout,
            finish,
            mask=attention_mask,
        )

    def kernel_for(self, processor: Any) -> Callable:
        return dispatch_kernel(processor)

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


def _projections(
    attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """q, k, v of the image stream and of the text stream (None where the module has none)."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = (None, None, None)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, *text
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        text = (
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
        )
    return query, key, value, *text
