"""What the commands share: one-line errors, list options, model loading, prompt and controls files."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

T = TypeVar("T")

MODEL_HELP = "Hub id, local folder or tiny:<family> (default: the bundled testbed model)."
INT_MAX = 2**63 - 1  # counts and seeds: what torch and numpy take (attnctl.core.controls.INT_MAX)
THREADS_MAX = 2**31 - 1  # torch.set_num_threads takes a 32-bit integer
SIZE_MAX = 2**31 - 1  # pixels a side (attnctl.pipelines.generate.SIZE_MAX)


def finite(value: float | None) -> float | None:
    """A float option's check that typer's range leaves out: NaN and infinity are no values."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


# Below this many denoiser parameters (the bundled and tiny models) each operation is too small to
# share: a second thread only waits on the first, and on a busy core it waits long (the bundled
# model, 25 steps, one core busy: 0.38 s with one thread, 1.8-19 s with two).
SMALL_MODEL = 100_000_000
THREADS_HELP = (
    "torch threads (default: 1 for a model under 100M denoiser parameters, such as the bundled and "
    "tiny ones; else torch's own choice)."
)


def load_model(model: str | None, option: str = "--model", threads: int | None = None) -> Any:
    """The pipeline of --model (the bundled testbed model by default), its progress bars off, torch's
    threads set (`threads`, else by the model's size: `SMALL_MODEL`); a model that cannot be loaded
    ends the command with one line."""
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
        # the hub client's advice points at a stack trace the command does not print
        reason = str(e).replace(" Please check out the root cause in the stacktrace above.", "")
        fail(f"cannot load model {model!r}: {reason}")
    pipe.set_progress_bar_config(disable=True)  # the command prints only what it wrote
    if threads is None:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        size = sum(p.numel() for p in denoiser.parameters()) if denoiser is not None else SMALL_MODEL
        threads = 1 if size < SMALL_MODEL else None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return pipe


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"cannot read prompts file {str(path)!r}: {e.strerror}")
    except UnicodeDecodeError:
        fail(f"prompts file {str(path)!r} is not UTF-8 text (one prompt per line)")
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


def check_output(path: Path | None, option: str = "--json", folder: bool = False) -> None:
    """An output path is checked before any work: a file (`folder`: a folder) where it exists, and
    a place where one can be written. Missing parent folders are created when the output is written
    (the one rule for every output option); here they are only tried, and removed again."""
    if path is None:
        return
    if path.exists() and path.is_dir() != folder:
        fail(
            f"{option} {str(path)!r} is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file name'}"
        )
    target = path if folder else path.parent
    missing = []
    while not target.exists():
        missing.append(target)
        target = target.parent
    if not target.is_dir():
        fail(f"{option} {str(path)!r}: {str(target)!r} is a file, not a folder")
    made = []
    try:
        for parent in reversed(missing):
            parent.mkdir()
            made.append(parent)
        with tempfile.TemporaryFile(dir=made[-1] if made else target):
            pass
    except OSError as e:
        fail(f"{option} {str(path)!r} cannot be written: {e.strerror or e}")
    finally:
        for parent in reversed(made):
            parent.rmdir()


def read_controls(path: Path) -> list[Any]:
    """The controls of a controls JSON file; a bad file or control ends with one error line."""
    from attnctl.core.controls import Control

    try:
        return Control.list_from_json(path.read_text())
    except OSError as e:
        fail(f"cannot read controls file {str(path)!r}: {e.strerror}")
    except UnicodeDecodeError:
        fail(f"controls file {str(path)!r} is not UTF-8 text (a controls JSON file)")
    except ValueError as e:
        fail(f"controls file {str(path)!r}: {e}")


def check_size(pipe: Any, **sizes: int | None) -> None:
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
