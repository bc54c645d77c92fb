"""LTX-2: `LTX2VideoTransformer3DModel`, joint audio + video; `LTX2Attention` modules whose processor
(`LTX2AudioVideoAttnProcessor`, or `LTX2PerturbedAttnProcessor`) calls `dispatch_attention_fn`.

Each block runs six attention modules, each on one modality: `attn1` (video self-attention, RoPE),
`attn2` (video -> text), `audio_attn1`, `audio_attn2`, `audio_to_video_attn` (video -> audio) and
`video_to_audio_attn` (audio -> video). The image tokens are the video tokens; no call mixes them with
audio in one sequence. The layers are `attn1` and `attn2`: audio-query modules have no video queries,
and `audio_to_video_attn`'s keys are audio, neither video nor text (no control applies to it).
Video tokens: frame-major, row-major; the grid is the `num_frames`, `height`, `width` arguments.

Text keys: the connectors' output. Gemma 3 tokenizes `<bos>` + the stripped prompt, left-padded to
`max_sequence_length`; with learnable registers (LTX-2's checkpoints) the connector moves the valid
tokens to the front and fills the rest with registers (all keys attended), else the left padding
stays, hidden by a -10000 key bias (then keys sit at `__call__`'s default length, 1024).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.tokens import prompt_positions, token_positions
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers
from .wan import check_grid

_LAYERS = {"attn1": "self", "attn2": "cross"}


class LTX2Adapter(FamilyAdapter):
    name = "ltx2"
    title = "LTX-2 (audio + video)"
    denoisers = ("LTX2VideoTransformer3DModel",)
    processors = ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
    video = True
    seam = "dispatch"

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: _LAYERS.get(path.rpartition(".")[2]))

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        config = session.denoisers[0].config
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        dims = (inputs.get("num_frames"), inputs.get("height"), inputs.get("width"))
        if None in dims:
            raise ValueError("LTX2VideoTransformer3DModel was called without num_frames/height/width")
        session.grid = tuple(-(-int(d) // p) for d, p in zip(dims, patch, strict=True))

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        frames, height, width = check_grid(session.grid, queries, layer)
        video = slice(0, queries)
        if layer.kind == "self":
            return Layout(video, video, None, frames, height, width)
        return Layout(video, slice(0, 0), slice(0, keys), frames, height, width)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        shift, limit = _text_keys(pipe, prompt)
        return [
            p + shift
            for p in token_positions(pipe.tokenizer, prompt.strip(), word, occurrence, max_length=limit)
        ]

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """The prompt's tokens, and `<bos>`; Gemma adds no end token."""
        shift, limit = _text_keys(pipe, prompt)
        found = prompt_positions(pipe.tokenizer, prompt.strip(), max_length=limit)
        return [p + shift for p in found], [shift]


def _text_keys(pipe: Any, prompt: str) -> tuple[int, int]:
    """(key of token 0, tokens kept) at `__call__`'s default `max_sequence_length`: key 0 with the
    connectors' registers (valid tokens front-aligned), else after the left padding."""
    limit = int(inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default)
    if getattr(pipe.connectors.video_connector, "learnable_registers", None) is not None:
        return 0, limit
    return limit - min(len(pipe.tokenizer(prompt.strip())["input_ids"]), limit), limit
