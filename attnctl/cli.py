"""The `attnctl` command: generate with attention control, list a model's attention layers, benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Precise attention control for diffusers.")
bench_app = typer.Typer(
    no_args_is_help=True, help="Performance and quality benchmarks (print and write JSON)."
)
app.add_typer(bench_app, name="bench")


def _register() -> None:
    """Commands defined next to what they run: the testbed's, and the benchmarks."""
    from attnctl.kernels.bench import draft
    from attnctl.pipelines.bench import pag
    from attnctl.testbed.cli import compose, layout, maps, testbed_app

    app.add_typer(testbed_app, name="testbed")
    bench_app.command("compose")(compose)
    bench_app.command("maps")(maps)
    bench_app.command("draft")(draft)
    bench_app.command("pag")(pag)
    bench_app.command("layout")(layout)


MODEL_HELP = "Hub id, local folder or tiny:<family> (default: the bundled testbed model)."


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text prompt."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    steps: int = typer.Option(25, "--steps", min=1, help="Denoising steps."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    maps: str | None = typer.Option(
        None, "--maps", help="Comma-separated prompt words to record heatmaps for."
    ),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    height: int | None = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: int | None = typer.Option(None, "--width", help="Image width (default: the model's)."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Guidance scale (default: the pipeline's)."
    ),
    region: list[str] | None = typer.Option(
        None,
        "--region",
        help='A box and its prompt, "x0,y0,x1,y1:sub-prompt" (normalised, 0-1, origin top left); '
        "repeatable. Writes layout.png: the image and its boxes side by side.",
    ),
) -> None:
    """Generate an image (and a heatmap grid of --maps words, the --region layout) into --out."""
    import torch

    import attnctl

    words = [w.strip() for w in maps.split(",") if w.strip()] if maps else []
    if maps is not None and not words:
        raise typer.BadParameter(
            f"{maps!r} names no word; give comma-separated prompt words", param_hint="--maps"
        )
    layout = _layout(region) if region else None
    pipe = _load(model)
    kwargs = _model_defaults(model)
    kwargs.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pil")
    for name, value in (("height", height), ("width", width), ("guidance_scale", guidance)):
        if value is not None:
            kwargs[name] = value
    controls = [attnctl.AttentionMaps(words)] if words else []
    controls += [layout] if layout else []
    with attnctl.control(pipe, *controls) as ctl:
        result = pipe(prompt, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    image = _first_image(result)
    image_path = out / "image.png"
    image.save(image_path)
    typer.echo(f"wrote {image_path}")
    if words:
        grid = ctl.maps.save_grid(out / "maps.png", image, words)
        typer.echo(f"wrote {grid}")
    if layout:
        from attnctl.processors.layout import render_layout

        typer.echo(f"wrote {render_layout(out / 'layout.png', image, layout)}")


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
            typer.echo(f"error: --region {value!r}: {e}", err=True)
            raise typer.Exit(2) from None
    return attnctl.Layout(regions)


@app.command()
def layers(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    height: int | None = typer.Option(
        None, "--height", help="Image height for the map sizes (default: the model's)."
    ),
    width: int | None = typer.Option(
        None, "--width", help="Image width for the map sizes (default: the model's)."
    ),
) -> None:
    """Print the attention layers with family, kind (self/cross/joint), heads and map size.

    Map sizes are measured by one denoising step at the given size (the pipeline's default size
    otherwise), so they are exact for every family."""
    import torch

    import attnctl
    from attnctl.core.attention import AttentionEdit

    pipe = _load(model)
    sizes: dict[str, tuple[int, int, int]] = {}

    class _Grid(AttentionEdit):
        def observe(self, call: Any) -> None:
            layout = call.layout
            sizes[call.layer.name] = (layout.frames, layout.height, layout.width)

    kwargs = _model_defaults(model)
    kwargs.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    kwargs.update(num_inference_steps=1, output_type="latent")
    with attnctl.control(pipe) as ctl:
        ctl.add_edit(ctl.layers, _Grid())
        family = ctl.adapter.name
        with torch.no_grad():
            pipe("a", **kwargs)
        rows = [(layer, sizes.get(layer.name)) for layer in ctl.layers]
    typer.echo(f"family: {family}  ({len(rows)} attention layers)")
    for layer, grid in rows:
        size = "-" if grid is None else ("x".join(str(s) for s in (grid if grid[0] > 1 else grid[1:])))
        typer.echo(f"[{layer.index:3d}] {layer.name:<60} {layer.kind:<6} heads={layer.heads:<3} map={size}")


def _model_defaults(model: str | None) -> dict[str, Any]:
    """Call arguments a model needs beyond the pipeline's defaults: tiny models run at tiny sizes."""
    from attnctl.pipelines import TINY_PREFIX

    if model is None or not model.startswith(TINY_PREFIX):
        return {}
    from attnctl.tiny import tiny_call_kwargs

    return tiny_call_kwargs(model.removeprefix(TINY_PREFIX))


def _load(model: str | None) -> Any:
    from attnctl.pipelines import load_pipeline
    from attnctl.testbed import model_path

    if model is None and not (Path(model_path()) / "model_index.json").exists():
        typer.echo(
            "error: the bundled testbed model is not in this installation; pass --model with a hub id, "
            "a local folder or tiny:<family>",
            err=True,
        )
        raise typer.Exit(2)
    try:
        return load_pipeline(model)
    except (OSError, ValueError) as e:
        typer.echo(f"error: cannot load model {model!r}: {e}", err=True)
        raise typer.Exit(2) from e


def _first_image(result: Any) -> Any:
    from PIL import Image

    from attnctl.processors.maps import _to_pil

    images = getattr(result, "images", None)
    if images is None:
        images = result.frames[0]  # video pipelines: the first video's frames
    first = images[0]
    return first if isinstance(first, Image.Image) else _to_pil(first)


_register()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
