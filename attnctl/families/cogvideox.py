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
from .base import FamilyAdapter, LayerInfo, Layout, Prepared, block_of
from .wan import check_grid


class CogVideoXAdapter(FamilyAdapter):
    name = "cogvideox"
    denoisers = ("CogVideoXTransformer3DModel",)
    video = True

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        out = []
        for name in denoiser.attn_processors:
            path = name.removesuffix(".processor")
            module = denoiser.get_submodule(path)
            out.append(LayerInfo(path, "joint", module.heads, block_of(path), len(out)))
        return out

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latents = inputs["hidden_states"]  # [B, F, C, H, W]
        config = session.denoisers[0].config
        frames, _, height, width = latents.shape[1:]
        p, p_t = config.patch_size, config.patch_size_t
        # CogVideoXPatchEmbed: frames // p_t with a temporal patch (1.5), all frames without (1.0)
        session.grid = (frames if p_t is None else frames // p_t, height // p, width // p)

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
        # Mirrors diffusers' CogVideoXAttnProcessor2_0 (and its fused twin) up to the SDPA call.
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        frames, height, width = check_grid(session.grid, length - text_len, layer)
        video = slice(text_len, length)
        layout = Layout(
            image_q=video, image_k=video, text_k=slice(0, text_len), frames=frames, height=height, width=width
        )

        def finish(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
            out = attn.to_out[1](attn.to_out[0](out))
            text_out, video_out = out.split([text_len, length - text_len], dim=1)
            return video_out, text_out

        return Prepared(query, key, value, layout, finish, mask=attention_mask)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        # The transformer is built for a fixed text length (226 in the released models), which the
        # pipeline's max_sequence_length must match: a word cut off there raises.
        limit = pipe.transformer.config.max_text_seq_length
        return token_positions(pipe.tokenizer, prompt, word, occurrence, max_length=limit)
