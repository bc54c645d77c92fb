"""HunyuanVideo: `HunyuanVideoTransformer3DModel` with `HunyuanVideoAttnProcessor2_0`.

All attention is joint over [video, text], text AFTER the video tokens:
- double-stream `transformer_blocks.N.attn`: separate projections for the text (`add_*_proj`);
- single-stream `single_transformer_blocks.N.attn`: one projection over the concatenation.
RoPE applies to the video tokens only. Text keys past each prompt's length are padding, masked out
by a boolean mask [B, 1, 1, S] the model passes in. Video tokens are frame-major, row-major.

Text keys are the Llama hidden states of the *templated* prompt with the template's system part
cropped (`crop_start` tokens), so text key p is token p + crop_start of `template.format(prompt)`.

Not listed as layers: the token refiner inside `context_embedder` (text-only self-attention before
the transformer blocks). It has no video tokens, so no control here applies to it; it keeps its
own processor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, Prepared, block_of, dispatch_kernel, heads_to_dim1
from .wan import check_grid, video_grid

# HunyuanVideoPipeline's default `max_sequence_length` (text tokens kept after the crop).
DEFAULT_TEXT_LEN = 256


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuanvideo"
    denoisers = ("HunyuanVideoTransformer3DModel",)
    video = True

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        out = []
        for name in denoiser.attn_processors:
            path = name.removesuffix(".processor")
            if not path.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                continue  # the context embedder's token refiner: text-only
            module = denoiser.get_submodule(path)
            out.append(LayerInfo(path, "joint", module.heads, block_of(path), len(out)))
        return out

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latents = inputs["hidden_states"]  # [B, C, F, H, W]
        config = session.denoisers[0].config
        session.grid = video_grid(
            latents.shape[2:], (config.patch_size_t, config.patch_size, config.patch_size)
        )

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
        # Mirrors diffusers' HunyuanVideoAttnProcessor2_0 up to the attention kernel ([B, S, H, D] there).
        n = hidden_states.shape[1]  # video tokens
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if single:  # the text part of the concatenation gets no RoPE
                query = torch.cat(
                    [apply_rotary_emb(query[:, :n], image_rotary_emb, sequence_dim=1), query[:, n:]], 1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :n], image_rotary_emb, sequence_dim=1), key[:, n:]], 1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)

        frames, height, width = check_grid(session.grid, n, layer)
        layout = Layout(
            image_q=slice(0, n),
            image_k=slice(0, n),
            text_k=slice(n, n + text_len) if text_len else None,
            frames=frames,
            height=height,
            width=width,
        )
        dtype = query.dtype

        def finish(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = out.transpose(1, 2).flatten(2, 3).to(dtype)
            if not text_len:
                return out, None
            video_out, text_out = out[:, :n], out[:, n:]
            if getattr(attn, "to_out", None) is not None:
                video_out = attn.to_out[1](attn.to_out[0](video_out))
            if getattr(attn, "to_add_out", None) is not None:
                text_out = attn.to_add_out(text_out)
            return video_out, text_out

        return Prepared(
            heads_to_dim1(query), heads_to_dim1(key), heads_to_dim1(value), layout, finish, attention_mask
        )

    def kernel_for(self, processor: Any) -> Callable:
        return dispatch_kernel(processor)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        template, crop = prompt_template(pipe)
        positions = token_positions(
            pipe.tokenizer, prompt, word, occurrence, max_length=crop + DEFAULT_TEXT_LEN, template=template
        )
        return [p - crop for p in positions]


def prompt_template(pipe: Any) -> tuple[str, int]:
    """The pipeline's default prompt template and the number of leading tokens it crops.

    The crop is measured with the pipeline's tokenizer (BOS + the template's text before "{}"), which
    is how the released `crop_start=95` counts Llama-3 tokens; measuring keeps positions right for
    other tokenizers too. A `prompt_template` passed to the pipeline call is not seen here.
    """
    default = inspect.signature(type(pipe).__call__).parameters.get("prompt_template")
    if default is None or not isinstance(default.default, dict) or "image_emb_len" in default.default:
        # HunyuanVideoImageToVideoPipeline interleaves image embeddings with the text tokens.
        raise NotImplementedError(
            f"attnctl maps prompt words to HunyuanVideo text keys for HunyuanVideoPipeline's text template; "
            f"{type(pipe).__name__} builds its text sequence differently"
        )
    template = default.default["template"]
    crop = len(pipe.tokenizer(template.partition("{}")[0])["input_ids"])
    return template, crop
