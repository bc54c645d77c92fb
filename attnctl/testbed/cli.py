"""Typer commands for the testbed: `attnctl testbed train|eval-detector` and `attnctl bench compose|maps|layout`.

`attnctl.cli` registers `testbed_app` and `compose`; `python -m attnctl.testbed.cli ...` runs them alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

testbed_app = typer.Typer(
    help="The bundled shapes model: train it, check its detector.", no_args_is_help=True
)


@testbed_app.command("train")
def train(
    out: Path = typer.Option(
        Path("testbed-run"), help="Run folder: checkpoints/, model/, resumed if present."
    ),
    seed: int = typer.Option(0, min=0, help="Seed for data, initialisation, batches and noise."),
    smoke: bool = typer.Option(False, help="A few steps of every stage (seconds); for tests."),
    vae_steps: int | None = typer.Option(None, min=1, help="Override the VAE stage's steps."),
    unet_steps: int | None = typer.Option(
        None, min=1, help="Override the UNet stage's steps (export early: a smaller value)."
    ),
    ground_weight: float | None = typer.Option(
        None, min=0.0, help="Override the weight of the token grounding loss (0 turns it off)."
    ),
    threads: int = typer.Option(2, min=1, help="torch threads; 1 is faster on a heavily shared CPU."),
    ship: bool = typer.Option(False, help="Copy the trained model into the package (the bundled model)."),
) -> None:
    """Train the shapes model from scratch (or resume), then save it as a StableDiffusionPipeline."""
    from ..cli import fail
    from . import model_path
    from .train import TrainConfig
    from .train import train as run_training

    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file; give a run folder (it is created if missing)")

    config = TrainConfig.smoke() if smoke else TrainConfig()
    config = replace(config, seed=seed)
    if vae_steps is not None:
        config = replace(config, vae_steps=vae_steps)
    if unet_steps is not None:
        config = replace(config, unet_steps=unet_steps)
    if ground_weight is not None:
        config = replace(config, ground_weight=ground_weight)
    saved = run_training(out, config, threads=threads)
    if ship:
        target = Path(model_path())
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(saved, target)
        typer.echo(f"shipped {saved} -> {target}")


@testbed_app.command("eval-detector")
def eval_detector(
    n: int = typer.Option(500, min=1, help="Number of held-out ground-truth renders."),
    seed: int | None = typer.Option(None, min=0, help="Render seed (default: the detector's held-out seed)."),
) -> None:
    """Detector accuracy on ground-truth renders from a seed training never uses."""
    from .detector import DETECTOR_EVAL_SEED, evaluate

    result = evaluate(DETECTOR_EVAL_SEED if seed is None else seed, n)
    typer.echo(
        f"detector on {result['n_images']} renders: image accuracy {result['image_accuracy']:.1%}, "
        f"object accuracy {result['object_accuracy']:.1%}"
    )


def compose(
    method: str = typer.Option(
        "none",
        help="Method name(s), comma-separated, from attnctl.testbed.bench.METHODS (none, excite, astar, regulation, pag, softpag), "
        "or softpag:RESULT.json (SoftPAG on a head search's selected heads, u = 1, scale 3).",
    ),
    sizes: str = typer.Option("1,2,3", help="Object counts to test, comma-separated."),
    prompts: int = typer.Option(12, help="Prompts per object count (1, 2, 3) from the fixed held-out lists."),
    seeds: int = typer.Option(4, help="Seeds per prompt."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report (summary + records) here."),
    model: str | None = typer.Option(None, help="Pipeline folder (default: the bundled shapes model)."),
    steps: int = typer.Option(25, min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's own choice)."),
    quiet: bool = typer.Option(False, help="Print only the summary table."),
) -> None:
    """Compositional benchmark: object presence, all present, attribute binding, seconds/image (95% CIs).

    Under `accelerate launch` the samples are shared out among the processes;
    the main process writes the report."""
    from ..cli import list_option
    from ..headhunter.distributed import processes
    from .bench import format_table, run_compose

    counts = _prepare(sizes, json_out, model, threads)
    with processes() as procs:
        _run_and_report(
            run_compose,
            format_table,
            list_option(method, str, "--method"),
            prompts,
            seeds,
            sizes=counts,
            model=model,
            steps=steps,
            guidance_scale=guidance,
            json_out=json_out,
            quiet=quiet,
            is_main=procs.is_main,
        )


def maps(
    sizes: str = typer.Option("2,3", help="Object counts to test, comma-separated (2, 3)."),
    prompts: int = typer.Option(12, help="Prompts per object count from the fixed held-out lists."),
    seeds: int = typer.Option(2, help="Seeds per prompt."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report (summary + records) here."),
    model: str | None = typer.Option(None, help="Pipeline folder (default: the bundled shapes model)."),
    steps: int = typer.Option(25, min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's own choice)."),
    quiet: bool = typer.Option(False, help="Print only the summary table."),
) -> None:
    """Localisation benchmark: median in-box ratio of colour and shape words' attention, per layer."""
    from .localisation import format_maps, run_maps

    counts = _prepare(sizes, json_out, model, threads)
    _run_and_report(
        run_maps,
        format_maps,
        prompts,
        seeds,
        sizes=counts,
        model=model,
        steps=steps,
        guidance_scale=guidance,
        json_out=json_out,
        quiet=quiet,
    )


