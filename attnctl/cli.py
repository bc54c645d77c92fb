"""The `attnctl` command: generate with attention control, list a model's attention layers, benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precise attention control for diffusers.",
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
)
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


def _print_version(value: bool) -> None:
    if value:
        from attnctl import __version__

        typer.echo(f"attnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _entry(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _quiet_third_party()


def _quiet_third_party() -> None:
    """Commands print only what the user asked for: no diffusers/transformers notices, deprecation
    warnings or loading bars. Only the command does this; attnctl used from Python leaves them be."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


MODEL_HELP = "Hub id, local folder or tiny:<family> (default: the bundled testbed model)."


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="The text prompt (or --prompts FILE)."),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A text file, one prompt per line: image i of its prompts is written as <i>.png (same seed for all).",
    ),
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
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads (default: torch's own choice)."
    ),
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
    import torch

    import attnctl
    from attnctl.headhunter.distributed import processes

    if threads:
        torch.set_num_threads(threads)
    words = [w.strip() for w in maps.split(",") if w.strip()] if maps else []
    if maps is not None and not words:
        raise typer.BadParameter(
            f"{maps!r} names no word; give comma-separated prompt words", param_hint="--maps"
        )
    if (prompt is None) == (prompts is None):
        fail("give one PROMPT or --prompts FILE (one prompt per line)")
    texts = [prompt] if prompts is None else _read_prompts(prompts)
    _check_map_words(words, texts, prompts)
    _check_out_folder(out)
    layout = _layout(region) if region else None
    controls = [attnctl.AttentionMaps(words)] if words else []
    controls += [layout] if layout else []
    controls += read_controls(controls_file) if controls_file else []
    digits = len(str(len(texts) - 1))
    with processes() as procs:
        mine = procs.shard(list(enumerate(texts)))
        if not mine:
            return
        pipe = procs.to_device(_load(model))
        _check_size(pipe, height=height, width=width)
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


def read_controls(path: Path) -> list[Any]:
    """The controls of a controls JSON file; a bad file or control ends with one error line."""
    from attnctl.core.controls import Control

    try:
        return Control.list_from_json(path.read_text())
    except OSError as e:
        fail(f"cannot read controls file {str(path)!r}: {e.strerror}")
    except ValueError as e:
        fail(f"controls file {str(path)!r}: {e}")


@app.command()
def ui(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (loopback by default)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (default: 7860, or the next free one)."
    ),
    controls_file: Path | None = typer.Option(
        None, "--controls", help="A controls JSON file the page opens with (a saved config)."
    ),
    prompt: str = typer.Option(
        "a red circle and a blue square", "--prompt", help="The prompt the page opens with."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads (default: torch's own choice)."
    ),
) -> None:
    """Serve the web demo (Gradio, in the package's ui extra).

    Never a share link, analytics off. Its `generate` endpoint takes (prompt, controls JSON, seed, steps) for gradio_client."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        fail("the web demo needs Gradio, in attnctl's ui extra: pip install -e '.[ui]' in a clone")
    import torch

    if threads:
        torch.set_num_threads(threads)
    controls = read_controls(controls_file) if controls_file else []
    from attnctl.ui import launch

    pipe = _load(model)
    try:
        launch(model, pipe=pipe, host=host, port=port, prompt=prompt, controls=controls)
    except OSError as e:  # e.g. the port is taken
        fail(f"cannot serve on {host}:{port or 7860}: {e}")


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


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")


def _check_size(pipe: Any, **sizes: int | None) -> None:
    """--height/--width are positive multiples of the model's size step."""
    multiple = _size_multiple(pipe)
    for name, value in sizes.items():
        if value is not None and (value < 1 or value % multiple):
            fail(
                f"--{name} {value} is not allowed: a positive multiple of {multiple} for this model "
                f"({type(pipe).__name__})"
            )


