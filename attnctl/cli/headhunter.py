"""`attnctl headhunter`: the greedy head search."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    INT_MAX,
    MODEL_HELP,
    THREADS_HELP,
    THREADS_MAX,
    check_output,
    fail,
    finite,
    load_model,
    read_prompts,
    split_commas,
)


def headhunter(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A text file, one prompt per line (default: the testbed's search prompts, two- and "
        "three-object training combinations, none of them a benchmark prompt).",
    ),
    samples: int = typer.Option(
        16,
        "--samples",
        min=1,
        max=INT_MAX,
        help="M: generations per candidate (prompt i mod P, seed 900000 + i).",
    ),
    rounds: int = typer.Option(2, "--rounds", min=1, max=INT_MAX, help="R: greedy rounds."),
    top_k: int = typer.Option(
        3, "--top-k", min=1, max=INT_MAX, help="k: heads added to the selection per round."
    ),
    steps: int = typer.Option(25, "--steps", min=1, max=INT_MAX, help="Denoising steps."),
    guidance: float | None = typer.Option(
        None, "--guidance", min=0.0, callback=finite, help="CFG scale (default: the pipeline's)."
    ),
    layers: str | None = typer.Option(
        None,
        "--layers",
        help="Comma-separated layer patterns or block indices to search (anchored; default: every "
        "self/joint attention layer).",
    ),
    objective: str = typer.Option(
        "testbed",
        "--objective",
        help="testbed (detector: objects in their colours) or clip:PATH (e.g. PickScore).",
    ),
    u: float = typer.Option(1.0, "--u", help="SoftPAG's u, toward the identity map (1: PAG's perturbation)."),
    scale: float = typer.Option(3.0, "--scale", help="SoftPAG's guidance scale s."),
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, max=INT_MAX, help="Samples generated per pipeline call."
    ),
    out: Path = typer.Option(
        Path("headhunter.json"), "--out", "-o", help="Result JSON, rewritten after every candidate."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Skip the candidates --out already scored."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, max=THREADS_MAX, help=THREADS_HELP),
) -> None:
    """HeadHunter: greedy search for the heads whose perturbation guides best.

    Each round scores every remaining head, guided by SoftPAG on the heads
    selected so far plus that head, on the same prompts and seeds, and adds
    the top k. --out is rewritten after every candidate (a rerun resumes);
    SoftPAG(heads=OUT, top=N) reads it. Under `accelerate launch` the
    candidates are shared out among the processes."""

    from attnctl.headhunter import candidate_heads, objective_from_name, processes, search, testbed
    from attnctl.pipelines import call_defaults
    from attnctl.testbed.data import parse_caption, search_prompts

    texts = search_prompts() if prompts is None else read_prompts(prompts)
    check_output(out, "--out")
    with processes() as procs:
        try:
            score = objective_from_name(objective, procs.device)
            if score is testbed:
                for i, text in enumerate(texts):  # before any generation
                    try:
                        parse_caption(text)
                    except ValueError as e:
                        where = "the search prompts" if prompts is None else repr(str(prompts))
                        fail(f"--objective testbed scores testbed captions; prompt {i} of {where}: {e}")
            patterns = None
            if layers is not None:
                patterns = [int(x) if x.isdigit() else x for x in split_commas(layers)]
                if not patterns:
                    fail(f"--layers {layers!r} names nothing; give comma-separated layer patterns")
            pipe = procs.to_device(load_model(model, threads=threads))
            result = search(
                pipe,
                texts,
                score,
                candidates=candidate_heads(pipe, patterns),
                samples=samples,
                rounds=rounds,
                top_k=top_k,
                u=u,
                scale=scale,
                guidance_scale=guidance,
                steps=steps,
                batch_size=batch_size,
                call_kwargs=call_defaults(model),
                out=out,
                resume=resume,
            )
        except ValueError as e:
            fail(str(e))
        if procs.is_main:
            typer.echo("selected: " + ", ".join(result["selected"]))
            typer.echo(f"wrote {out}")
