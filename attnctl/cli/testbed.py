"""`attnctl testbed train|eval-detector`: the bundled shapes model."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import typer

from .common import INT_MAX, THREADS_MAX, check_output, finite

app = typer.Typer(help="The bundled shapes model: train it, check its detector.", no_args_is_help=True)


@app.command("train")
def train(
    out: Path = typer.Option(
        Path("testbed-run"), help="Run folder: checkpoints/, model/, resumed if present."
    ),
    seed: int = typer.Option(0, min=0, max=INT_MAX, help="Seed for data, initialisation, batches and noise."),
    smoke: bool = typer.Option(False, help="A few steps of every stage (seconds); for tests."),
    vae_steps: int | None = typer.Option(None, min=1, max=INT_MAX, help="Override the VAE stage's steps."),
    unet_steps: int | None = typer.Option(
        None, min=1, max=INT_MAX, help="Override the UNet stage's steps (export early: a smaller value)."
    ),
    ground_weight: float | None = typer.Option(
        None,
        min=0.0,
        callback=finite,
        help="Override the weight of the token grounding loss (0 turns it off).",
    ),
    threads: int = typer.Option(
        2, min=1, max=THREADS_MAX, help="torch threads; 1 is faster on a heavily shared CPU."
    ),
    ship: bool = typer.Option(False, help="Copy the trained model into the package (the bundled model)."),
) -> None:
    """Train the shapes model from scratch (or resume), then save it as a StableDiffusionPipeline."""
    from attnctl.testbed import model_path
    from attnctl.testbed.train import TrainConfig
    from attnctl.testbed.train import train as run_training

    check_output(out, "--out", folder=True)

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


@app.command("eval-detector")
def eval_detector(
    n: int = typer.Option(500, min=1, max=INT_MAX, help="Number of held-out ground-truth renders."),
    seed: int | None = typer.Option(
        None, min=0, max=INT_MAX, help="Render seed (default: the detector's held-out seed)."
    ),
) -> None:
    """Detector accuracy on ground-truth renders from a seed training never uses."""
    from attnctl.testbed.detector import DETECTOR_EVAL_SEED, evaluate

    result = evaluate(DETECTOR_EVAL_SEED if seed is None else seed, n)
    typer.echo(
        f"detector on {result['n_images']} renders: image accuracy {result['image_accuracy']:.1%}, "
        f"object accuracy {result['object_accuracy']:.1%}"
    )
