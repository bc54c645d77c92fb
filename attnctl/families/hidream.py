"""HiDream-I1: `HiDreamImageTransformer2DModel` with `HiDreamAttnProcessor` (SDPA).

Every attention (`double_stream_blocks.N.block.attn1`, `single_stream_blocks.N.block.attn1`) is joint
over [image ; T5 ; Llama ; Llama of this block], image first: the T5 text, then the hidden states of
the last layer in `llama_layers`, then those of the block's own `llama_layers` entry, each padded to
`max_sequence_length` and not masked. A prompt word so has tokens in three text segments.
`text_positions` returns its T5 positions: the text keys here are the T5 segment, the one that sits
right after the image whatever `max_sequence_length` the call used (the Llama segments start after it,
and an adapter cannot see the call's length); the Llama segments are keys controls leave as they are
(softmax over all keys, as in the model). Non-square latents are padded to `max_seq` image tokens,
whose keys are zeroed, not masked: only the first h * w are image queries and keys.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.tokens import token_positions
from .auraflow import _default_length, special_span
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers


class HiDreamAdapter(FamilyAdapter):
    name = "hidream"
    title = "HiDream-I1"
    denoisers = ("HiDreamImageTransformer2DModel",)
    processors = ("HiDreamAttnProcessor",)
    seam = "sdpa"
    timestep_arg = "timesteps"
    batch_dims = {"encoder_hidden_states_llama3": 1}  # noqa: RUF012 - [layers, B, L, C]
    refuses = {  # noqa: RUF012 - read only
        "Layout": "region prompts would have to join the T5 and both Llama text segments of every block",
    }

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        return attention_layers(denoiser, lambda path, module: "joint")

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        latent = inputs["hidden_states"]
        if latent.ndim != 4:
            raise ValueError("attnctl reads HiDream's token grid from a latent [B, C, H, W], not patches")
        patch = session.denoisers[0].config.patch_size
        session.grid = (1, latent.shape[-2] // patch, latent.shape[-1] // patch)
        session.text_len = inputs["encoder_hidden_states_t5"].shape[1]

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        _, h, w = session.grid
        # `patchify` pads the image tokens of a non-square latent to max_seq
        image = h * w if h == w else session.denoisers[0].max_seq
        if (queries - image - session.text_len) % 2 or queries < image + session.text_len:
            raise ValueError(
                f"{layer.name}: {queries} tokens are not a {h}x{w} image and HiDream's text segments"
            )
        return Layout(slice(0, h * w), slice(0, h * w), slice(image, image + session.text_len), 1, h, w)

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        return token_positions(pipe.tokenizer_3, prompt, word, occurrence, max_length=_t5_length(pipe))

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        return special_span(pipe.tokenizer_3, prompt, _t5_length(pipe))


def _t5_length(pipe: Any) -> int:
    """The T5 length of a call with the default `max_sequence_length` (shorter calls are caught
    against the text length the denoiser receives)."""
    return min(_default_length(pipe) or 128, pipe.tokenizer_3.model_max_length)
