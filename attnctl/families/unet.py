"""Stable Diffusion 1.x / 2.x / XL: `UNet2DConditionModel` with diffusers' `Attention` modules.

attn1 is self-attention over the image tokens, attn2 cross-attention to the CLIP text sequence
(77 tokens, start-of-text at 0). Image tokens are the feature map flattened row-major. With an
IP-Adapter loaded (`pipe.load_ip_adapter`), attn2's processor is `IPAdapterAttnProcessor2_0`: it
receives (text, [image-prompt states per adapter]) and adds one decoupled stream per adapter.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, ImageStream, Layout, Prepared, block_of, grid_for, sdpa


class UNetAdapter(FamilyAdapter):
    name = "sd"
    title = "Stable Diffusion 1.x / 2.x / XL"
    denoisers = ("UNet2DConditionModel",)
    latent_arg = "sample"

    def layers(self, denoiser: torch.nn.Module) -> list:
        from .base import LayerInfo

        depth = len(denoiser.down_blocks)
        out = []
        for name in denoiser.attn_processors:
            path = name.removesuffix(".processor")
            module = denoiser.get_submodule(path)
            kind = "cross" if module.is_cross_attention else "self"
            # down block i works at 1/2^i, the mid block at the bottom, up block i mirrors down block n-1-i
            parts = path.split(".")
            level = {"down_blocks": int(parts[1]) if parts[1].isdigit() else 0, "mid_block": depth - 1}.get(
                parts[0], depth - 1 - int(parts[1]) if parts[1].isdigit() else 0
            )
            out.append(LayerInfo(path, kind, module.heads, block_of(path), len(out), 2**level))
        return out

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        sample = inputs["sample"]
        session.grid = (1, sample.shape[-2], sample.shape[-1])

    def prepare(
        self,
        session: Any,
        layer: Any,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        processor: Any = None,
        ip_adapter_masks: Any = None,
        **kwargs: Any,
    ) -> Prepared:
        # Mirrors diffusers' AttnProcessor2_0 up to the SDPA call (IPAdapterAttnProcessor2_0: the same,
        # its image-prompt streams added in `finish`).
        streams = []
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_states = encoder_hidden_states
            streams = _image_streams(processor, ip_states, ip_adapter_masks)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n = query.shape[2]
        h, w = grid_for(n, session.grid[1], session.grid[2])
        cross = layer.kind == "cross"
        layout = Layout(
            image_q=slice(0, n),
            image_k=slice(0, 0) if cross else slice(0, n),
            text_k=slice(0, key.shape[2]) if cross else None,
            frames=1,
            height=h,
            width=w,
        )
        dtype = query.dtype

        def finish(out: torch.Tensor) -> torch.Tensor:
            out = out.to(dtype)
            for stream in streams:  # what edits left in the list (Layout adds its own by box)
                out = add_image_stream(out, query, stream, attn.heads)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
            out = attn.to_out[1](attn.to_out[0](out))
            if input_ndim == 4:
                out = out.transpose(-1, -2).reshape(batch, channel, height, width)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

        # `finish` holds the stream list, not the Prepared: no reference cycle keeps this call's
        # tensors alive after it returns
        return Prepared(query, key, value, layout, finish, mask=attention_mask, image_streams=streams)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer, prompt, word, occurrence)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        tok = pipe.tokenizer
        n = len(tok(prompt, truncation=True, max_length=tok.model_max_length)["input_ids"])
        return list(range(1, n - 1)), [0, n - 1]  # CLIP: start-of-text, the words, end-of-text

    def image_prompt_adapters(self, denoiser: torch.nn.Module) -> int:
        proj = getattr(denoiser, "encoder_hid_proj", None)
        if getattr(denoiser.config, "encoder_hid_dim_type", None) != "ip_image_proj" or proj is None:
            return 0
        return len(proj.image_projection_layers)

    def with_image_embeds(self, kwargs: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
        """`added_cond_kwargs["image_embeds"]`, where the pipeline puts `ip_adapter_image_embeds`."""
        added = dict(kwargs.get("added_cond_kwargs") or {})
        added["image_embeds"] = [embeds]
        return {**kwargs, "added_cond_kwargs": added}

    def variant(self, pipe: Any) -> str:
        """SDXL with a second tokenizer, else SD 1.x or 2.x by how the CLIP tokenizer pads: SD 1.x's
        (OpenAI CLIP's) pads with its end-of-text token, SD 2.x's (OpenCLIP's) with "!".

        The padding tells the two apart in every checkpoint, tiny or real; the text encoder's width
        (768 against 1024) would not tell a small model's."""
        if getattr(pipe, "tokenizer_2", None) is not None:
            return "sdxl"
        tok = pipe.tokenizer
        return "sd1" if tok.pad_token_id == tok.eos_token_id else "sd2"


def add_image_stream(out: torch.Tensor, query: torch.Tensor, stream: ImageStream, heads: int) -> torch.Tensor:
    """out + the stream's decoupled attention, [B, H, Sq, D], exactly as IPAdapterAttnProcessor2_0
    adds it: scale * softmax(Q K_ipᵀ/√d) V_ip, or with `ip_adapter_masks` per image
    scale_i * (Z_i * bicubic-downsampled mask_i)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    scale = stream.scale
    if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
        return out
    if stream.mask is None:
        key, value = stream.keys_values(heads)
        return out + scale * sdpa(query, key, value, None, None).to(query.dtype)
    scales = scale if isinstance(scale, list) else [scale] * stream.mask.shape[1]
    batch, _, n, _ = query.shape
    for i in range(stream.mask.shape[1]):
        key, value = stream.keys_values(heads, image=i)
        z = sdpa(query, key, value, None, None).to(query.dtype)
        mask = IPAdapterMaskProcessor.downsample(stream.mask[:, i], batch, n, 1)
        out = out + scales[i] * (z * mask.to(dtype=query.dtype, device=query.device)[:, None])
    return out


def _image_streams(processor: Any, states: list[torch.Tensor], masks: Any) -> list[ImageStream]:
    """One stream per loaded IP-Adapter, from the replaced IPAdapterAttnProcessor2_0's weights."""
    if not hasattr(processor, "to_k_ip"):
        raise ValueError(
            f"image-prompt states reached a cross-attention layer whose processor is "
            f"{type(processor).__name__}, not an IP-Adapter processor; load the adapter with pipe.load_ip_adapter"
        )
    if masks is not None and not isinstance(masks, list):
        masks = list(masks.unsqueeze(1))  # diffusers' older form: one tensor [n_adapters, 1, H, W]
    masks = masks or [None] * len(states)
    return [
        ImageStream(s, to_k, to_v, scale, mask)
        for s, scale, to_k, to_v, mask in zip(
            states, processor.scale, processor.to_k_ip, processor.to_v_ip, masks, strict=True
        )
    ]
