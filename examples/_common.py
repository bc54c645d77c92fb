"""Shared by the examples: say what the example shows, keep the output to its own lines, and run a
prompt with and without a control (both images and the heatmaps saved)."""

from __future__ import annotations

from pathlib import Path

import torch

import attnctl
from attnctl.pipelines import load_pipeline, quiet


def setup(about: str | None) -> None:
    """Print the example's purpose (its docstring's first paragraph); no third-party notices or
    progress bars; one torch thread (the bundled and tiny models are small: more threads only wait)."""
    print((about or "").split("\n\n")[0].strip())
    quiet()
    torch.set_num_threads(1)


def bundled_pipeline():
    """The bundled testbed model, offline, without a denoising progress bar."""
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(
    control: attnctl.Control, prompt: str, words: list[str], out: Path, seed: int = 0, steps: int = 25
) -> None:
    """Save baseline.png, controlled.png and maps.png (the controlled words' attention) into `out`."""
    pipe = bundled_pipeline()
    out.mkdir(parents=True, exist_ok=True)

    def generate(*controls: attnctl.Control):
        with attnctl.control(pipe, *controls, attnctl.AttentionMaps(words)) as ctl:
            image = pipe(
                prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)
            ).images[0]
        return image, ctl

    baseline, base_ctl = generate()
    controlled, ctl = generate(control)
    baseline.save(out / "baseline.png")
    controlled.save(out / "controlled.png")
    base_ctl.maps.save_grid(out / "baseline_maps.png", baseline, words)
    ctl.maps.save_grid(out / "maps.png", controlled, words)
    print(f"{type(control).__name__}: wrote {out}/baseline.png, controlled.png, baseline_maps.png, maps.png")
