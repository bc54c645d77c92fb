"""`attnctl bench pag`: the cost of perturbed-branch guidance, CFG + SoftPAG against CFG alone.

Per model, each sample is generated with CFG alone and with CFG + SoftPAG back to back (same
prompt, seed and steps), so that load changes on a shared machine hit both sides alike; the
reported ratio is the median of the per-pair ratios, with the spread.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..core.session import control
from ..processors.softpag import SoftPAG

MODELS = ("testbed", "sd3")


def run_pag(
    models: tuple[str, ...] = MODELS,
    samples: int = 8,
    batch: str = "auto",
    json_out: str | Path | None = None,
    log: Any = print,
) -> dict:
    """Time CFG and CFG + SoftPAG on each model; returns the report (also written to `json_out`)."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"models={list(models)} is not allowed: a non-empty subset of {list(MODELS)}")
    if samples < 1:
        raise ValueError(f"samples={samples} is not allowed: an integer >= 1")
    report: dict[str, Any] = {
        "config": {"samples": samples, "batch": batch, "threads": torch.get_num_threads()}
    }
    for name in models:
        pipe, kwargs, layers = _setup(name)
        heads = {layer: [0] for layer in layers}
        control = SoftPAG(heads, u=1.0, scale=3.0, batch=batch)
        _generate(pipe, kwargs, 0, ())  # warm-up: first-call costs out of the timing
        _generate(pipe, kwargs, 0, (control,))
        plain, guided = [], []
        for i in range(samples):
            plain.append(_generate(pipe, kwargs, i, ()))
            guided.append(_generate(pipe, kwargs, i, (control,)))
        ratios = [g / p for g, p in zip(guided, plain, strict=True)]
        report[name] = {
            "call": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))},
            "perturbed_layers": layers,
            "cfg_seconds": statistics.median(plain),
            "cfg_softpag_seconds": statistics.median(guided),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratios": ratios,
        }
        if log:
            r = report[name]
            log(
                f"{name}: CFG {r['cfg_seconds']:.3f} s, CFG + SoftPAG {r['cfg_softpag_seconds']:.3f} s per image, "
                f"ratio {r['ratio_median']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] over {samples} pairs"
            )
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1))
    return report


def _setup(name: str) -> tuple[Any, dict, list[str]]:
    """The pipeline, its call settings and the perturbed layers (one head each) of a benchmark model."""
    from ..tiny import tiny_call_kwargs, tiny_pipeline

    if name == "testbed":
        from ..testbed import load_pipeline

        pipe = load_pipeline()
        kwargs = {"num_inference_steps": 25, "guidance_scale": 7.5}
    else:
        pipe = tiny_pipeline("sd3")
        kwargs = tiny_call_kwargs("sd3", num_inference_steps=10, height=128, width=128, output_type="latent")
    pipe.set_progress_bar_config(disable=True)
    with control(pipe) as ctl:
        perturbable = [x for x in ctl.layers if x.kind in ("self", "joint")]
    # the layers PAG perturbs by default: SD's mid block; on a DiT, the middle block
    mid = [x.name for x in perturbable if x.block == "mid_block"]
    if not mid:
        blocks = list(dict.fromkeys(x.block for x in perturbable))
        mid = [x.name for x in perturbable if x.block == blocks[len(blocks) // 2]]
    return pipe, kwargs, mid


def _generate(pipe: Any, kwargs: dict, seed: int, controls: tuple) -> float:
    prompt = "a red circle and a blue square"
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if controls:
        with control(pipe, *controls):
            pipe(prompt=prompt, generator=generator, **kwargs)
    else:  # CFG alone: the unmodified pipeline
        pipe(prompt=prompt, generator=generator, **kwargs)
    return time.perf_counter() - start
