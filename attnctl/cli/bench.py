"""`attnctl bench compose|maps|layout|draft|pag`: benchmarks that print tables and write JSON.

The benchmarks themselves live outside the command line (`attnctl.testbed` for the testbed's,
`attnctl.bench` for DraftAttention and PAG cost), where `benchmarks/` scripts import them too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .common import (
    INT_MAX,
    THREADS_MAX,
    check_model,
    check_output,
    fail,
    finite,
    list_option,
    split_commas,
)

app = typer.Typer(no_args_is_help=True, help="Performance and quality benchmarks (print and write JSON).")

# The options every testbed benchmark (compose, maps, layout) takes, declared once.
_JSON = typer.Option(None, "--json", help="Write the report (summary + records) here.")
# `--prompts` was this count before it became `--num-prompts` (`generate` and `headhunter` take
# `--prompts FILE`); kept for one release, hidden.
_OLD_PROMPTS = typer.Option(None, "--prompts", min=1, max=INT_MAX, hidden=True)
_MODEL = typer.Option(None, help="Pipeline folder (default: the bundled shapes model).")
_STEPS = typer.Option(25, min=1, max=INT_MAX, help="Denoising steps.")
_GUIDANCE = typer.Option(7.5, min=0.0, callback=finite, help="Classifier-free guidance scale.")
_THREADS = typer.Option(
    1, min=1, max=THREADS_MAX, help="torch threads (the testbed models are small: one is fastest)."
)
_QUIET = typer.Option(False, help="Print only the summary table.")


def compose(
    method: str = typer.Option(
        "none",
        help="Method name(s), comma-separated, from attnctl.testbed.bench.METHODS (none, excite, astar, regulation, pag, softpag), "
        "or softpag:RESULT.json (SoftPAG on a head search's selected heads, u = 1, scale 3).",
    ),
    sizes: str = typer.Option("1,2,3", help="Object counts to test, comma-separated."),
    prompts: int = typer.Option(
        12,
        "--num-prompts",
        min=1,
        max=INT_MAX,
        help="Prompts per object count (1, 2, 3) from the fixed held-out lists.",
    ),
    old_prompts: int | None = _OLD_PROMPTS,
    seeds: int = typer.Option(4, min=1, max=INT_MAX, help="Seeds per prompt."),
    json_out: Path | None = _JSON,
    model: str | None = _MODEL,
    steps: int = _STEPS,
    guidance: float = _GUIDANCE,
    threads: int = _THREADS,
    quiet: bool = _QUIET,
) -> None:
    """Compositional benchmark: object presence, all present, attribute binding, seconds/image (95% CIs).

    Under `accelerate launch` the samples are shared out among the processes;
    the main process writes the report."""
    from attnctl.headhunter.distributed import processes
    from attnctl.testbed.bench import format_table, run_compose

    counts = _prepare(sizes, json_out, model, threads)
    prompts = old_prompts or prompts
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
    prompts: int = typer.Option(
        12,
        "--num-prompts",
        min=1,
        max=INT_MAX,
        help="Prompts per object count from the fixed held-out lists.",
    ),
    old_prompts: int | None = _OLD_PROMPTS,
    seeds: int = typer.Option(2, min=1, max=INT_MAX, help="Seeds per prompt."),
    json_out: Path | None = _JSON,
    model: str | None = _MODEL,
    steps: int = _STEPS,
    guidance: float = _GUIDANCE,
    threads: int = _THREADS,
    quiet: bool = _QUIET,
) -> None:
    """Localisation benchmark: median in-box ratio of colour and shape words' attention, per layer."""
    from attnctl.testbed.localisation import format_maps, run_maps

    counts = _prepare(sizes, json_out, model, threads)
    prompts = old_prompts or prompts
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
    prompts: int = typer.Option(
        10,
        "--num-prompts",
        min=1,
        max=INT_MAX,
        help="Prompts per object count from the fixed held-out lists (cycled).",
    ),
    old_prompts: int | None = _OLD_PROMPTS,
    seeds: int = typer.Option(
        10, min=1, max=INT_MAX, help="Seeds per prompt; each seed also draws the boxes."
    ),
    json_out: Path | None = _JSON,
    model: str | None = _MODEL,
    steps: int = _STEPS,
    guidance: float = _GUIDANCE,
    threads: int = _THREADS,
    quiet: bool = _QUIET,
) -> None:
    """Placement benchmark: objects in their boxes (IoU >= 0.5), mIoU, all present, binding, s/image."""
    from attnctl.testbed.placement import format_placement, run_placement

    counts = _prepare(sizes, json_out, model, threads)
    prompts = old_prompts or prompts
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

    if threads:
        torch.set_num_threads(threads)
    counts = tuple(list_option(sizes, int, "--sizes"))
    check_output(json_out)
    if model is not None and model.startswith("tiny:"):
        fail(
            f"--model {model!r}: the testbed benchmarks score the shapes model (or a folder of one), not tiny:<family>"
        )
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
    try:
        report = run(*args, json_out=json_out, log=None if quiet else typer.echo, **options)
    except ValueError as e:
        fail(str(e))
    except OSError as e:  # e.g. a --model folder that holds no pipeline
        model = options.get("model")
        fail(f"cannot load model {model!r}: {e}" if e.errno is None else f"{e.filename}: {e.strerror}")
    if is_main:
        if quiet:
            typer.echo(table(report))
        if json_out:
            typer.echo(f"wrote {json_out}")


