"""Localisation benchmark: does a word's cross-attention fall inside its object's box?

For held-out two- and three-object prompts, every image is generated with a recorder on every
text-attending layer. Per word, the conditional image's map is averaged over heads and denoising
steps. For each prompted object the detector finds in the generated image (with its prompted colour
and shape), and for its colour word and its shape word:

    in-box ratio = (share of the word's attention inside the object's box) / (box's share of the image)

1 means no localisation (the word attends everywhere alike); the box sits on the map at the
image's resolution (each map cell covers image_size / side pixels). Reported as the median over
objects, per layer, per resolution (maps of a resolution's layers averaged) and for the layers the
methods read by default (`working_layers`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.attention import AttentionCall, AttentionEdit
from ..core.layers import working_layers
from .bench import BENCH_SEED, write_report
from .data import bench_prompts, parse_caption
from .detector import detect

# Seeds of this benchmark (distinct from the compose benchmark's).
MAPS_SEED = BENCH_SEED + 500_000
WORD_KINDS = ("colour", "shape")


def run_maps(
    n_prompts: int = 12,
    n_seeds: int = 2,
    sizes: tuple[int, ...] = (2, 3),
    model: str | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    json_out: str | Path | None = None,
    pipe: Any = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Generate `n_prompts` x `n_seeds` images per object count, measure the in-box ratios, report."""
    from ..core.session import control

    if n_prompts < 1 or n_seeds < 1:
        raise ValueError(f"n_prompts and n_seeds must be >= 1, got {n_prompts} and {n_seeds}")
    if not sizes or any(s not in (2, 3) for s in sizes):
        raise ValueError(f"sizes={list(sizes)} is not allowed: a non-empty subset of [2, 3]")
    if pipe is None:
        from . import load_pipeline

        pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    rows: list[dict] = []  # one per (object, word kind)
    default: set[str] = set()
    grids: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    for size in sizes:
        pool = bench_prompts(size)
        for slot in range(n_prompts):
            prompt = pool[slot % len(pool)]
            pairs = parse_caption(prompt)
            words = [w for pair in pairs for w in pair]
            for k in range(n_seeds):
                seed = MAPS_SEED + 10_000 * size + 100 * slot + k
                recorder = _LayerMaps(words)
                with control(pipe) as ctl:
                    text = [layer for layer in ctl.layers if layer.kind in ("cross", "joint")]
                    ctl.add_edit(text, recorder)
                    out = pipe(
                        prompt,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=torch.Generator().manual_seed(seed),
                    )
                    default = {layer.name for layer in working_layers(ctl.layers, *ctl.grid[1:])}
                image = out.images[0]
                found = detect(image)
                maps = recorder.mean_maps()
                grids.update({name: tuple(m.shape) for name, m in next(iter(maps.values())).items()})
                measured = 0
                for color, shape in pairs:
                    hits = [d for d in found if d.color == color and d.shape == shape]
                    if not hits:
                        continue  # the object is not there as prompted: no box to measure against
                    box = max(hits, key=lambda d: d.area).box
                    measured += 1
                    for kind, word in zip(WORD_KINDS, (color, shape), strict=True):
                        ratios = {name: in_box_ratio(m, box, image.size) for name, m in maps[word].items()}
                        rows.append(
                            {
                                "prompt": prompt,
                                "seed": seed,
                                "n_objects": size,
                                "word": word,
                                "kind": kind,
                                "box": list(box),
                                "layers": ratios,
                                "resolutions": _per_resolution(maps[word], box, image.size),
                                "default": in_box_ratio(
                                    _mean([maps[word][n] for n in sorted(default)]), box, image.size
                                ),
                            }
                        )
                if log:
                    log(f"{prompt!r} seed {seed}: {measured}/{len(pairs)} objects found as prompted")

    report = {
        "config": {
            "n_prompts": n_prompts,
            "n_seeds": n_seeds,
            "sizes": list(sizes),
            "model": model or "bundled",
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": MAPS_SEED,
            "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - start,
        },
        "default_layers": sorted(default),
        "layer_grids": {name: list(g) for name, g in sorted(grids.items())},
        "summary": summarize_maps(rows),
        "records": rows,
    }
    write_report(report, json_out)
    if log:
        log(format_maps(report))
    return report


