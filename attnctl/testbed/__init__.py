"""The bundled shapes testbed: a tiny trained text-to-image model, its data, detector and benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_path() -> str:
    """Folder of the shipped shapes model, loadable with `DiffusionPipeline.from_pretrained`."""
    return str(Path(__file__).parent / "model")


def load_pipeline(path: str | None = None) -> Any:
    """The shapes `StableDiffusionPipeline` (the shipped one unless `path` is given), fp32 on CPU."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path or model_path(), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
