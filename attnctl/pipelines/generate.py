"""`attnctl.generate`: one generation with controls, the path the CLI, the web demo and the benchmarks share.

result = attnctl.generate(pipe, "a cat and a frog", [attnctl.AttentionMaps(["cat"])], seed=0, steps=25)
result.image, result.maps["cat"], result.log, result.heatmaps()
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.controls import Control, check
from ..core.session import control


@dataclasses.dataclass
class Generation:
    """What `generate` returns.

    images: the generated images (video models: the first video's frames), PIL.
    maps: the AttentionMaps store (None without AttentionMaps). log: per control kind, what it did
    at each step (e.g. latent guidance's losses). video: whether `images` are frames of a video.
    """

    prompt: str | list[str]
    controls: list[Control]
    seed: int | None
    images: list[Any]
    video: bool = False
    maps: Any = None
    log: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def image(self) -> Any:
        """The first image (video models: the first frame)."""
        return self.images[0]

    def heatmaps(self, words: list[str] | None = None) -> Any:
        """The first image and a heatmap per word over it (PIL); None without maps."""
        if self.maps is None or not len(self.maps):
            return None
        return self.maps.grid(self.image, words)

    def layout_image(self) -> Any:
        """The first image beside it with the Layout's boxes drawn (PIL); None without a Layout."""
        from ..processors.layout import Layout, layout_image

        layouts = [c for c in self.controls if isinstance(c, Layout)]
        return layout_image(self.image, layouts[0]) if layouts else None


def generate(
    pipe: Any,
    prompt: str | list[str],
    controls: Sequence[Control | dict] = (),
    *,
    seed: int | None = 0,
    steps: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    **call_kwargs: Any,
) -> Generation:
    """Generate with `controls` installed (restored afterwards, also on error).

    controls: `Control`s, or their dicts as `to_dict()` writes them. seed: the CPU generator's
    seed (None: unseeded). steps: denoising steps (None: the pipeline's default). on_step(step,
    total): called after each denoising step (where the pipeline has `callback_on_step_end`).
    Other keyword arguments go to the pipeline call (height, width, guidance_scale, ...)."""
    ok = (isinstance(prompt, str) and bool(prompt.strip())) or (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) and p.strip() for p in prompt)
    )
    check(ok, "prompt", prompt, "non-empty text (or a non-empty list of non-empty texts)")
    controls = [c if isinstance(c, Control) else Control.from_dict(c) for c in controls]
    if seed is not None:
        check(
            isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
            "seed",
            seed,
            "an integer >= 0 or None",
        )
        call_kwargs["generator"] = torch.Generator().manual_seed(seed)
    if steps is not None:
        check(
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            "steps",
            steps,
            "an integer >= 1",
        )
        call_kwargs["num_inference_steps"] = steps
    for name in ("height", "width"):
        value = call_kwargs.get(name)
        if value is not None:
            check(isinstance(value, int) and value > 0, name, value, "a positive integer (pixels)")
    call_kwargs.setdefault("output_type", "pil")
    if on_step is not None:
        _add_step_callback(pipe, call_kwargs, on_step)
    start = time.perf_counter()
    # the prompt by keyword: FLUX.2's pipeline takes `image` first
    if controls:
        with control(pipe, *controls) as session:
            result = pipe(prompt=prompt, **call_kwargs)
        maps, log = session.maps, session.log
    else:  # the plain pipeline: nothing installed
        result, maps, log = pipe(prompt=prompt, **call_kwargs), None, {}
    images, video = _images(result)
    return Generation(
        prompt=prompt,
        controls=controls,
        seed=seed,
        images=images,
        video=video,
        maps=maps,
        log=log,
        seconds=time.perf_counter() - start,
    )


def _add_step_callback(pipe: Any, call_kwargs: dict, on_step: Callable[[int, int], None]) -> None:
    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return
    theirs = call_kwargs.get("callback_on_step_end")

    def callback(p: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if theirs is not None:
            kwargs = theirs(p, step, timestep, kwargs)
        on_step(step + 1, getattr(p, "num_timesteps", None) or len(p.scheduler.timesteps))
        return kwargs

    call_kwargs["callback_on_step_end"] = callback


def _images(result: Any) -> tuple[list[Any], bool]:
    """The images of a pipeline output as PIL (video pipelines: the first video's frames)."""
    from PIL import Image

    from ..processors.maps import to_pil

    images = getattr(result, "images", None)
    video = images is None
    if video:
        images = result.frames[0]
    return [im if isinstance(im, Image.Image) else to_pil(im) for im in images], video
