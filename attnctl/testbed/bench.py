"""Compositional benchmark on the shapes model: are the prompted objects there, in the prompted colours?

Prompts come from `data.bench_prompts` (all single objects; two- and three-object combinations held
out of training). Every image is scored by the detector. Rates carry Wilson 95% intervals
(objects in one image are counted as independent trials, which makes per-object intervals a little
narrow); seconds per image carry a Student-t 95% interval.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..headhunter.distributed import Processes
from .data import bench_prompts, parse_caption
from .detector import detect


def _shapes(prompt: str) -> list[str]:
    """The subject words of a testbed prompt (its shapes), what the guidance methods act on."""
    return [shape for _, shape in parse_caption(prompt)]


def _methods() -> dict[str, Callable[[str], list]]:
    from ..processors.guidance import AStar, AttendAndExcite
    from ..processors.regulation import AttentionRegulation
    from ..processors.softpag import PAG, SoftPAG

    return {
        "none": lambda prompt: [],
        "excite": lambda prompt: [AttendAndExcite(_shapes(prompt))],
        "astar": lambda prompt: [AStar(_shapes(prompt))],
        "regulation": lambda prompt: [AttentionRegulation(_shapes(prompt))],
        # PAG on the mid block's self-attention (diffusers' default "mid"), scale 3
        "pag": lambda prompt: [PAG(["mid_block"])],
        # Until a head search ran, a stated rule: half the heads (0 and 1 of 4) of every
        # self-attention layer at the 8x8 level the other methods read, u = 1, scale 3
        "softpag": lambda prompt: [SoftPAG({block: [0, 1] for block in SOFTPAG_BLOCKS})],
    }


SOFTPAG_BLOCKS = ("down_blocks.1", "mid_block", "up_blocks.0")


# Method name -> function from a prompt to the attnctl controls that implement it (paper defaults).
METHODS: dict[str, Callable[[str], list]] = _methods()
# "softpag:RESULT": SoftPAG on the heads a head search selected (its result JSON), u = 1, scale 3.
RESULT_METHOD = "softpag:"
BENCH_SEED = 424_242
BOOTSTRAP_SEED = 0
SIZES = (1, 2, 3)
RATE_METRICS = ("object_presence", "all_present", "binding", "all_correct")


def run_compose(
    method: str | list[str] = "none",
    n_prompts: int = 12,
    n_seeds: int = 4,
    model: str | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    json_out: str | Path | None = None,
    pipe: Any = None,
    log: Callable[[str], None] | None = print,
    sizes: tuple[int, ...] = SIZES,
) -> dict:
    """Generate `n_prompts` prompts per object count x `n_seeds` seeds, score them, return the report.

    `method` is one name or several (a list or "none,astar"): every method gets the same prompts and
    seeds, run one after the other for each sample so that load changes hit all alike, and seconds
    per image are also reported as a paired ratio to the first method.
    Metrics: `object_presence` (per prompted object: its shape was detected), `all_present` (per
    image: every prompted shape detected), `binding` (per prompted object: its shape detected in the
    prompted colour), `all_correct` (per image: every object with its colour) and seconds per image.
    Under `accelerate launch` the samples are shared out among the processes and only the main
    process writes `json_out` and logs the table; every process returns the whole report.
    """
    methods = [m.strip() for m in method.split(",")] if isinstance(method, str) else list(method)
    controls = {m: method_controls(m) for m in methods}
    if n_prompts < 1 or n_seeds < 1:
        raise ValueError(f"n_prompts and n_seeds must be >= 1, got {n_prompts} and {n_seeds}")
    bad = [size for size in sizes if size not in SIZES]
    if bad or not sizes:
        raise ValueError(f"sizes={list(sizes)} is not allowed: a non-empty subset of {list(SIZES)}")
    procs = Processes()
    if pipe is None:
        from . import load_pipeline

        pipe = procs.to_device(load_pipeline(model))
    pipe.set_progress_bar_config(disable=True)

    samples = [
        (size, prompt, BENCH_SEED + 10_000 * size + 100 * slot + k)
        for size in sizes
        for slot, prompt in enumerate(_cycled(bench_prompts(size), n_prompts))
        for k in range(n_seeds)
    ]
    # Under `accelerate launch` each process runs a contiguous share of the samples (every method on
    # each), and the records come back in sample order: the same report as one process.
    mine = procs.shard(samples)
    where = f"process {procs.index}: " if procs.count > 1 else ""
    own: list[dict] = []
    for size, prompt, seed in mine:
        for m in methods:
            record = _generate_and_score(pipe, controls[m](prompt), prompt, seed, steps, guidance_scale)
            record["n_objects"] = size
            record["method"] = m
            own.append(record)
            if log:
                ok = "ok " if record["all_correct"] else "MISS"
                log(
                    f"{where}[{len(own)}/{len(mine) * len(methods)}] {m}: {ok} {prompt!r} seed {seed}: "
                    f"{record['found']} ({record['seconds']:.2f}s)"
                )
    records = procs.gather(own)

    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    report = {
        "config": {
            "methods": methods,
            "n_prompts": n_prompts,
            "n_seeds": n_seeds,
            "sizes": list(sizes),
            "model": model or "bundled",
            "steps": steps,
            "guidance_scale": guidance_scale,
            "bench_seed": BENCH_SEED,
            "torch_threads": torch.get_num_threads(),
            "processes": procs.count,
        },
        "results": {m: summarize(rows) for m, rows in by_method.items()},
        "time_ratio": paired_time_ratios(by_method),
        "records": records,
    }
    if procs.is_main:
        write_report(report, json_out)
        if log:
            log(format_table(report))
    return report


def method_controls(method: str) -> Callable[[str], list]:
    """The function from a prompt to the controls of a method: a METHODS name, or softpag:RESULT (a
    head-search result JSON; every head it selected)."""
    if method.startswith(RESULT_METHOD) and method != RESULT_METHOD:
        from ..processors.softpag import SoftPAG

        control = SoftPAG(method[len(RESULT_METHOD) :], u=1.0, scale=3.0)
        return lambda prompt: [control]
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {sorted(METHODS)} or {RESULT_METHOD}RESULT.json")
    return METHODS[method]


def summarize(records: list[dict]) -> dict:
    """Per object count and overall: each rate with a Wilson 95% CI, seconds/image with a t 95% CI."""
    groups = {str(size): [r for r in records if r["n_objects"] == size] for size in SIZES}
    groups["2+3"] = [r for r in records if r["n_objects"] in (2, 3)]
    groups["overall"] = records
    out = {}
    for name, rows in groups.items():
        if not rows:
            continue
        objects = [o for r in rows for o in r["objects"]]
        out[name] = {
            "n_images": len(rows),
            "object_presence": wilson(sum(o["present"] for o in objects), len(objects)),
            "all_present": wilson(sum(r["all_present"] for r in rows), len(rows)),
            "binding": wilson(sum(o["bound"] for o in objects), len(objects)),
            "all_correct": wilson(sum(r["all_correct"] for r in rows), len(rows)),
            "seconds_per_image": mean_ci([r["seconds"] for r in rows]),
        }
    return out


def wilson(k: int, n: int, z: float = 1.96) -> dict:
    """Rate k/n with its Wilson score interval."""
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half), "k": k, "n": n}


def mean_ci(values: list[float], resamples: int = 2000) -> dict:
    """Mean with a 95% percentile-bootstrap interval (seeded, so the same values give the same
    interval). The interval lies within the values' range, so that of a positive or bounded quantity
    (seconds, IoU, time ratios) stays positive or bounded, where a Student-t interval on skewed
    samples reaches below zero."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    rng = random.Random(BOOTSTRAP_SEED)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    return {"mean": mean, "ci_low": min(low, mean), "ci_high": max(high, mean), "n": n}


