"""`attnctl bench pag`: the cost of perturbed-branch guidance.

Two comparisons, each on pairs of runs timed back to back (same prompt, seed and steps) so that load
changes on a shared machine hit both sides alike; the reported ratio is the median of the per-pair
ratios, with the spread:

- `against="cfg"`: CFG + SoftPAG against CFG alone (the unmodified pipeline), on the bundled
  testbed and tiny SD3;
- `against="diffusers"`: attnctl's `PAG` against diffusers' own PAG pipeline
  (`StableDiffusionPAGPipeline`, `StableDiffusionXLPAGPipeline`, `StableDiffusion3PAGPipeline`) on
  the same weights (`from_pipe`), tiny SD, SDXL and SD3. Both sides include what a call costs each
  time: diffusers' pipeline sets its PAG processors at every call, attnctl enters `control()`.
  The first pair's latents are compared too (`max_abs_diff`): the two compute the same guidance.

The two sides of a pair alternate which runs first (ABBA), so neither always runs on a warmer cache.
Time is the process's CPU time (with torch on one thread, the work of one core; on a shared machine
wall time also counts the time other processes hold the cores) and wall time; both are reported.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.session import control
from ..processors.softpag import PAG, SoftPAG

MODELS = ("testbed", "sd3")
AGAINST = ("cfg", "diffusers")
# Tiny models with a diffusers PAG pipeline: its class, diffusers' `pag_applied_layers` and the
# attnctl PAG that equals it (tests/test_softpag.py checks they agree within 1e-4).
DIFFUSERS_PAG = {
    "sd": ("StableDiffusionPAGPipeline", ["mid"], {"layers": ["mid_block"]}),
    "sdxl": ("StableDiffusionXLPAGPipeline", ["mid"], {"layers": ["mid_block"]}),
    "sd3": (
        "StableDiffusion3PAGPipeline",
        ["blocks.1"],
        {"layers": ["transformer_blocks.1"], "scope": "image"},
    ),
}
PROMPT = "a red circle and a blue square"
PAG_SCALE = 3.0


def run_pag(
    models: tuple[str, ...] | None = None,
    samples: int = 8,
    batch: str = "auto",
    json_out: str | Path | None = None,
    log: Any = print,
    against: str = "cfg",
    steps: int | None = None,
    size: int | None = None,
) -> dict:
    """Time each model's pairs; returns the report (also written to `json_out`).

    against: "cfg" (CFG + SoftPAG over CFG alone; models from MODELS) or "diffusers" (attnctl's PAG
    over diffusers' PAG pipeline; models from DIFFUSERS_PAG). steps: denoising steps (None: each
    comparison's own, 25 on the testbed and 10 on tiny models). size: with "diffusers", the image
    height and width in pixels (None: the tiny model's own small size; tiny SD3 has a token per 4 px
    side, so 256 gives SD3's 4,096 image tokens at 1024 px)."""
    if against not in AGAINST:
        raise ValueError(f"against={against!r} is not allowed: one of {list(AGAINST)}")
    allowed = MODELS if against == "cfg" else tuple(DIFFUSERS_PAG)
    models = allowed if models is None else tuple(models)
    bad = [m for m in models if m not in allowed]
    if bad or not models:
        raise ValueError(f"models={list(models)} is not allowed: a non-empty subset of {list(allowed)}")
    if samples < 1:
        raise ValueError(f"samples={samples} is not allowed: an integer >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} is not allowed: an integer >= 1")
    if size is not None and (against != "diffusers" or size < 8 or size % 8):
        raise ValueError(f"size={size} is not allowed: a multiple of 8 pixels, with against='diffusers'")
    report: dict[str, Any] = {
        "config": {
            "against": against,
            "samples": samples,
            "batch": batch,
            "steps": steps,
            "size": size,
            "threads": torch.get_num_threads(),
        }
    }
    for name in models:
        if against == "cfg":
            report[name] = _versus_cfg(name, samples, batch, steps)
        else:
            report[name] = _versus_diffusers(name, samples, batch, steps, size)
        if log:
            log(_summary(name, report[name], against, samples))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1))
    return report


def _versus_cfg(name: str, samples: int, batch: str, steps: int | None) -> dict:
    pipe, kwargs, layers = _setup(name, steps)
    heads = {layer: [0] for layer in layers}
    guided = SoftPAG(heads, u=1.0, scale=PAG_SCALE, batch=batch)

    def plain_run(seed: int) -> Any:
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs)

    def guided_run(seed: int) -> Any:
        with control(pipe, guided):
            return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs)

    plain, ours = _pairs(plain_run, guided_run, samples)
    row = {
        "call": _plain_values(kwargs),
        "perturbed_layers": layers,
        "cfg_seconds": statistics.median(t["cpu"] for t in plain),
        "cfg_softpag_seconds": statistics.median(t["cpu"] for t in ours),
    }
    return row | _ratios(ours, plain)


