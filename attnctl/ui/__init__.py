"""The Gradio web demo (`pip install -e ".[ui]"`, then `attnctl ui`)."""

from __future__ import annotations

from typing import Any

from .app import CSS, TITLE, build_app

__all__ = ["CSS", "TITLE", "build_app", "launch"]


def launch(
    model: str | None = None, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True
) -> Any:
    """Load `model` (None: the bundled testbed model) and serve the demo on `host:port`, on
    loopback by default, never through a share link, analytics off. With block=False it returns
    the running app (`app.local_url`, `app.close()`)."""
    from ..pipelines import call_defaults, load_pipeline

    pipe = load_pipeline(model)
    steps = 2 if model is not None and str(model).startswith("tiny:") else 25
    app = build_app(pipe, model=model, call_kwargs=call_defaults(model), steps=steps)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        css=CSS,
    )
    print(f"attnctl ui: serving on {app.local_url} (Ctrl+C stops it)", flush=True)
    if block:
        app.block_thread()
    return app
