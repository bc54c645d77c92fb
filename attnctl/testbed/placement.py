"""Placement benchmark on the shapes model: does each prompted object land in the box asked for it?

Held-out two- and three-object prompts (`data.bench_prompts`); each sample asks for the boxes of a
layout the testbed renderer itself draws (`data.render_random` with the sample's seed, boxes
normalised by the image size), one box per object in caption order, and gives every box its
object's words as a region prompt ("a red circle"). Every method sees the same prompts, seeds and
boxes. Per object: `in_box` (a detection of its colour and shape with IoU >= 0.5 against its box:
the AP50 analogue), its best IoU (0 when absent; the mean is mIoU), `centre_in_box` (a looser
check: such a detection centred inside the box), `present` (its shape detected) and `bound` (its
shape detected in its colour); per image: `all_present`, `all_in_box`. Rates carry Wilson 95%
intervals, means Student-t ones; time is also reported as a paired ratio to the first method.

Methods: `none` (the prompt alone), `mask_and_sum` and `crop_merge` (Layout's modes, defaults
otherwise), and diagnostics of crop_merge's choices: `crop_merge_every_step` (prompt_fraction=1: the boxes
held to the last step), `crop_merge_span` (region prompts with their start and end tokens),
`crop_merge_all` (base_outside="all": a region's words of the prompt stay visible outside its box)
and `hide_words` (base_outside="other_regions" without sub-prompt tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import BENCH_SEED, _ci_cell, mean_ci, paired_time_ratios, wilson, write_report
from .data import IMAGE_SIZE, bench_prompts, parse_caption, render_random
from .detector import box_iou, detect

# Seeds of this benchmark (distinct from the compose and maps benchmarks').
PLACEMENT_SEED = BENCH_SEED + 700_000
SIZES = (2, 3)
IOU = 0.5


def _regions(prompt: str, boxes: list[tuple[float, ...]]) -> list:
    from ..processors.layout import Region

    return [Region(box, f"a {c} {s}") for (c, s), box in zip(parse_caption(prompt), boxes, strict=True)]


# Method name -> controls for a prompt and its boxes.
METHODS: dict[str, Callable[[str, list], list]] = {
    "none": lambda prompt, boxes: [],
    "mask_and_sum": lambda prompt, boxes: [_layout(prompt, boxes, mode="mask_and_sum")],
    "crop_merge": lambda prompt, boxes: [_layout(prompt, boxes)],
    "crop_merge_every_step": lambda prompt, boxes: [_layout(prompt, boxes, prompt_fraction=1.0)],
    "crop_merge_span": lambda prompt, boxes: [_layout(prompt, boxes, region_tokens="span")],
    "crop_merge_all": lambda prompt, boxes: [_layout(prompt, boxes, base_outside="all")],
    "hide_words": lambda prompt, boxes: [
        _layout(prompt, boxes, base_outside="other_regions", sub_prompts=False)
    ],
}
RATES = ("in_box", "centre_in_box", "all_in_box", "all_present", "binding")


def _layout(prompt: str, boxes: list, **options: Any) -> Any:
    from ..processors.layout import Layout

    return Layout(_regions(prompt, boxes), **options)


def sample_boxes(seed: int, n_objects: int) -> list[tuple[float, float, float, float]]:
    """The boxes of the renderer's own random layout for `seed`, normalised (x0, y0, x1, y1)."""
    sample = render_random(np.random.default_rng(seed), n_objects=n_objects)
    return [tuple(v / IMAGE_SIZE for v in obj.box) for obj in sample.objects]


def run_placement(
    method: str | list[str] = "none,mask_and_sum,crop_merge",
    n_prompts: int = 10,
    n_seeds: int = 10,
    sizes: tuple[int, ...] = SIZES,
    model: str | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    json_out: str | Path | None = None,
    pipe: Any = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """`n_prompts` prompts x `n_seeds` seeds per object count, every method on every sample."""
    methods = [m.strip() for m in method.split(",")] if isinstance(method, str) else list(method)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method {m!r} is not one of {sorted(METHODS)}")
    if n_prompts < 1 or n_seeds < 1:
        raise ValueError(f"n_prompts and n_seeds must be >= 1, got {n_prompts} and {n_seeds}")
    if not sizes or any(s not in SIZES for s in sizes):
        raise ValueError(f"sizes={list(sizes)} is not allowed: a non-empty subset of {list(SIZES)}")
    if pipe is None:
        from . import load_pipeline

        pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    records = []
    total = len(sizes) * n_prompts * n_seeds * len(methods)
    for size in sizes:
        pool = bench_prompts(size)
        for slot in range(n_prompts):
            prompt = pool[slot % len(pool)]
            for k in range(n_seeds):
                seed = PLACEMENT_SEED + 10_000 * size + 100 * slot + k
                boxes = sample_boxes(seed, size)
                for m in methods:
                    record = _generate_and_score(pipe, m, prompt, boxes, seed, steps, guidance_scale)
                    record.update(n_objects=size, method=m)
                    records.append(record)
                    if log:
                        placed = sum(o["in_box"] for o in record["objects"])
                        log(
                            f"[{len(records)}/{total}] {m}: {placed}/{size} in box {prompt!r} seed {seed} "
                            f"({record['seconds']:.2f}s)"
                        )

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
            "seed": PLACEMENT_SEED,
            "iou": IOU,
            "torch_threads": torch.get_num_threads(),
        },
        "results": {m: summarize_placement(rows) for m, rows in by_method.items()},
        "time_ratio": paired_time_ratios(by_method),
        "records": records,
    }
    write_report(report, json_out)
    if log:
        log(format_placement(report))
    return report