def _size_multiple(pipe: Any) -> int:
    """The VAE's downsampling (as the pipeline's image/video processor has it, e.g. FLUX's includes
    its 2x2 packing) times the denoiser's patch size; SD pipelines require multiples of 8 as well."""
    factors = (
        getattr(getattr(pipe, a, None), "config", None) for a in ("video_processor", "image_processor")
    )
    vae = next((f.vae_scale_factor for f in factors if getattr(f, "vae_scale_factor", None)), 8)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    patch = getattr(denoiser.config, "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch  # Wan: (t, h, w)
    return math.lcm(vae * patch, 8) if getattr(pipe, "unet", None) is not None else vae * patch


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

    pipe = _load(model, "MODEL")
    _check_size(pipe, height=height, width=width)
    sizes: dict[str, tuple[int, int, int]] = {}

    class _Grid(AttentionEdit):
        def observe(self, call: Any) -> None:
            layout = call.layout
            sizes[call.layer.name] = (layout.frames, layout.height, layout.width)

    from attnctl.pipelines import call_defaults

    kwargs = call_defaults(model)
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


@app.command()
def headhunter(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A text file, one prompt per line (default: the testbed's search prompts, two- and "
        "three-object training combinations, none of them a benchmark prompt).",
    ),
    samples: int = typer.Option(
        16, "--samples", help="M: generations per candidate (prompt i mod P, seed 900000 + i)."
    ),
    rounds: int = typer.Option(2, "--rounds", help="R: greedy rounds."),
    top_k: int = typer.Option(3, "--top-k", help="k: heads added to the selection per round."),
    steps: int = typer.Option(25, "--steps", help="Denoising steps."),
    guidance: float | None = typer.Option(None, "--guidance", help="CFG scale (default: the pipeline's)."),
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
    batch_size: int = typer.Option(8, "--batch-size", help="Samples generated per pipeline call."),
    out: Path = typer.Option(
        Path("headhunter.json"), "--out", "-o", help="Result JSON, rewritten after every candidate."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Skip the candidates --out already scored."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads (default: torch's own choice)."
    ),
) -> None:
    """HeadHunter: greedy search for the heads whose perturbation guides best.

    Each round scores every remaining head, guided by SoftPAG on the heads
    selected so far plus that head, on the same prompts and seeds, and adds
    the top k. --out is rewritten after every candidate (a rerun resumes);
    SoftPAG(heads=OUT, top=N) reads it. Under `accelerate launch` the
    candidates are shared out among the processes."""
    import torch

    from attnctl.headhunter import candidate_heads, objective_from_name, processes, search, testbed
    from attnctl.pipelines import call_defaults
    from attnctl.testbed.data import parse_caption, search_prompts

    if threads:
        torch.set_num_threads(threads)
    texts = search_prompts() if prompts is None else _read_prompts(prompts)
    check_json_out(out, "--out")
    with processes() as procs:
        try:
            score = objective_from_name(objective, procs.device)
            if score is testbed:
                for text in texts:  # before any generation
                    parse_caption(text)
            pipe = procs.to_device(_load(model))
            patterns = [int(x) if x.isdigit() else x for x in split_commas(layers)] if layers else None
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


def _load(model: str | None, option: str = "--model") -> Any:
    from attnctl.pipelines import load_pipeline
    from attnctl.testbed import model_path

    if model is None and not (Path(model_path()) / "model_index.json").exists():
        fail(
            "the bundled testbed model is not in this installation; pass --model with a hub id, "
            "a local folder or tiny:<family>"
        )
    check_model(model, option)
    try:
        pipe = load_pipeline(model)
    except (OSError, ValueError) as e:
        fail(f"cannot load model {model!r}: {e}")
    pipe.set_progress_bar_config(disable=True)  # the command prints only what it wrote
    return pipe


def _read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"cannot read prompts file {str(path)!r}: {e.strerror}")
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        fail(f"prompts file {str(path)!r} holds no prompt (one prompt per line)")
    return texts


def fail(message: str) -> NoReturn:
    """A one-line error and exit status 2, as for a bad option."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def split_commas(values: str | list[Any]) -> list[str]:
    """The items of a list-valued option: comma-separated, and for a repeatable option also repeated
    (`--tokens 2048,4096` is `--tokens 2048 --tokens 4096`)."""
    values = [values] if isinstance(values, str) else values
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def list_option(values: str | list[Any], convert: Callable[[str], T], option: str) -> list[T]:
    """`split_commas` items converted to numbers (or kept as strings); a bad item ends the command
    with one line naming it."""
    items = split_commas(values)
    if not items:
        fail(f"{option} names nothing; give comma-separated values")
    kind = {int: "integer", float: "number"}.get(convert, convert.__name__)
    converted = []
    for item in items:
        try:
            converted.append(convert(item))
        except ValueError:
            fail(f"{option} {item!r} is not a{'n' if kind[0] in 'aeiou' else ''} {kind}")
    return converted


def check_model(model: str | None, option: str = "--model") -> None:
    """A --model that can only be a local path (not a hub id "owner/name") must exist."""
    if model is None or Path(model).expanduser().exists():
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        fail(f"{option} {model!r}: no such folder (give a local model folder, a hub id or tiny:<family>)")


def check_json_out(path: Path | None, option: str = "--json") -> None:
    """A report file to write must not name a folder (checked before any work)."""
    if path is not None and path.is_dir():
        fail(f"{option} {str(path)!r} is a folder; give a file name")


_register()


def main(args: list[str] | None = None) -> None:
    """The `attnctl` command: a bad option value ends in one `error:` line (status 2), not a box."""
    import sys

    try:
        code = app(args=args, prog_name="attnctl", standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as e:  # typer's own click: usage errors and bad parameters
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
