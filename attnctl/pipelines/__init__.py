"""Thin pipeline conveniences over `attnctl.control` (never copies of diffusers' denoising loops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_PREFIX = "tiny:"


def quiet() -> None:
    """Print only what you ask for: diffusers' and transformers' notices and loading bars off (errors
    still show), future and deprecation warnings hidden. Process-wide; the `attnctl` command and the
    examples call it, attnctl itself never does. Denoising bars are per pipeline:
    `pipe.set_progress_bar_config(disable=True)`."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


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


def call_defaults(model: str | Path | None) -> dict[str, Any]:
    """Call arguments a model needs beyond its pipeline's defaults: tiny models run at tiny sizes
    (`tiny_call_kwargs`, without the step count and output type); other models need none."""
    if model is None or not str(model).startswith(TINY_PREFIX):
        return {}
    from ..tiny import tiny_call_kwargs

    kwargs = tiny_call_kwargs(str(model)[len(TINY_PREFIX) :])
    for name in ("num_inference_steps", "output_type"):
        kwargs.pop(name, None)
    return kwargs


class ControlledPipelineMixin:
    """Adds `controls=[...]` to a pipeline's `__call__`; the session of the last call is `attnctl_session`.

    pipe = StableDiffusionControlPipeline.from_pipe(pipe)
    image = pipe("a cat and a frog", controls=[attnctl.AStar(["cat", "frog"])]).images[0]
    """

    attnctl_session: Any = None

    def __call__(self, *args: Any, controls: Any = (), **kwargs: Any) -> Any:
        from ..core.session import control

        with control(self, *controls) as session:
            result = super().__call__(*args, **kwargs)  # type: ignore[misc]
        self.attnctl_session = session
        return result


def _controlled(base: type) -> type:
    return type(base.__name__.replace("Pipeline", "ControlPipeline"), (ControlledPipelineMixin, base), {})


def __getattr__(name: str) -> Any:
    """`StableDiffusionControlPipeline`, `StableDiffusionXLControlPipeline`, ...: any diffusers pipeline
    class name with "Pipeline" replaced by "ControlPipeline" gives that pipeline with `controls=`."""
    import diffusers

    if name.endswith("ControlPipeline"):
        base = getattr(diffusers, name.replace("ControlPipeline", "Pipeline"), None)
        if isinstance(base, type):
            cls = _controlled(base)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
