"""`attnctl ui`: the web demo."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import MODEL_HELP, THREADS_HELP, fail, load_model, read_controls


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
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    max_pixels: int = typer.Option(
        1024 * 1024, "--max-pixels", min=1, help="Largest height x width a request may ask."
    ),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="Most denoising steps a request may ask."),
    max_frames: int = typer.Option(129, "--max-frames", min=1, help="Most video frames a request may ask."),
    max_iterations: int = typer.Option(
        50, "--max-iterations", min=1, help="Most iterations per step a request's control may ask."
    ),
    max_seconds: float = typer.Option(
        600.0, "--max-seconds", min=1.0, help="A request's generation stops after this many seconds."
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
    from attnctl.ui import launch
    from attnctl.ui.app import Limits

    pipe = load_model(model, threads=threads)
    try:
        limits = Limits(max_pixels, max_steps, max_frames, max_iterations, max_seconds)
        launch(model, pipe=pipe, host=host, port=port, prompt=prompt, controls=controls, limits=limits)
    except OSError as e:  # e.g. the port is taken
        fail(f"cannot serve on {host}:{port or 7860}: {e}")
