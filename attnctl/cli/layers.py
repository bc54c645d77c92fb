"""`attnctl layers`: a model's attention layers, their kinds, heads and map sizes."""

from __future__ import annotations

from typing import Any

import typer

from .common import MODEL_HELP, SIZE_MAX, check_size, load_model


def layers(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    height: int | None = typer.Option(
        None, "--height", max=SIZE_MAX, help="Image height for the map sizes (default: the model's)."
    ),
    width: int | None = typer.Option(
        None, "--width", max=SIZE_MAX, help="Image width for the map sizes (default: the model's)."
    ),
) -> None:
    """Print the attention layers with family, kind (self/cross/joint), heads and map size.

    Map sizes are measured by one denoising step at the given size (the pipeline's default size
    otherwise), so they are exact for every family."""
    import torch

    import attnctl
    from attnctl.core.attention import AttentionEdit

    pipe = load_model(model, "MODEL")
    check_size(pipe, height=height, width=width)
    sizes: dict[str, tuple[int, int, int]] = {}

    class _Grid(AttentionEdit):
        def observe(self, call: Any) -> None:
            layout = call.layout
            sizes[call.layer.name] = (layout.frames, layout.height, layout.width)

    from attnctl.pipelines import call_defaults

    kwargs = call_defaults(model)
    kwargs.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    if (kwargs.get("height") is None) != (kwargs.get("width") is None):  # one side: the other the default
        from attnctl.pipelines.generate import default_size

        for name, side in zip(("height", "width"), default_size(pipe), strict=True):
            kwargs.setdefault(name, side)
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
