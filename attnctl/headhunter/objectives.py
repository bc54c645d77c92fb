"""Objectives of a head search: plain callables `(images, prompts) -> scores`, one float per image,
higher is better.

- `testbed`: on the bundled shapes model, the fraction of the prompt's objects the detector finds in
  their prompted colour (the compose benchmark's binding, per image).
- `ClipScore(path)`: logit_scale · cos(image, prompt) of a CLIP-architecture model loaded from a local
  folder; with PickScore's weights (a CLIP ViT-H/14) this is PickScore, the paper's objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

Objective = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
CLIP_PREFIX = "clip:"


def testbed(images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
    """Per image, the fraction of its prompt's objects detected with the prompted colour and shape."""
    from ..testbed.bench import score_image

    scores = []
    for image, prompt in zip(images, prompts, strict=True):
        objects = score_image(image, prompt)["objects"]
        scores.append(sum(o["bound"] for o in objects) / len(objects))
    return scores


class ClipScore:
    """logit_scale · cos(image embedding, text embedding) per (image, prompt) pair (Radford et al. 2021;
    PickScore, Kirstain et al. 2023, is this with its fine-tuned CLIP). `path`: a local folder with a
    `CLIPModel` (safetensors) and its processor (tokenizer + image processor) saved beside it."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        if not Path(path, "config.json").is_file():
            raise ValueError(
                f"objective clip:{path} is not allowed: a local folder with a CLIP model's config.json, "
                "weights and processor"
            )
        self.name = f"{CLIP_PREFIX}{path}"
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        # logits_per_image[i, j] = logit_scale · cos(image i, prompt j); each image with its own prompt
        return self.model(**inputs).logits_per_image.diagonal().tolist()


def objective_from_name(name: str, device: str | torch.device = "cpu") -> Objective:
    """`testbed` or `clip:PATH` (e.g. a PickScore folder) as an objective."""
    if name == "testbed":
        return testbed
    if name.startswith(CLIP_PREFIX) and name != CLIP_PREFIX:
        return ClipScore(name[len(CLIP_PREFIX) :], device)
    raise ValueError(
        f"objective {name!r} is not allowed: testbed, or clip:PATH with PATH a local CLIP-architecture "
        "model folder (e.g. PickScore)"
    )


def objective_name(objective: Objective) -> str:
    """What a result file records as the objective: its `name`, else its function name."""
    return str(getattr(objective, "name", None) or getattr(objective, "__name__", type(objective).__name__))