def summarize_placement(records: list[dict]) -> dict:
    """Per object count and overall: rates with Wilson 95% CIs, mIoU and seconds with t 95% CIs."""
    groups = {str(size): [r for r in records if r["n_objects"] == size] for size in SIZES}
    groups["overall"] = records
    out = {}
    for name, rows in groups.items():
        if not rows:
            continue
        objects = [o for r in rows for o in r["objects"]]
        out[name] = {
            "n_images": len(rows),
            "in_box": wilson(sum(o["in_box"] for o in objects), len(objects)),
            "mean_iou": mean_ci([o["iou"] for o in objects]),
            "centre_in_box": wilson(sum(o["centre_in_box"] for o in objects), len(objects)),
            "all_in_box": wilson(sum(r["all_in_box"] for r in rows), len(rows)),
            "all_present": wilson(sum(r["all_present"] for r in rows), len(rows)),
            "binding": wilson(sum(o["bound"] for o in objects), len(objects)),
            "seconds_per_image": mean_ci([r["seconds"] for r in rows]),
        }
    return out


def format_placement(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"placement benchmark: prompts/size={cfg['n_prompts']} seeds={cfg['n_seeds']} sizes={cfg['sizes']} "
        f"steps={cfg['steps']} guidance={cfg['guidance_scale']}",
        f"{'method':<26}{'objects':<8}{'images':>7}  "
        + "  ".join(f"{m:>22}" for m in ("in_box", "mean_iou", *RATES[1:], "s/image", "time ratio")),
    ]
    for method, results in report["results"].items():
        ratio = report["time_ratio"][method]
        for name, row in results.items():
            cells = []
            for m in ("in_box", "mean_iou", *RATES[1:]):
                r = row[m]
                if "rate" in r:
                    cells.append(f"{r['rate']:6.1%} [{r['ci_low']:5.1%},{r['ci_high']:5.1%}]")
                else:
                    cells.append(_ci_cell(r))
            cells.append(_ci_cell(row["seconds_per_image"]))
            cells.append(_ci_cell(ratio) if name == "overall" else "")
            lines.append(
                f"{method:<26}{name:<8}{row['n_images']:>7}  " + "  ".join(f"{c:>22}" for c in cells)
            )
    return "\n".join(lines)


def _generate_and_score(
    pipe: Any, method: str, prompt: str, boxes: list, seed: int, steps: int, guidance_scale: float
) -> dict:
    from ..pipelines.generate import generate

    controls = METHODS[method](prompt, boxes)
    result = generate(pipe, prompt, controls, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return {"prompt": prompt, "seed": seed, "seconds": result.seconds, **score(result.image, prompt, boxes)}


def score(image: Any, prompt: str, boxes: list) -> dict:
    """Per object of `prompt` (caption order) against its normalised box, and per image."""
    found = detect(image)
    objects = []
    for (color, shape), box in zip(parse_caption(prompt), boxes, strict=True):
        pixels = tuple(round(v * IMAGE_SIZE) for v in box)
        mine = [d for d in found if d.color == color and d.shape == shape]
        iou = max((box_iou(d.box, pixels) for d in mine), default=0.0)
        centred = any(
            pixels[0] <= (d.box[0] + d.box[2]) / 2 < pixels[2]
            and pixels[1] <= (d.box[1] + d.box[3]) / 2 < pixels[3]
            for d in mine
        )
        objects.append(
            {
                "color": color,
                "shape": shape,
                "box": list(box),
                "iou": iou,
                "in_box": iou >= IOU,
                "centre_in_box": centred,
                "present": any(d.shape == shape for d in found),
                "bound": bool(mine),
            }
        )
    return {
        "objects": objects,
        "all_present": all(o["present"] for o in objects),
        "all_in_box": all(o["in_box"] for o in objects),
        "found": [f"{d.color} {d.shape} {list(d.box)}" for d in found],
    }