def draft(
    json_out: Path = typer.Option(..., "--json", help="Write the results here as JSON."),
    tokens: list[str] = typer.Option(
        ["16384,32768"], "--tokens", help="Sequence lengths (multiples of 2048), comma-separated or repeated."
    ),
    sparsity: list[str] = typer.Option(
        ["0.5,0.75,0.9"], "--sparsity", help="Fractions of blocks dropped, comma-separated or repeated."
    ),
    heads: int = typer.Option(8, "--heads", min=1, max=INT_MAX),
    head_dim: int = typer.Option(64, "--head-dim", min=1, max=INT_MAX),
    repeats: int = typer.Option(
        3, "--repeats", min=1, max=INT_MAX, help="Back-to-back dense and sparse runs per case."
    ),
    backend: list[str] = typer.Option(
        ["flex,gather"], "--backend", help="Sparse backends to time, comma-separated or repeated."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, max=THREADS_MAX, help="torch intra-op threads."
    ),
    kernel: bool = typer.Option(True, "--kernel/--no-kernel", help="Run the kernel part."),
    e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Run the end-to-end Wan pipeline part."),
    e2e_layers: int = typer.Option(
        8, "--e2e-layers", min=1, max=INT_MAX, help="Transformer blocks of the end-to-end Wan."
    ),
    e2e_frames: int = typer.Option(
        61, "--e2e-frames", min=1, max=INT_MAX, help="Frames of the end-to-end video."
    ),
    e2e_size: int = typer.Option(
        512, "--e2e-size", min=16, max=INT_MAX, help="Height and width of the end-to-end video."
    ),
    e2e_steps: int = typer.Option(
        8, "--e2e-steps", min=1, max=INT_MAX, help="Denoising steps of the end-to-end run."
    ),
) -> dict[str, Any]:
    """DraftAttention benchmark: kernels (dense SDPA vs block-sparse backends) and a Wan pipeline end to
    end (dense vs DraftAttention(0.9)); prints tables, writes JSON."""
    import json

    import torch

    from attnctl.bench.draft import run_kernel_bench, run_pipeline_bench

    check_output(json_out)
    cases = dict(
        tokens=list_option(tokens, int, "--tokens"),
        sparsities=list_option(sparsity, float, "--sparsity"),
        backends=list_option(backend, str, "--backend"),
    )
    if e2e and e2e_size % 16:
        fail(f"--e2e-size {e2e_size} is not allowed: a multiple of 16 (Wan's VAE and patch size)")
    results: dict[str, Any] = {}
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if kernel:
            results["kernel"] = run_kernel_bench(
                **cases, heads=heads, head_dim=head_dim, repeats=repeats, echo=typer.echo
            )
        if e2e:
            results["end_to_end"] = run_pipeline_bench(
                frames=e2e_frames, size=e2e_size, steps=e2e_steps, num_layers=e2e_layers, echo=typer.echo
            )
    except ValueError as e:
        fail(str(e))
    finally:
        torch.set_num_threads(saved_threads)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=2))
    typer.echo(f"wrote {json_out}")
    return results


def pag(
    models: str | None = typer.Option(
        None,
        help="Models, comma-separated. Against cfg: testbed (bundled), sd3 (tiny); default both. "
        "Against diffusers: sd, sdxl, sd3 (tiny); default all three.",
    ),
    against: str = typer.Option(
        "cfg",
        help="cfg: CFG + SoftPAG over CFG alone. diffusers: attnctl's PAG over diffusers' PAG pipeline "
        "(same weights).",
    ),
    samples: int = typer.Option(
        8, min=1, max=INT_MAX, help="Pairs timed back to back per model (order alternating)."
    ),
    steps: int | None = typer.Option(
        None, min=1, max=INT_MAX, help="Denoising steps (default: 25 on the testbed, 10 on tiny models)."
    ),
    size: int | None = typer.Option(
        None,
        min=8,
        help="Against diffusers: image height and width in pixels (default: the tiny models' own; "
        "tiny SD3 at 256 has SD3's 4,096 image tokens at 1024 px).",
    ),
    batch: str = typer.Option(
        "auto", help="The perturbed branch's batch mode: auto (one batched forward) or split."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report here."),
    threads: int | None = typer.Option(
        None, min=1, max=THREADS_MAX, help="torch threads (default: torch's own choice)."
    ),
) -> None:
    """Cost of perturbed-branch guidance: CPU seconds per image and the median of per-pair ratios."""
    import torch

    from attnctl.bench.pag import run_pag

    check_output(json_out)
    if threads:
        torch.set_num_threads(threads)
    try:
        chosen = None if models is None else tuple(split_commas(models))
        run_pag(chosen, samples, batch, json_out, typer.echo, against=against, steps=steps, size=size)
    except ValueError as e:
        fail(str(e))
    if json_out:
        typer.echo(f"wrote {json_out}")


for _command in (compose, maps, draft, pag, layout):  # the order `attnctl bench --help` lists them
    app.command(_command.__name__)(_command)
