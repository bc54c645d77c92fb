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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, Prepared, block_of, dispatch_kernel, heads_to_dim1

# diffusers' WanAttnProcessor treats the last 512 context tokens of an I2V call as text.
WAN_TEXT_CONTEXT = 512


class WanAdapter(FamilyAdapter):
    name = "wan"
    denoisers = ("WanTransformer3DModel",)
    video = True

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        out = []
        for name in denoiser.attn_processors:
            path = name.removesuffix(".processor")
            module = denoiser.get_submodule(path)
            kind = "cross" if module.is_cross_attention else "self"
            out.append(LayerInfo(path, kind, module.heads, block_of(path), len(out)))
        return out

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        # I2V passes the image embedding separately (`encoder_hidden_states_image`), so the
        # session's text length (from `encoder_hidden_states`) is text only.
        session.grid = video_grid(inputs["hidden_states"].shape[2:], patch_size(session))

    def prepare(
        self,
        session: Any,
        layer: LayerInfo,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Prepared:
        # Mirrors diffusers' WanAttnProcessor up to the attention kernel (tensors [B, S, H, D] there).
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            image_context = encoder_hidden_states[:, :split]
            encoder_hidden_states = encoder_hidden_states[:, split:]
        cross = encoder_hidden_states is not None
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope(query, *rotary_emb)
            key = _rope(key, *rotary_emb)

        n = query.shape[1]
        frames, height, width = check_grid(session.grid, n, layer)
        layout = Layout(
            image_q=slice(0, n),
            image_k=slice(0, 0) if cross else slice(0, n),
            text_k=slice(0, key.shape[1]) if cross else None,
            frames=frames,
            height=height,
            width=width,
        )
        backend = getattr(attn.processor, "_attention_backend", None)

        def finish(out: torch.Tensor) -> torch.Tensor:
            out = out.transpose(1, 2).flatten(2, 3).type_as(query)
            if image_context is not None:
                out = out + _image_context_attention(attn, query, image_context, backend)
            return attn.to_out[1](attn.to_out[0](out))

        return Prepared(
            heads_to_dim1(query), heads_to_dim1(key), heads_to_dim1(value), layout, finish, attention_mask
        )

    def kernel_for(self, processor: Any) -> Callable:
        # WanAttnProcessor passes its parallel config only to self-attention (diffusers PR #12909).
        layer = getattr(processor, "layer", None)
        parallel = layer is None or layer.kind == "self"
        return dispatch_kernel(processor, parallel=parallel)

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


def check_grid(grid: tuple[int, int, int], tokens: int, layer: LayerInfo) -> tuple[int, int, int]:
    """The grid, after checking it holds exactly the layer's video tokens (e.g. not a context-parallel shard)."""
    if grid[0] * grid[1] * grid[2] != tokens:
        raise ValueError(
            f"layer {layer.name} sees {tokens} video tokens, but the latent grid {grid} holds "
            f"{grid[0] * grid[1] * grid[2]}; attnctl needs the whole sequence on each device"
        )
    return grid


def _qkv(
    attn: torch.nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Same projections as diffusers' `_get_qkv_projections`, fused or not.
    if context is None:
        context = hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved RoPE, as in WanAttnProcessor: pairs (x[2i], x[2i+1]) are rotated.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _image_context_attention(
    attn: torch.nn.Module, query: torch.Tensor, image_context: torch.Tensor, backend: Any
) -> torch.Tensor:
    """Wan I2V: attention from the video queries [B, S, H, D] to the image-embedding tokens, unchanged."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if getattr(attn, "fused_projections", False):
        key, value = attn.to_added_kv(image_context).chunk(2, dim=-1)
    else:
        key, value = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
    key = attn.norm_added_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    out = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        backend=backend,
        parallel_config=None,
    )
    return out.flatten(2, 3).type_as(query)
