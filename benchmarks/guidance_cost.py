"""Cost of latent guidance (Attend-and-Excite, A-STAR) against the same run without guidance.

Target: Attend-and-Excite <= 3x and A-STAR <= 1.6x the time of the unguided run.

Models: `sd15`, `tiny_pipeline("sd")` with SD 1.5's UNet layout (four levels: three cross-attention
down blocks then a plain one, a plain up block then three cross-attention ones, two layers per
block, 8 heads; channels 32/64/128/128 instead of 320/640/1280/1280). On a 64x64 latent (128 px
through the tiny 2x VAE) its token grids are SD 1.5's at 512 px, 64, 32, 16 and 8, and guidance
reads the 16x16 maps as on SD 1.5. `testbed`, the bundled shapes model at its own size.

Each sample runs none, excite and astar back to back (same prompt, seed and steps; paper defaults).
Time is the process's CPU time (torch on one thread): on a shared machine wall time also counts
the time other processes hold the cores, which changes from one run to the next; both are written.
Reported: seconds per method (median) and the per-sample ratios to none (median, min, max).
Latent output: the VAE decode is the same for every method and not under test.

    python benchmarks/guidance_cost.py [--model sd15] [--samples 2] [--steps 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import attnctl

# SD 1.5's UNet layout (its config's block types, layers per block and heads) at tiny widths
SD15_LAYOUT = {
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8,
    "sample_size": 64,
}
METHODS = ("none", "excite", "astar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "testbed"), default="sd15")
    parser.add_argument("--samples", type=int, default=2, help="samples (prompt, seed) per method")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time is then the time of one core's work
    report = measure(args.model, args.samples, args.steps)
    for m in METHODS:
        r = report["methods"][m]
        print(
            f"{m:<7} {r['cpu_seconds_median']:8.2f} s/image  ratio to none {r['ratio_median']:.2f}x "
            f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]  (wall {r['wall_ratio_median']:.2f}x)  "
            f"latent updates/image {r['updates_median']:g}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


def measure(model: str, samples: int, steps: int) -> dict[str, Any]:
    """Time every method on `samples` (prompt, seed) pairs, back to back per sample."""
    pipe, prompts, size = _model(model)
    call = {"num_inference_steps": steps, "guidance_scale": 7.5, **size}
    for m in METHODS:  # warm-up: first-call costs out of the timing
        _generate(pipe, m, *prompts[0], seed=0, call={**call, "num_inference_steps": 2})
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for i in range(samples):
        prompt, words = prompts[i % len(prompts)]
        for m in METHODS:
            runs[m].append(_generate(pipe, m, prompt, words, seed=i, call=call))
    methods = {}
    for m, rows in runs.items():
        ratios = [r["cpu"] / b["cpu"] for r, b in zip(rows, runs["none"], strict=True)]
        wall = [r["wall"] / b["wall"] for r, b in zip(rows, runs["none"], strict=True)]
        methods[m] = {
            "runs": rows,
            "cpu_seconds_median": statistics.median(r["cpu"] for r in rows),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratios": ratios,
            "wall_ratio_median": statistics.median(wall),
            "updates_median": statistics.median(r["updates"] for r in rows),
        }
    return {
        "benchmark": "guidance_cost",
        "model": {"name": model, **(SD15_LAYOUT if model == "sd15" else {})},
        "call": {**call, "output_type": "latent"},
        "samples": samples,
        "torch_threads": torch.get_num_threads(),
        "methods": methods,
    }


def _model(name: str) -> tuple[Any, list[tuple[str, list[str]]], dict]:
    """The pipeline, (prompt, subject words) pairs and image size of a benchmark model."""
    if name == "testbed":
        from attnctl.testbed import load_pipeline
        from attnctl.testbed.data import bench_prompts, parse_caption

        pipe = load_pipeline()
        prompts = [(p, [shape for _, shape in parse_caption(p)]) for p in bench_prompts(2)[:2]]
        size = {}
    else:
        from attnctl.tiny import tiny_pipeline

        pipe = tiny_pipeline("sd", **SD15_LAYOUT)
        prompts = [("a cat and a frog", ["cat", "frog"]), ("a red dog and a blue bird", ["dog", "bird"])]
        size = {"height": 128, "width": 128}
    pipe.set_progress_bar_config(disable=True)
    return pipe, prompts, size


def _generate(pipe: Any, method: str, prompt: str, words: list[str], seed: int, call: dict) -> dict:
    """CPU and wall seconds of one generation, and the number of latent updates guidance made."""
    controls = {"none": [], "excite": [attnctl.AttendAndExcite(words)], "astar": [attnctl.AStar(words)]}[
        method
    ]
    generator = torch.Generator().manual_seed(seed)
    cpu, wall = time.process_time(), time.perf_counter()
    if not controls:  # the unmodified pipeline
        pipe(prompt, generator=generator, output_type="latent", **call)
        updates = 0
    else:
        with attnctl.control(pipe, *controls) as ctl:
            pipe(prompt, generator=generator, output_type="latent", **call)
        updates = sum(len(entries) for entries in ctl.log.values())
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "updates": updates}


if __name__ == "__main__":
    main()
