"""Thin pipeline conveniences over `attnctl.control` (never copies of diffusers' denoising loops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_PREFIX = "tiny:"


def load_pipeline(
    model: str | Path | None = None, *, dtype: torch.dtype | None = None, device: str | None = None
) -> Any:
    """Load a diffusers pipeline by hub id or local path; None loads the bundled testbed model.

    `tiny:<family>` (e.g. `tiny:flux`) builds an untrained tiny model of that family offline.
    Weights load with `use_safetensors=True`; nothing is downloaded when `model` is a local path.
    """
    from diffusers import DiffusionPipeline

    if model is None:
        from ..testbed import model_path

        model = model_path()
    model = str(model)
    if model.startswith(TINY_PREFIX):
        from ..tiny import tiny_pipeline

        pipe = tiny_pipeline(model[len(TINY_PREFIX) :])
    else:
        kwargs: dict[str, Any] = {"use_safetensors": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
