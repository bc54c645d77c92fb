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
from typing import Any

import torch

from ..core.tokens import token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import check_grid, video_grid

# HunyuanVideoPipeline's default `max_sequence_length` (text tokens kept after the crop).
DEFAULT_TEXT_LEN = 256


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuanvideo"
    title = "HunyuanVideo"
    denoisers = ("HunyuanVideoTransformer3DModel",)
    processors = ("HunyuanVideoAttnProcessor2_0",)
    video = True
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        # the context embedder's token refiner (text-only) is no layer
        blocks = ("transformer_blocks.", "single_transformer_blocks.")
        return attention_layers(denoiser, lambda path, module: "joint" if path.startswith(blocks) else None)

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latents = inputs["hidden_states"]  # [B, C, F, H, W]
        config = session.denoisers[0].config
        session.grid = video_grid(
            latents.shape[2:], (config.patch_size_t, config.patch_size, config.patch_size)
        )

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        # [video ; text], video first, in double and single blocks alike
        text = session.text_len or 0
        frames, height, width = check_grid(session.grid, queries - text, layer)
        video = slice(0, queries - text)
        return Layout(video, video, slice(queries - text, keys) if text else None, frames, height, width)

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
