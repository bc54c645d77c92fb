"""HunyuanVideo 1.5: `HunyuanVideo15Transformer3DModel`, double-stream blocks whose
`HunyuanVideo15AttnProcessor2_0` attends jointly over [video ; text] (video FIRST).

Video tokens: the latent [F, H, W] in (t, h, w) patches, frame-major, row-major. Text keys, per row:
the valid image-embedding tokens (I2V only), the valid ByT5 tokens of the prompt's quoted glyph
text (none without quotes), the valid Qwen2.5-VL tokens, then every padded token (masked by a
boolean pair mask [B, 1, S, S]). The Qwen tokens are the hidden states of the chat-templated
[system, user] prompt from `prompt_template_encode_start_idx` on. The token refiner of
`context_embedder` is text-only: no layer here. CFG: the pipeline's guider names its forwards.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import check_grid, video_grid


class HunyuanVideo15Adapter(FamilyAdapter):
    name = "hunyuanvideo15"
    title = "HunyuanVideo 1.5"
    denoisers = ("HunyuanVideo15Transformer3DModel",)
    processors = ("HunyuanVideo15AttnProcessor2_0",)
    video = True
    seam = "dispatch"
    refuses = dict.fromkeys(  # noqa: RUF012 - read only
        ("AttentionRegulation", "AttendAndExcite", "AStar"),
        "not working on this family yet: the latent guidance's maps do not line up with its latent, and "
        "Attention Regulation was not run at a size it accepts (8x8 maps)",
    )

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(
            denoiser, lambda path, module: "joint" if path.startswith("transformer_blocks.") else None
        )

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        config = session.denoisers[0].config
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        session.grid = video_grid(inputs["hidden_states"].shape[2:], patch)
        streams = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
        session.text_len = sum(inputs[s].shape[1] for s in streams)  # all text keys, pads included

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        frames, height, width = check_grid(session.grid, queries - session.text_len, layer)
        video = slice(0, queries - session.text_len)
        return Layout(video, video, slice(video.stop, keys), frames, height, width)

    def cfg_scale(self, pipe: Any) -> float:
        return float(pipe.guider.guidance_scale)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        found = chat.positions(
            pipe.tokenizer, qwen_template(pipe), prompt, word, occurrence, **_options(pipe)
        )
        return [p + _before_qwen(pipe, prompt) for p in found]

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's Qwen tokens; end: `<|im_end|>`; the crop keeps no start token."""
        own, ends = chat.span(pipe.tokenizer, qwen_template(pipe), prompt, **_options(pipe))
        shift = _before_qwen(pipe, prompt)
        return [p + shift for p in own], [p + shift for p in ends]


def qwen_template(pipe: Any) -> str:
    """The chat-templated [system, user] text the pipeline encodes, `{}` where the prompt goes."""
    render = lambda p: pipe.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": p}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return chat.render_template(render)


def _options(pipe: Any) -> dict[str, Any]:
    crop = pipe.prompt_template_encode_start_idx  # apply_chat_template(tokenize=True): no specials
    return {"specials": False, "drop": crop, "max_length": pipe.tokenizer_max_length + crop}


def _before_qwen(pipe: Any, prompt: str) -> int:
    """Text keys before the Qwen tokens: the image embedding's (I2V), the ByT5 glyph tokens."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    glyphs = extract_glyph_texts(prompt)
    limit = pipe.tokenizer_2_max_length
    byt5 = 0 if glyphs is None else len(pipe.tokenizer_2(glyphs, max_length=limit, truncation=True).input_ids)
    image = "image" in inspect.signature(type(pipe).__call__).parameters  # I2V: the image tokens are valid
    return byt5 + (pipe.vision_num_semantic_tokens if image else 0)
