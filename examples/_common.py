"""Shared by the examples: run a prompt with and without a control, save both images and the heatmaps."""

from __future__ import annotations

from pathlib import Path

import torch

import attnctl
from attnctl.pipelines import load_pipeline


def compare(
    control: attnctl.Control, prompt: str, words: list[str], out: Path, seed: int = 0, steps: int = 25
) -> None:
    """Save baseline.png, controlled.png and maps.png (the controlled words' attention) into `out`."""
    pipe = load_pipeline()  # the bundled testbed model, offline
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
