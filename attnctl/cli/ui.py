"""`attnctl ui`: the web demo."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import INT_MAX, MODEL_HELP, THREADS_HELP, THREADS_MAX, fail, finite, load_model, read_controls


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
    threads: int | None = typer.Option(None, "--threads", min=1, max=THREADS_MAX, help=THREADS_HELP),
    max_pixels: int = typer.Option(
        1024 * 1024, "--max-pixels", min=1, max=INT_MAX, help="Largest height x width a request may ask."
    ),
    max_steps: int = typer.Option(
        100, "--max-steps", min=1, max=INT_MAX, help="Most denoising steps a request may ask."
    ),
    max_frames: int = typer.Option(
        129, "--max-frames", min=1, max=INT_MAX, help="Most video frames a request may ask."
    ),
    max_iterations: int = typer.Option(
        50,
        "--max-iterations",
        min=1,
        max=INT_MAX,
        help="Most iterations per step a request's control may ask.",
    ),
    max_seconds: float = typer.Option(
        600.0,
        "--max-seconds",
        min=1.0,
        callback=finite,
        help="A request's generation stops after this many seconds.",
    ),
) -> None:
    """Serve the web demo (Gradio, in the package's ui extra).

    Never a share link, analytics off. Its `generate` endpoint takes (prompt, controls JSON, seed, steps) for gradio_client."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        fail(
            'the web demo needs Gradio, in attnctl\'s ui extra: pip install "attnctl[ui]" '
            '(in a clone: pip install -e ".[ui]")'
        )

    controls = read_controls(controls_file) if controls_file else []
    _check_host(host)
    from attnctl.ui import launch
    from attnctl.ui.app import Limits

    pipe = load_model(model, threads=threads)
    try:
        limits = Limits(max_pixels, max_steps, max_frames, max_iterations, max_seconds)
        launch(model, pipe=pipe, host=host, port=port, prompt=prompt, controls=controls, limits=limits)
    except OSError as e:  # e.g. the port is taken
        fail(f"cannot serve on {host}:{port or 7860}: {e}")


def _check_host(host: str) -> None:
    """A --host that resolves to an address (before the model loads and the server starts)."""
    import socket

    try:
        socket.getaddrinfo(host or "127.0.0.1", None)  # an empty host is Gradio's default, loopback
    except (socket.gaierror, UnicodeError) as e:
        fail(f"--host {host!r} is not an address this machine can serve on: {getattr(e, 'strerror', e)}")