def format_table(report: dict) -> str:
    """The summary as a fixed-width text table, one block per method."""
    cfg = report["config"]
    width = max(11, *(len(m) + 2 for m in report["results"]))  # softpag:RESULT names are long
    lines = [
        f"compose benchmark: prompts/size={cfg['n_prompts']} seeds={cfg['n_seeds']} sizes={cfg['sizes']} "
        f"steps={cfg['steps']} guidance={cfg['guidance_scale']}",
        f"{'method':<{width}}{'objects':<8}{'images':>7}  "
        + "  ".join(f"{m:>22}" for m in (*RATE_METRICS, "s/image", "time ratio")),
    ]
    for method, results in report["results"].items():
        ratio = report["time_ratio"][method]
        for name, row in results.items():
            cells = []
            for m in RATE_METRICS:
                r = row[m]
                cells.append(f"{r['rate']:6.1%} [{r['ci_low']:5.1%},{r['ci_high']:5.1%}]")
            cells.append(_ci_cell(row["seconds_per_image"]))
            cells.append(_ci_cell(ratio) if name == "overall" else "")
            lines.append(
                f"{method:<{width}}{name:<8}{row['n_images']:>7}  " + "  ".join(f"{c:>22}" for c in cells)
            )
    return "\n".join(lines)


def paired_time_ratios(by_method: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method, its seconds over the first method's, sample by sample (the same prompts and
    seeds in the same order): mean and t 95% interval."""
    base = next(iter(by_method))
    return {
        m: {
            "to": base,
            **mean_ci([a["seconds"] / b["seconds"] for a, b in zip(rows, by_method[base], strict=True)]),
        }
        for m, rows in by_method.items()
    }


def write_report(report: dict, json_out: str | Path | None) -> None:
    """Write a benchmark report as JSON (nothing without a path)."""
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1))


def _ci_cell(s: dict) -> str:
    lo = "-" if s["ci_low"] is None else f"{s['ci_low']:.2f}"
    hi = "-" if s["ci_high"] is None else f"{s['ci_high']:.2f}"
    return f"{s['mean']:6.2f} [{lo},{hi}]"


def _cycled(pool: list[str], n: int) -> list[str]:
    """The first `n` prompts of `pool`, cycled when more are asked than it holds."""
    return [pool[i % len(pool)] for i in range(n)]


def _generate_and_score(
    pipe, controls: list, prompt: str, seed: int, steps: int, guidance_scale: float
) -> dict:
    from ..pipelines.generate import generate

    result = generate(pipe, prompt, controls, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return {"prompt": prompt, "seed": seed, "seconds": result.seconds, **score_image(result.image, prompt)}


def score_image(image: Any, prompt: str) -> dict:
    """What the detector finds of a testbed prompt's objects in an image: per object whether its shape
    is there (`present`) and in the prompted colour (`bound`); per image `all_present`, `all_correct`."""
    found = detect(image)
    objects = []
    for color, shape in parse_caption(prompt):
        colors_of_shape = {d.color for d in found if d.shape == shape}
        objects.append(
            {
                "color": color,
                "shape": shape,
                "present": bool(colors_of_shape),
                "bound": color in colors_of_shape,
            }
        )
    return {
        "objects": objects,
        "all_present": all(o["present"] for o in objects),
        "all_correct": all(o["bound"] for o in objects),
        "found": [f"{d.color} {d.shape} {list(d.box)}" for d in found],
    }
