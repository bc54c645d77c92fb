"""The documentation's figures, all from this one script, on the bundled testbed model.

python docs/figures.py [--only NAME[,NAME...]] [--out docs/img]

Figures (docs/img/<name>.png): overview (the README's top picture), maps, regulation, excite,
astar, pag, layout, draft. Every image comes from a fixed seed, one torch thread on the CPU and the
bundled model, so a rerun writes the same bytes on the same machine and torch build; nothing is
downloaded. The benchmark panels read the committed JSON under benchmarks/results/ and draw it as
measured, negative results included. The PNGs keep 16 levels per colour channel (at most 8/255
off) to stay small. About two minutes on a 2-core CPU. tests/test_docs_figures.py regenerates one
figure and compares it with the committed PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import attnctl
from attnctl.processors.layout import draw_boxes
from attnctl.processors.maps import heatmap
from attnctl.testbed.bench import SOFTPAG_BLOCKS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEPS = 25  # the testbed benchmarks' steps (guidance: the pipeline's 7.5)
TILE = 128  # the overview: a 32 px image shown 4x, pixel for pixel
SMALL = 96  # the method figures: 3x
PROMPT = "a red circle and a blue square and a green triangle"
SHAPES = ["circle", "square", "triangle"]
# The boxes Layout is given for PROMPT's three objects (x0, y0, x1, y1; 0-1, origin top left).
BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.25, 0.5, 0.75, 1.0)]

GREY, BLUE, RED, INK, FAINT = (150, 150, 150), (52, 101, 164), (204, 60, 50), (30, 30, 30), (110, 110, 110)
SERIES = [(52, 101, 164), (204, 60, 50), (78, 154, 6), (117, 80, 123)]


# ---- generation ---------------------------------------------------------------------------------


@functools.cache
def pipeline() -> Any:
    from attnctl.pipelines import load_pipeline

    pipe = load_pipeline()  # the bundled testbed model, offline
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(prompt: str, controls: Sequence[attnctl.Control] = (), seed: int = 0, words: list[str] | None = None):
    """One generation at STEPS steps, recording the maps of `words` (None: none)."""
    controls = list(controls) + ([attnctl.AttentionMaps(words)] if words else [])
    return attnctl.generate(pipeline(), prompt, controls, seed=seed, steps=STEPS)


def methods(words: list[str], boxes: Sequence[tuple] = (), prompt: str = PROMPT) -> dict[str, list]:
    """Each method's controls with the settings of the README's testbed tables."""
    regions = [attnctl.Region(box, f"a {part}") for box, part in zip(boxes, objects(prompt), strict=False)]
    table = {
        "Attention Regulation": [attnctl.AttentionRegulation(words)],
        "Attend-and-Excite": [attnctl.AttendAndExcite(words)],
        "A-STAR": [attnctl.AStar(words)],
        "PAG": [attnctl.PAG(["mid_block"])],
        "SoftPAG": [attnctl.SoftPAG({block: [0, 1] for block in SOFTPAG_BLOCKS})],
    }
    if regions:
        table["Layout"] = [attnctl.Layout(regions)]
    return table


def objects(prompt: str) -> list[str]:
    """'a red circle and a blue square' -> ['red circle', 'blue square']."""
    return [part.strip().removeprefix("a ").strip() for part in prompt.split(" and ")]


# ---- drawing ------------------------------------------------------------------------------------


@functools.cache
def font(size: int) -> Any:
    """Pillow's own font, embedded in Pillow (the same everywhere; Pillow's wheels have the FreeType it needs)."""
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return box[2] - box[0], box[3] - box[1]


def wrap(text: str, width: int, size: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels (a word longer than that keeps its line)."""
    for chars in range(max(8, len(text)), 7, -1):
        lines = textwrap.wrap(text, chars, break_long_words=False)
        if all(text_size(line, size)[0] <= width for line in lines):
            return lines
    return textwrap.wrap(text, 8, break_long_words=False)


def shown(image: Any, px: int = TILE) -> Any:
    """A 32 px image at `px` px, pixel for pixel."""
    return image.convert("RGB").resize((px, px), Image.NEAREST)