def _versus_diffusers(name: str, samples: int, batch: str, steps: int | None, size: int | None) -> dict:
    import diffusers

    from ..tiny import tiny_call_kwargs, tiny_pipeline

    cls, applied, ours_args = DIFFUSERS_PAG[name]
    pipe = tiny_pipeline(name)
    theirs = getattr(diffusers, cls).from_pipe(pipe, pag_applied_layers=applied)
    for p in (pipe, theirs):
        p.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs(name, num_inference_steps=steps or 10, output_type="latent")
    if size is not None:
        kwargs |= {"height": size, "width": size}
    pag = PAG(**ours_args, scale=PAG_SCALE, batch=batch)

    def diffusers_run(seed: int) -> Any:
        generator = torch.Generator().manual_seed(seed)
        return theirs(prompt=PROMPT, generator=generator, pag_scale=PAG_SCALE, **kwargs).images

    def attnctl_run(seed: int) -> Any:
        with control(pipe, pag):
            return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images

    base, ours = _pairs(diffusers_run, attnctl_run, samples)
    row = {
        "call": _plain_values(kwargs),
        "diffusers_pipeline": cls,
        "pag_applied_layers": applied,
        "attnctl": PAG(**ours_args, scale=PAG_SCALE, batch=batch).to_dict(),
        "diffusers_seconds": statistics.median(t["cpu"] for t in base),
        "attnctl_seconds": statistics.median(t["cpu"] for t in ours),
        "max_abs_diff": (ours[0]["output"].float() - base[0]["output"].float()).abs().max().item(),
    }
    return row | _ratios(ours, base)


def _pairs(base: Callable[[int], Any], other: Callable[[int], Any], samples: int) -> tuple[list, list]:
    """`samples` pairs (base, other) on seeds 0, 1, ..., each pair back to back, the order
    alternating from pair to pair; after one warm-up run of each (first-call costs out of the
    timing). The first pair keeps its outputs."""
    base(0), other(0)
    firsts, seconds = [], []
    for i in range(samples):
        order = (base, other) if i % 2 == 0 else (other, base)
        timed = {fn: _timed(fn, i, keep=i == 0) for fn in order}
        firsts.append(timed[base])
        seconds.append(timed[other])
    return firsts, seconds


def _timed(fn: Callable[[int], Any], seed: int, keep: bool) -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    output = fn(seed)
    times = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
    return times | ({"output": output} if keep else {})


def _ratios(ours: list[dict], base: list[dict]) -> dict:
    """Per-pair CPU-time ratios ours / base (median, min, max, all) and the median wall-time ratio."""
    ratios = [o["cpu"] / b["cpu"] for o, b in zip(ours, base, strict=True)]
    wall = [o["wall"] / b["wall"] for o, b in zip(ours, base, strict=True)]
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "wall_ratio_median": statistics.median(wall),
        "wall_ratios": wall,
    }


def _summary(name: str, r: dict, against: str, samples: int) -> str:
    spread = (
        f"ratio {r['ratio_median']:.3f}x [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] over {samples} pairs"
    )
    wall = f"(wall {r['wall_ratio_median']:.3f}x)"
    if against == "cfg":
        return (
            f"{name}: CFG {r['cfg_seconds']:.3f} s, CFG + SoftPAG {r['cfg_softpag_seconds']:.3f} s per image, "
            f"{spread} {wall}"
        )
    return (
        f"{name}: diffusers {r['diffusers_seconds'] * 1e3:.1f} ms, attnctl {r['attnctl_seconds'] * 1e3:.1f} ms "
        f"per image, {spread} {wall}, max |diff| {r['max_abs_diff']:.1e}"
    )


def _plain_values(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))}


def _setup(name: str, steps: int | None) -> tuple[Any, dict, list[str]]:
    """The pipeline, its call settings and the perturbed layers (one head each) of a benchmark model."""
    from ..tiny import tiny_call_kwargs, tiny_pipeline

    if name == "testbed":
        from ..testbed import load_pipeline

        pipe = load_pipeline()
        kwargs = {"num_inference_steps": steps or 25, "guidance_scale": 7.5}
    else:
        pipe = tiny_pipeline("sd3")
        kwargs = tiny_call_kwargs(
            "sd3", num_inference_steps=steps or 10, height=128, width=128, output_type="latent"
        )
    pipe.set_progress_bar_config(disable=True)
    with control(pipe) as ctl:
        perturbable = [x for x in ctl.layers if x.kind in ("self", "joint")]
    # the layers PAG perturbs by default: SD's mid block; on a DiT, the middle block
    mid = [x.name for x in perturbable if x.block == "mid_block"]
    if not mid:
        blocks = list(dict.fromkeys(x.block for x in perturbable))
        mid = [x.name for x in perturbable if x.block == blocks[len(blocks) // 2]]
    return pipe, kwargs, mid