def in_box_ratio(grid_map: torch.Tensor, box: tuple[int, ...], image_size: tuple[int, int]) -> float:
    """Share of `grid_map`'s mass inside `box` (pixels, x1/y1 exclusive) over the box's area share."""
    width, height = image_size
    m = F.interpolate(grid_map[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    x0, y0, x1, y1 = box
    inside = m[y0:y1, x0:x1].sum() / m.sum().clamp_min(1e-20)
    return float(inside / ((x1 - x0) * (y1 - y0) / (width * height)))


def summarize_maps(rows: list[dict]) -> dict:
    """Median in-box ratio (and objects counted) per word kind: default layers, each resolution, each layer."""
    out: dict[str, Any] = {}
    for kind in WORD_KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        out[kind] = {
            "n_objects": len(mine),
            "default": statistics.median(r["default"] for r in mine),
            "resolutions": {
                side: statistics.median(r["resolutions"][side] for r in mine)
                for side in mine[0]["resolutions"]
            },
            "layers": {
                name: statistics.median(r["layers"][name] for r in mine) for name in mine[0]["layers"]
            },
        }
    return out


def format_maps(report: dict) -> str:
    """The summary as text: one line per layer and per resolution, colour and shape side by side."""
    s = report["summary"]
    if not s:
        return "maps benchmark: no object was generated as prompted, nothing to measure"
    kinds = [k for k in WORD_KINDS if k in s]
    ref = s[kinds[0]]
    head = f"{'':<64}" + "".join(f"{k:>10}" for k in kinds)
    lines = [
        f"maps benchmark: median in-box ratio over {ref['n_objects']} objects "
        f"(1 = no localisation); default layers {report['default_layers']}",
        head,
        f"{'default layers':<64}" + "".join(f"{s[k]['default']:>10.2f}" for k in kinds),
    ]
    for side in ref["resolutions"]:
        lines.append(
            f"{'resolution ' + side:<64}" + "".join(f"{s[k]['resolutions'][side]:>10.2f}" for k in kinds)
        )
    for name in ref["layers"]:
        grid = "x".join(str(g) for g in report["layer_grids"][name])
        lines.append(
            f"{name + ' (' + grid + ')':<64}" + "".join(f"{s[k]['layers'][name]:>10.2f}" for k in kinds)
        )
    return "\n".join(lines)


class _LayerMaps(AttentionEdit):
    """Sums each word's head-averaged map of the conditional image, per layer, over steps."""

    def __init__(self, words: list[str]):
        self.words = words
        self.sums: dict[str, dict[str, torch.Tensor]] = {w: {} for w in words}
        self.counts: dict[str, int] = {}
        self._positions: dict[str, list[int]] | None = None

    def active(self, session: Any, layer: Any) -> bool:
        return bool(session.cond_rows)

    def observe(self, call: AttentionCall) -> None:
        if self._positions is None:  # the prompt is known once the pipeline encoded it
            self._positions = {w: call.session.text_positions(w)[0] for w in self.words}
        columns = sorted({c for pos in self._positions.values() for c in pos})
        probs = call.text_probs(columns)[0]  # [N, C] of the first conditional image
        index = {c: i for i, c in enumerate(columns)}
        grid = (call.layout.height, call.layout.width)
        name = call.layer.name
        for word, pos in self._positions.items():
            m = probs[:, [index[c] for c in pos]].mean(-1).reshape(grid).detach()
            sums = self.sums[word]
            sums[name] = sums[name] + m if name in sums else m.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def mean_maps(self) -> dict[str, dict[str, torch.Tensor]]:
        return {w: {n: s / self.counts[n] for n, s in sums.items()} for w, sums in self.sums.items()}


def _per_resolution(maps: dict[str, torch.Tensor], box: tuple[int, ...], image_size: tuple[int, int]) -> dict:
    by_side: dict[str, list[torch.Tensor]] = {}
    for m in maps.values():
        by_side.setdefault(f"{m.shape[0]}x{m.shape[1]}", []).append(m)
    return {side: in_box_ratio(_mean(ms), box, image_size) for side, ms in sorted(by_side.items())}


def _mean(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(maps).mean(0)