def overlay(grid_map: torch.Tensor, image: Any) -> Any:
    """`grid_image`'s tile: the word's heatmap blended over the image, at the image's pixels."""
    base = image.convert("RGB")
    rgb = (heatmap(grid_map, base.size[::-1]) * 255).byte().permute(1, 2, 0).numpy()
    return Image.blend(base, Image.fromarray(rgb), 0.6)


def boxed(image: Any, layout: attnctl.Layout, px: int = TILE) -> Any:
    """The image at `px` px with the layout's boxes drawn by `draw_boxes` (the CLI's layout.png),
    each labelled with its object's shape word (the region prompts are too long for a small tile)."""
    labels = [dataclasses.replace(r, prompt=r.prompt.split()[-1]) for r in layout.regions]
    return draw_boxes(shown(image, px), labels)


@dataclasses.dataclass
class Tile:
    image: Any
    title: str = ""


def panel(
    rows: list[list[Tile | None]],
    labels: Sequence[str] = (),
    heading: str = "",
    note: str = "",
    gap: int = 8,
    size: int = 13,
) -> Any:
    """Tiles in rows, each title centred under its tile, an optional label left of each row, a
    heading above and a note below (None: an empty place)."""
    width = max(t.image.size[0] for row in rows for t in row if t)
    height = max(t.image.size[1] for row in rows for t in row if t)
    line = text_size("Ag", size)[1] + 4
    caption = max(len(wrap(t.title, width, size)) for row in rows for t in row if t) * line
    left = max((text_size(w, size)[0] for label in labels for w in wrap(label, 120, size)), default=0)
    left += gap if labels else 0
    columns = max(len(row) for row in rows)
    sheet_width = 2 * gap + left + columns * width + (columns - 1) * gap
    head = wrap(heading, sheet_width - 2 * gap, size + 3) if heading else []
    foot = wrap(note, sheet_width - 2 * gap, size - 1) if note else []
    head_h = len(head) * (line + 3) + (gap if head else 0)
    foot_h = len(foot) * line
    row_h = height + 4 + caption + gap
    sheet = Image.new("RGB", (sheet_width, gap + head_h + len(rows) * row_h + foot_h + gap), "white")
    draw = ImageDraw.Draw(sheet)
    y = gap
    for text in head:
        draw.text((gap, y), text, fill=INK, font=font(size + 3))
        y += line + 3
    y += gap if head else 0
    for r, row in enumerate(rows):
        if r < len(labels):
            label = wrap(labels[r], 120, size)
            ly = y + (height - len(label) * line) // 2
            for text in label:
                draw.text((gap, ly), text, fill=INK, font=font(size))
                ly += line
        for c, tile in enumerate(row):
            if tile is None:
                continue
            x = gap + left + c * (width + gap)
            sheet.paste(tile.image, (x, y))
            ty = y + height + 4
            for text in wrap(tile.title, width, size):
                tw = text_size(text, size)[0]
                draw.text((x + (width - tw) // 2, ty), text, fill=INK, font=font(size))
                ty += line
        y += row_h
    for text in foot:
        draw.text((gap, y), text, fill=FAINT, font=font(size - 1))
        y += line
    return sheet


def title_strip(text: str, width: int, size: int = 15, gap: int = 8) -> Any:
    """A heading `width` pixels wide, as `panel` draws its own."""
    head = wrap(text, width - 2 * gap, size)
    line = text_size("Ag", size)[1] + 7
    strip = Image.new("RGB", (width, gap + len(head) * line), "white")
    draw = ImageDraw.Draw(strip)
    for i, text_line in enumerate(head):
        draw.text((gap, gap + i * line), text_line, fill=INK, font=font(size))
    return strip


def stack(*parts: Any, gap: int = 4) -> Any:
    """Images one above the other, left-aligned, on white."""
    width = max(p.size[0] for p in parts)
    height = sum(p.size[1] for p in parts) + gap * (len(parts) - 1)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for p in parts:
        sheet.paste(p, (0, y))
        y += p.size[1] + gap
    return sheet


def side(*parts: Any, gap: int = 8) -> Any:
    """Images side by side, top-aligned, on white."""
    width = sum(p.size[0] for p in parts) + gap * (len(parts) - 1)
    sheet = Image.new("RGB", (width, max(p.size[1] for p in parts)), "white")
    x = 0
    for p in parts:
        sheet.paste(p, (x, 0))
        x += p.size[0] + gap
    return sheet


@dataclasses.dataclass
class Bar:
    label: str
    value: float
    low: float | None = None  # an interval drawn as a whisker
    high: float | None = None
    colour: tuple = BLUE
    text: str = ""  # printed after the bar (default: the value)


def bars(
    title: str,
    items: list[Bar],
    scale: float,
    reference: float | None = None,
    ref_label: str = "",
    note: str = "",
) -> Any:
    """A horizontal bar chart: a label left of each bar, the value after it, whiskers for intervals,
    a dashed line at `reference` (e.g. 1x, or the baseline's rate)."""
    size, gap, bar_h, plot_w = 13, 8, 16, 300
    line = text_size("Ag", size)[1] + 4
    left = max(text_size(b.label, size)[0] for b in items) + 2 * gap
    value_w = max(text_size(b.text, size)[0] for b in items) + gap
    width = left + plot_w + value_w + gap
    head = wrap(title, width - 2 * gap, size + 1)
    foot = wrap(note, width - 2 * gap, size - 1) if note else []
    top = gap + len(head) * (line + 1) + gap
    body = len(items) * (bar_h + 6) + line
    sheet = Image.new("RGB", (width, top + body + len(foot) * line + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(head):
        draw.text((gap, gap + i * (line + 1)), text, fill=INK, font=font(size + 1))

    def x_of(v: float) -> int:
        return left + round(plot_w * min(v, scale) / scale)

    for i, b in enumerate(items):
        y = top + i * (bar_h + 6)
        draw.text((left - gap - text_size(b.label, size)[0], y + 1), b.label, fill=INK, font=font(size))
        draw.rectangle((left, y, x_of(b.value), y + bar_h), fill=b.colour)
        end = x_of(b.value)
        if b.low is not None and b.high is not None:
            lo, hi, mid = x_of(b.low), x_of(b.high), y + bar_h // 2
            draw.line((lo, mid, hi, mid), fill=INK, width=1)
            draw.line((lo, y + 3, lo, y + bar_h - 3), fill=INK)
            draw.line((hi, y + 3, hi, y + bar_h - 3), fill=INK)
            end = max(end, hi)
        if reference is not None and end < x_of(reference) + 2:
            end = x_of(reference) + 2  # the value clear of the reference line
        draw.text((end + 4, y + 1), b.text, fill=INK, font=font(size))
    axis_y = top + len(items) * (bar_h + 6)
    draw.line((left, top - 2, left, axis_y), fill=INK)
    if reference is not None:
        x = x_of(reference)
        for y in range(top - 4, axis_y, 6):
            draw.line((x, y, x, min(y + 3, axis_y)), fill=INK)
        tw = text_size(ref_label, size - 1)[0]
        draw.text((max(left, x - tw // 2), axis_y + 2), ref_label, fill=FAINT, font=font(size - 1))
    for i, text in enumerate(foot):
        draw.text((gap, axis_y + line + i * line), text, fill=FAINT, font=font(size - 1))
    return sheet


def nice(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (an axis end)."""
    k = 10.0 ** math.floor(math.log10(value)) if value > 0 else 1.0
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= value)


def lines(title: str, series: list[tuple[str, list[float]]], xlabel: str, ylabel: str) -> Any:
    """Line chart of each series against its index (0, 1, ...), with a legend."""
    size, gap, plot_w, plot_h = 13, 8, 380, 140
    line = text_size("Ag", size)[1] + 4
    y_max = nice(max(v for _, values in series for v in values))
    n = max(len(values) for _, values in series)
    left = 40
    width = left + plot_w + 3 * gap
    head = wrap(title, width - 2 * gap, size + 1)
    top = gap + len(head) * (line + 1) + line
    sheet = Image.new("RGB", (width, top + plot_h + 2 * line + len(series) * line + 2 * gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(head):
        draw.text((gap, gap + i * (line + 1)), text, fill=INK, font=font(size + 1))
    draw.text((gap, top - line), ylabel, fill=FAINT, font=font(size - 1))
    draw.line((left, top, left, top + plot_h, left + plot_w, top + plot_h), fill=INK)

    def xy(k: int, v: float) -> tuple[int, int]:
        return left + round(plot_w * k / max(1, n - 1)), top + plot_h - round(plot_h * v / y_max)

    for v in (0, y_max / 2, y_max):
        _, y = xy(0, v)
        draw.line((left - 3, y, left, y), fill=INK)
        label = f"{v:g}"
        draw.text(
            (left - 6 - text_size(label, size - 2)[0], y - line // 2 + 2),
            label,
            fill=FAINT,
            font=font(size - 2),
        )
    for k in sorted({0, n - 1}):
        x, _ = xy(k, 0)
        draw.line((x, top + plot_h, x, top + plot_h + 3), fill=INK)
        draw.text(
            (x - text_size(str(k), size - 2)[0] // 2, top + plot_h + 4),
            str(k),
            fill=FAINT,
            font=font(size - 2),
        )
    xw = text_size(xlabel, size - 1)[0]
    draw.text((left + (plot_w - xw) // 2, top + plot_h + 4), xlabel, fill=FAINT, font=font(size - 1))
    for i, (label, values) in enumerate(series):
        colour = SERIES[i % len(SERIES)]
        points = [xy(k, v) for k, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        ly = top + plot_h + line + 6 + i * line
        draw.line((left, ly + line // 2, left + 18, ly + line // 2), fill=colour, width=3)
        draw.text((left + 24, ly), label, fill=INK, font=font(size - 1))
    return sheet


def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def rate_bars(report: dict, names: dict[str, str], metric: str, group: str) -> list[Bar]:
    """One bar per method of a testbed benchmark report: `metric`'s rate with its 95% interval."""
    out = []
    for key, label in names.items():
        r = report["results"][key][group][metric]
        colour = GREY if key == "none" else BLUE
        text = f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        out.append(Bar(label, r["rate"], r["ci_low"], r["ci_high"], colour, text))
    return out


# ---- figures ------------------------------------------------------------------------------------


def note(maps: bool = True, scale: int = 4) -> str:
    text = (
        f"Bundled testbed model (32 px images, shown {scale}x pixel for pixel), {STEPS} steps, guidance 7.5; "
        "the images of a row come from the same seed."
    )
    if maps:
        text += " Maps: a word's cross-attention averaged over heads, layers and steps, over the image."
    return text


def overview() -> Any:
    """Baseline and every method on one prompt and seed, then the words' maps with and without Layout."""
    words, seed = SHAPES, 0
    base = run(PROMPT, seed=seed, words=words)
    tiles = [Tile(shown(base.image), "baseline")]
    for name, controls in methods(words, BOXES).items():
        if name == "Layout":
            layout = controls[0]
            laid = run(PROMPT, controls, seed=seed, words=words)
            tiles.append(Tile(boxed(laid.image, layout), "Layout (its boxes drawn)"))
        else:
            tiles.append(Tile(shown(run(PROMPT, controls, seed=seed).image), name))
    base_maps = [Tile(shown(base.image), "baseline")]
    base_maps += [Tile(shown(overlay(base.maps[w], base.image)), f'"{w}"') for w in words]
    laid_maps = [Tile(boxed(laid.image, layout), "Layout")]
    laid_maps += [Tile(boxed(overlay(laid.maps[w], laid.image), layout), f'"{w}"') for w in words]
    return panel(
        [tiles, base_maps, laid_maps],
        labels=["images", "attention maps", "attention maps under Layout"],
        heading=f'attnctl on "{PROMPT}", seed {seed}: the baseline and each method',
        note=note()
        + " Each method with the settings of the README's testbed tables: Attention Regulation, A&E and A-STAR"
        " on the shape words (A&E and A-STAR at the papers' step size, 20); PAG on the mid block and SoftPAG on"
        " heads 0 and 1 of the 8x8 self-attention layers, scale 3; Layout with each object's words in its box.",
    )


MAP_PROMPTS = [
    ("a red circle and a blue square", 0),
    ("a yellow triangle and a green circle", 1),
    ("a blue circle and a red triangle and a yellow square", 2),
]


def maps() -> Any:
    """AttentionMaps: per prompt, the image and every colour and shape word's map over it."""
    rows, labels = [], []
    for prompt, seed in MAP_PROMPTS:
        words = [w for part in objects(prompt) for w in part.split()]
        result = run(prompt, seed=seed, words=words)
        row = [Tile(shown(result.image, SMALL), "image")]
        row += [Tile(shown(overlay(result.maps[w], result.image), SMALL), f'"{w}"') for w in words]
        rows.append(row)
        labels.append(f'"{prompt}", seed {seed}')
    heading = "AttentionMaps: where each colour and shape word of the prompt attends"
    return panel(rows, labels, heading=heading, note=note(scale=3), size=12)


# The samples of the method figures: one prompt at two seeds and a second prompt.
SAMPLES = [(PROMPT, 0), (PROMPT, 1), ("a yellow circle and a red square and a blue triangle", 2)]


def comparison(variants: Callable[[list[str]], list[tuple[str, list]]], with_maps: bool) -> tuple:
    """Per sample a row: the baseline, then each variant from `variants(shape words)`, all from
    the sample's seed; with `with_maps` the shape words' maps follow the baseline and the first
    variant. Returns (rows, row labels, the first variant's results)."""
    rows, labels, first = [], [], []
    for prompt, seed in SAMPLES:
        words = [part.split()[-1] for part in objects(prompt)]
        recorded = words if with_maps else None
        base = run(prompt, seed=seed, words=recorded)
        row = [Tile(shown(base.image, SMALL), "baseline")]
        if with_maps:
            row += [Tile(shown(overlay(base.maps[w], base.image), SMALL), f'"{w}"') for w in words]
        for i, (title, controls) in enumerate(variants(words)):
            result = run(prompt, controls, seed=seed, words=recorded if i == 0 else None)
            row.append(Tile(shown(result.image, SMALL), title))
            if i == 0:
                first.append(result)
                if with_maps:
                    row += [
                        Tile(shown(overlay(result.maps[w], result.image), SMALL), f'"{w}"') for w in words
                    ]
        rows.append(row)
        labels.append(f"seed {seed}" if prompt == PROMPT else f'"{prompt}", seed {seed}')
    return rows, labels, first


def unless_named() -> str:
    return f'(prompt "{PROMPT}" unless named)'


def regulation() -> Any:
    rows, labels, _ = comparison(
        lambda words: [("Attention Regulation", [attnctl.AttentionRegulation(words)])], True
    )
    grid = panel(
        rows,
        labels,
        heading=f"Attention Regulation on the shape words: the baseline and the regulated image, each with its maps {unless_named()}",
        note=note(scale=3),
        size=12,
    )
    chart = bars(
        "Measured (attnctl bench compose, 312 two- and three-object samples): all objects present, 95% interval",
        rate_bars(
            results("compose_methods.json"),
            {"none": "none", "regulation": "Attention Regulation"},
            "all_present",
            "2+3",
        ),
        1.0,
        note="Negative result: within noise of none on this model, at 1.43x its time (compose_methods.json).",
    )
    return stack(grid, chart)


def guidance(kind: str) -> Any:
    """Attend-and-Excite or A-STAR: samples at the papers' step size (with maps) and a smaller one,
    the loss at each latent update from the session log, and the measured rates."""
    cls, label, key, small = {
        "excite": (attnctl.AttendAndExcite, "Attend-and-Excite", "AttendAndExcite", 5.0),
        "astar": (attnctl.AStar, "A-STAR", "AStar", 2.0),
    }[kind]
    rows, labels, first = comparison(
        lambda words: [(f"{label}, scale 20", [cls(words)]), (f"scale {small:g}", [cls(words, scale=small)])],
        True,
    )
    grid = panel(
        rows,
        labels,
        heading=f"{label} on the shape words: the baseline, the papers' step size 20 (with its maps) and {small:g} {unless_named()}",
        note=note(scale=3),
        size=12,
    )
    series = [
        (f"seed {seed}", [e["loss"] for e in r.log[key]]) for (_, seed), r in zip(SAMPLES, first, strict=True)
    ]
    curve = lines(
        f"{label} at scale 20: the loss before each latent update (the session log, ctl.log['{key}'])",
        series,
        "latent update",
        "loss",
    )
    chart = bars(
        "Measured (attnctl bench compose, 312 samples, scale 20): all objects present, 95% interval",
        rate_bars(
            results("compose_methods.json"),
            {"none": "none", "excite": "Attend-and-Excite", "astar": "A-STAR"},
            "all_present",
            "2+3",
        ),
        1.0,
        note="Negative result: at the papers' step size both latent-guidance methods lose objects on this "
        "4x16x16 latent (compose_methods.json); smaller steps stop the damage, with no gain beyond noise "
        "(compose_step_size.json).",
    )
    return stack(grid, side(curve, chart, gap=16))


def pag() -> Any:
    softpag = attnctl.SoftPAG({block: [0, 1] for block in SOFTPAG_BLOCKS})
    rows, labels, _ = comparison(
        lambda words: [("PAG", [attnctl.PAG(["mid_block"])]), ("SoftPAG", [softpag])], False
    )
    grid = panel(rows, labels, note=note(maps=False, scale=3), size=12)
    names = {"none": "none", "pag": "PAG (mid block)", "softpag": "SoftPAG (heads 0, 1)"}
    names["softpag:benchmarks/results/headhunter_testbed.json"] = "SoftPAG (searched heads)"
    chart = bars(
        "Measured (attnctl bench compose, 312 samples): all objects present, 95% interval",
        rate_bars(results("compose_pag.json"), names, "all_present", "2+3"),
        1.0,
        note="Negative result: none of them beats none beyond noise on this model (compose_pag.json).",
    )
    body = side(grid, chart, gap=16)
    heading = (
        "PAG and SoftPAG, scale 3: the baseline, PAG on the mid block, SoftPAG on heads 0 and 1 of each 8x8 "
        "self-attention layer (u = 1) " + unless_named()
    )
    return stack(title_strip(heading, body.size[0]), body)


LAYOUTS = [
    ("a red circle and a blue square", [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], 0),
    ("a green triangle and a yellow circle", [(0.0, 0.5, 1.0, 1.0), (0.25, 0.0, 0.75, 0.5)], 1),
    (PROMPT, BOXES, 2),
]


def layout() -> Any:
    """Layout's two modes on prompts with boxes, the maps under the default mode, the measured rates."""
    rows, labels = [], []
    for prompt, boxes, seed in LAYOUTS:
        regions = [attnctl.Region(box, f"a {part}") for box, part in zip(boxes, objects(prompt), strict=True)]
        words = [part.split()[-1] for part in objects(prompt)]
        crop = attnctl.Layout(regions)
        base = run(prompt, seed=seed)
        merged = run(prompt, [crop], seed=seed, words=words)
        summed = run(prompt, [attnctl.Layout(regions, mode="mask_and_sum")], seed=seed)
        row = [
            Tile(boxed(base.image, crop, SMALL), "baseline"),
            Tile(boxed(merged.image, crop, SMALL), "Layout"),
            Tile(boxed(summed.image, crop, SMALL), "mask_and_sum"),
        ]
        row += [
            Tile(boxed(overlay(merged.maps[w], merged.image), crop, SMALL), f'"{w}", Layout') for w in words
        ]
        rows.append(row)
        labels.append(f'"{prompt}", seed {seed}')
    grid = panel(
        rows,
        labels,
        heading="Layout (crop_merge, the default) and mode=\"mask_and_sum\": each object's words are its box's "
        "region prompt; the boxes are drawn on every image (the baseline is not given them)",
        note=note(scale=3),
        size=12,
    )
    names = {
        "none": "none",
        "mask_and_sum": "mask_and_sum",
        "crop_merge": "Layout (crop_merge)",
        "crop_merge_span": 'region_tokens="span"',
    }
    chart = bars(
        "Measured (attnctl bench layout, 200 objects of two-object prompts): object in its box (IoU >= 0.5), 95% interval",
        rate_bars(results("layout_testbed.json"), names, "in_box", "2"),
        1.0,
        note='region_tokens="span" (region prompts with their start and end tokens): a variant measured and '
        "not kept (layout_testbed.json).",
    )
    return stack(grid, chart)


def draft() -> Any:
    """DraftAttention's measured speedups (no testbed images: it acts on video models)."""
    report = results("draft_cpu.json")["kernel"]
    items = []
    for r in report["runs"]:
        slower = r["speedup"] < 1
        items.append(
            Bar(
                f"{r['tokens']:,} tokens, sparsity {r['sparsity']}, {r['backend']}",
                r["speedup"],
                colour=RED if slower else (BLUE if r["backend"] == "gather" else GREY),
                text=f"{r['speedup']:.2f}x" + (" (slower than dense)" if slower else ""),
            )
        )
    cfg = report["config"]
    chart = bars(
        f"DraftAttention's kernel against dense SDPA (CPU, {cfg['threads']} thread, {cfg['heads']} heads x "
        f"{cfg['head_dim']}, fp32): speedup, median of {cfg['repeats']} paired runs",
        items,
        8.0,
        reference=1.0,
        ref_label="1x",
        note="gather: the kernel used on CPU; flex: compiled FlexAttention, slower than dense at sparsity 0.5 "
        "as measured (draft_cpu.json).",
    )
    e2e = results("draft_e2e_wan30.json")["end_to_end"]
    c = e2e["config"]
    dense = sum(e2e["dense_denoise_s"]) / len(e2e["dense_denoise_s"])
    wall = [
        Bar("dense", dense, colour=GREY, text=f"{dense:.0f} s (mean of the runs before and after)"),
        Bar(
            f"DraftAttention({c['control']['sparsity']})",
            e2e["sparse_denoise_s"],
            text=f"{e2e['sparse_denoise_s']:.0f} s: {e2e['denoise_speedup']:.2f}x ({e2e['end_to_end_speedup']:.2f}x with the VAE decode)",
        ),
    ]
    end = bars(
        f"End to end, denoising time: a tiny Wan with {c['num_layers']} blocks, {c['frames']} frames x {c['size']} px "
        f"({c['video_tokens']:,} video tokens), {c['steps']} steps",
        wall,
        dense * 1.05,
        note=f"PSNR against dense {e2e['psnr_db']:.1f} dB; the first 25% of the steps and block 0 stay dense "
        "(draft_e2e_wan30.json).",
    )
    return stack(chart, end, gap=8)


FIGURES: dict[str, Callable[[], Any]] = {
    "overview": overview,
    "maps": maps,
    "regulation": regulation,
    "excite": lambda: guidance("excite"),
    "astar": lambda: guidance("astar"),
    "pag": pag,
    "layout": layout,
    "draft": draft,
}


def build(name: str, out: Path) -> Path:
    """Draw one figure and write it as out/<name>.png."""
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    image = FIGURES[name]()
    out.mkdir(parents=True, exist_ok=True)
    return save_png(image, out / f"{name}.png")


LEVELS = 16  # levels per colour channel in the written PNGs


def save_png(image: Any, path: Path) -> Path:
    """Write `image` with LEVELS levels per channel (at most 8/255 off; white stays white), which
    keeps the PNGs small; a figure of at most 256 colours (a chart) as an exact palette image."""
    lut = [round(round(v * (LEVELS - 1) / 255) * 255 / (LEVELS - 1)) for v in range(256)]
    image = image.convert("RGB").point(lut * 3)
    if image.getcolors(256) is not None:
        rgb = np.asarray(image).astype(np.int32)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        colours, index = np.unique(keys, return_inverse=True)
        image = Image.fromarray(index.reshape(keys.shape).astype(np.uint8), "P")
        image.putpalette([int(c >> shift) & 255 for c in colours for shift in (16, 8, 0)])
    image.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated figure names ({', '.join(FIGURES)})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="output folder")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    for name in names:
        start = time.perf_counter()
        path = build(name, args.out)
        print(f"wrote {path} ({path.stat().st_size // 1024} KB, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
