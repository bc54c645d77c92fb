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

from ..core.controls import Control, _in_range, _range_rule, check
from ..core.session import control

SIZE_MAX = 2**31 - 1  # pixels a side: what 32-bit kernel indices reach


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
    texts = prompt if isinstance(prompt, list) and prompt else [prompt]
    ok = all(isinstance(p, str) and p.strip() and _utf8(p) for p in texts)
    check(ok, "prompt", prompt, "non-empty UTF-8 text (or a non-empty list of such texts)")
    check(isinstance(controls, (list, tuple)), "controls", controls, "a list of controls (or their dicts)")
    controls = [c if isinstance(c, Control) else Control.from_dict(c) for c in controls]
    if seed is not None:
        check(_in_range(seed, True, 0, None), "seed", seed, f"{_range_rule(True, 0, None)} or None")
        call_kwargs["generator"] = torch.Generator().manual_seed(seed)
    if steps is not None:
        most = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
        most = most if _in_range(most, True, 1, None) else None  # a schedule's steps: at most its own
        rule = _range_rule(True, 1, most) + ("" if most is None else " (the scheduler's training timesteps)")
        check(_in_range(steps, True, 1, most), "steps", steps, rule)
        call_kwargs["num_inference_steps"] = steps
    for name in ("height", "width"):
        value = call_kwargs.get(name)
        if value is not None:
            check(
                _in_range(value, True, 1, SIZE_MAX), name, value, f"{_range_rule(True, 1, SIZE_MAX)} (pixels)"
            )
    if (call_kwargs.get("height") is None) != (call_kwargs.get("width") is None):
        # one side given: the other is the pipeline's default (SD's pipeline would drop the one given)
        for name, side in zip(("height", "width"), default_size(pipe), strict=True):
            if call_kwargs.get(name) is None:
                call_kwargs[name] = side
    if call_kwargs.get("guidance_scale") is not None:
        value = call_kwargs["guidance_scale"]
        check(_in_range(value, False, None, None), "guidance_scale", value, _range_rule(False, None, None))
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


def _utf8(text: str) -> bool:
    """Whether `text` is text a tokenizer takes (not, e.g., a command line's undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_size(pipe: Any) -> tuple[int, int]:
    """The (height, width) a pipeline generates when it is given neither: its call's defaults, else
    its denoiser's sample size times the VAE's scale."""
    params = inspect.signature(pipe.__call__).parameters
    given = [params[n].default if n in params else None for n in ("height", "width")]
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
    unet = getattr(pipe, "unet", None)
    sample = unet.config.sample_size if unet is not None else getattr(pipe, "default_sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    side = int(sample * scale)
    h, w = (g if isinstance(g, int) and not isinstance(g, bool) else side for g in given)
    return h, w


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
