"""Z-Image: `ZImageTransformer2DModel` with `ZSingleStreamAttnProcessor` in every block.

The denoiser takes lists, one entry per row: latents `x` [C, F, H, W] and captions `cap_feats` [L, D]
(the Qwen3 hidden states of the chat-templated prompt, its padding left out), and the timestep `t`.
Each is padded to a multiple of 32 tokens with a learned pad token, which is attended. Blocks:
`noise_refiner.N` self-attention over the image (+ pads), `context_refiner.N` over the caption
alone (text-only: no layer here), `layers.N` joint over [image + pads ; caption + pads] (image
FIRST), rows padded to the batch's longest with a boolean key mask. Image tokens: (F/f, H/p, W/p)
patches, row-major. CFG stacks the rows [prompt's ; negative prompt's].
"""

from __future__ import annotations

from typing import Any

import torch

from . import chat
from .base import FamilyAdapter, LayerInfo, Layout, attention_layers

PAD = 32  # SEQ_MULTI_OF: image and caption are each padded to a multiple of it


class ZImageAdapter(FamilyAdapter):
    name = "zimage"
    title = "Z-Image"
    denoisers = ("ZImageTransformer2DModel",)
    processors = ("ZSingleStreamAttnProcessor",)
    seam = "dispatch"
    latent_arg, timestep_arg = "x", "t"
    cfg_batch = ("cond", "uncond")
    refuses = {  # noqa: RUF012 - read only
        "Layout": "Z-Image pads each row's caption with learned tokens it attends to, so rows' text keys "
        "differ in length, where Layout needs one text layout for all rows",
    }

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        kinds = {"noise_refiner": "self", "layers": "joint"}  # context_refiner: the caption alone
        return attention_layers(denoiser, lambda path, module: kinds.get(path.split(".")[0]))

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        x, captions = inputs["x"], inputs["cap_feats"]
        if isinstance(x[0], list):
            raise ValueError(
                "attnctl controls Z-Image's text-to-image mode, not the Omni mode's [text, image, SigLIP]"
            )
        f, p = inputs.get("f_patch_size", 1), inputs.get("patch_size", 2)
        session.grid = (x[0].shape[-3] // f, x[0].shape[-2] // p, x[0].shape[-1] // p)
        session.text_len = max(-(-len(c) // PAD) * PAD for c in captions)  # the longest padded caption

    def seam_layout(self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int) -> Layout:
        f, h, w = session.grid
        image = f * h * w
        padded = -(-image // PAD) * PAD
        if queries != padded + (session.text_len if layer.kind == "joint" else 0):
            raise ValueError(f"{layer.name}: {queries} tokens are not the {f}x{h}x{w} image and its caption")
        text = slice(padded, keys) if layer.kind == "joint" else None  # every row's caption starts there
        return Layout(slice(0, image), slice(0, image), text, f, h, w)

    def cfg_scale(self, pipe: Any) -> float:
        """The pipeline guides as ε_c + w·(ε_c − ε_u), which is ε_u + (w + 1)·(ε_c − ε_u)."""
        return float(pipe.guidance_scale) + 1

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        template, limit = chat.user_turn(pipe.tokenizer, enable_thinking=True), chat.default_length(pipe)
        return chat.positions(pipe.tokenizer, template, prompt, word, occurrence, max_length=limit)

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Words: the prompt's tokens; start/end: `<|im_start|>` (of the user turn) and `<|im_end|>`."""
        template, limit = chat.user_turn(pipe.tokenizer, enable_thinking=True), chat.default_length(pipe)
        return chat.span(pipe.tokenizer, template, prompt, max_length=limit)