def layout(
    method: str = typer.Option(
        "none,mask_and_sum,crop_merge",
        help="Method name(s), comma-separated, from attnctl.testbed.placement.METHODS (none, mask_and_sum, "
        "crop_merge, crop_merge_every_step, crop_merge_span, crop_merge_all, hide_words).",
    ),
    sizes: str = typer.Option("2,3", help="Object counts to test, comma-separated (2, 3)."),
    prompts: int = typer.Option(10, help="Prompts per object count from the fixed held-out lists (cycled)."),
    seeds: int = typer.Option(10, help="Seeds per prompt; each seed also draws the boxes."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report (summary + records) here."),
    model: str | None = typer.Option(None, help="Pipeline folder (default: the bundled shapes model)."),
    steps: int = typer.Option(25, min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's own choice)."),
    quiet: bool = typer.Option(False, help="Print only the summary table."),
) -> None:
    """Placement benchmark: objects in their boxes (IoU >= 0.5), mIoU, all present, binding, s/image."""
    from ..cli import list_option
    from .placement import format_placement, run_placement

    counts = _prepare(sizes, json_out, model, threads)
    _run_and_report(
        run_placement,
        format_placement,
        list_option(method, str, "--method"),
        prompts,
        seeds,
        sizes=counts,
        model=model,
        steps=steps,
        guidance_scale=guidance,
        json_out=json_out,
        quiet=quiet,
    )


def _prepare(sizes: str, json_out: Path | None, model: str | None, threads: int | None) -> tuple[int, ...]:
    """What every benchmark command checks before any work: the object counts (returned), the JSON
    path and the model; and the torch threads."""
    import torch

    from ..cli import check_json_out, check_model, list_option

    if threads:
        torch.set_num_threads(threads)
    counts = tuple(list_option(sizes, int, "--sizes"))
    check_json_out(json_out)
    check_model(model)
    return counts


def _run_and_report(
    run: Callable[..., dict],
    table: Callable[[dict], str],
    *args: Any,
    json_out: Path | None,
    quiet: bool,
    is_main: bool = True,
    **options: Any,
) -> None:
    """Run a benchmark (progress lines unless quiet; a bad value ends with one error line), then
    print its table when quiet and the JSON path written (the main process only)."""
    from ..cli import fail

    try:
        report = run(*args, json_out=json_out, log=None if quiet else typer.echo, **options)
    except ValueError as e:
        fail(str(e))
    if is_main:
        if quiet:
            typer.echo(table(report))
        if json_out:
            typer.echo(f"wrote {json_out}")


def _standalone_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True)
    app.add_typer(testbed_app, name="testbed")
    bench_app = typer.Typer(no_args_is_help=True)
    bench_app.command("compose")(compose)
    bench_app.command("maps")(maps)
    bench_app.command("layout")(layout)
    app.add_typer(bench_app, name="bench")
    return app


if __name__ == "__main__":
    _standalone_app()()
