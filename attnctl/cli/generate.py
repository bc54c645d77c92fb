"""`attnctl generate`: images (and heatmaps, the layout) with attention controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import (
    INT_MAX,
    MODEL_HELP,
    SIZE_MAX,
    THREADS_HELP,
    THREADS_MAX,
    check_output,
    check_size,
    fail,
    finite,
    load_model,
    read_controls,
    read_prompts,
)


def generate(
    prompt: str | None = typer.Argument(None, help="The text prompt (or --prompts FILE)."),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A text file, one prompt per line: image i of its prompts is written as <i>.png (same seed for all).",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    steps: int = typer.Option(25, "--steps", min=1, max=INT_MAX, help="Denoising steps."),
    seed: int = typer.Option(0, "--seed", min=0, max=INT_MAX, help="Random seed."),
    maps: str | None = typer.Option(
        None, "--maps", help="Comma-separated prompt words to record heatmaps for."
    ),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    height: int | None = typer.Option(
        None, "--height", max=SIZE_MAX, help="Image height (default: the model's)."
    ),
    width: int | None = typer.Option(
        None, "--width", max=SIZE_MAX, help="Image width (default: the model's)."
    ),
    guidance: float | None = typer.Option(
        None, "--guidance", min=0.0, callback=finite, help="Guidance scale (default: the pipeline's)."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, max=THREADS_MAX, help=THREADS_HELP),
    region: list[str] | None = typer.Option(
        None,
        "--region",
        help='A box and its prompt, "x0,y0,x1,y1:sub-prompt" (normalised, 0-1, origin top left); '
        "repeatable. Writes layout.png: the image and its boxes side by side.",
    ),
    controls_file: Path | None = typer.Option(
        None,
        "--controls",
        help="A controls JSON file: a list of control dicts as to_dict() writes them (the web demo's "
        "'controls JSON'), applied with --maps and --region.",
    ),
) -> None:
    """Generate an image (and a heatmap grid of --maps words, the --region layout) into --out.

    With --prompts, one image per line of the file: <index>.png (and
    <index>_maps.png, <index>_layout.png). Under `accelerate launch` the prompts are shared out
    among the processes and each image is written once."""

    import attnctl
    from attnctl.headhunter.distributed import processes

    words = [w.strip() for w in maps.split(",") if w.strip()] if maps else []
    if maps is not None and not words:
        raise typer.BadParameter(
            f"{maps!r} names no word; give comma-separated prompt words", param_hint="--maps"
        )
    if (prompt is None) == (prompts is None):
        fail("give one PROMPT or --prompts FILE (one prompt per line)")
    texts = [prompt] if prompts is None else read_prompts(prompts)
    _check_map_words(words, texts, prompts)
    check_output(out, "--out", folder=True)
    layout = _layout(region) if region else None
    controls = [attnctl.AttentionMaps(words)] if words else []
    controls += [layout] if layout else []
    controls += read_controls(controls_file) if controls_file else []
    digits = len(str(len(texts) - 1))
    with processes() as procs:
        mine = procs.shard(list(enumerate(texts)))
        if not mine:
            return
        pipe = procs.to_device(load_model(model, threads=threads))
        check_size(pipe, height=height, width=width)
        from attnctl.pipelines import call_defaults

        kwargs = call_defaults(model)
        for name, value in (("height", height), ("width", width), ("guidance_scale", guidance)):
            if value is not None:
                kwargs[name] = value
        out.mkdir(parents=True, exist_ok=True)
        for index, text in mine:
            stem = "image" if prompts is None else f"{index:0{digits}d}"
            try:
                result = attnctl.generate(pipe, text, controls, seed=seed, steps=steps, **kwargs)
            except ValueError as e:  # e.g. a --maps word the pipeline truncates away
                fail(str(e))
            names = (
                ("image", "maps", "layout") if prompts is None else (stem, f"{stem}_maps", f"{stem}_layout")
            )
            images = (result.image, result.heatmaps(words or None), result.layout_image())
            for name, image in zip(names, images, strict=True):
                if image is not None:
                    image.save(out / f"{name}.png")
                    typer.echo(f"wrote {out / f'{name}.png'}")


def _check_map_words(words: list[str], texts: list[str], prompts: Path | None) -> None:
    """Every --maps word is in every prompt (before anything is loaded)."""
    from attnctl.core.tokens import word_spans

    for index, text in enumerate(texts):
        missing = [w for w in words if not word_spans(text, w)]
        if missing:
            where = (
                f"the prompt {text!r}" if prompts is None else f"prompt {index} of {str(prompts)!r}: {text!r}"
            )
            fail(f"--maps {','.join(missing)}: not a word of {where}")


def _layout(values: list[str]) -> Any:
    """A Layout from --region values; a bad one ends the command with one line naming it."""
    import attnctl

    regions = []
    for value in values:
        box, sep, prompt = value.partition(":")
        try:
            if not sep or not prompt.strip():
                raise ValueError('expected "x0,y0,x1,y1:sub-prompt"')
            try:
                numbers = [float(v) for v in box.split(",")]
            except ValueError:
                raise ValueError(f"box {box!r} is not four comma-separated numbers") from None
            regions.append(attnctl.Region(numbers, prompt.strip()))
        except ValueError as e:
            fail(f"--region {value!r}: {e}")
    return attnctl.Layout(regions)
