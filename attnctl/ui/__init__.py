"""The Gradio web demo (`pip install "attnctl[ui]"`, then `attnctl ui`)."""

from __future__ import annotations

from typing import Any

from .app import CSS, TITLE, build_app

__all__ = ["CSS", "TITLE", "build_app", "launch"]


def launch(
    model: str | None = None,
    *,
    pipe: Any = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    **options: Any,
) -> Any:
    """Serve the demo of `model` (None: the bundled testbed model; or an already loaded `pipe`) on
    `host:port`: loopback by default, never a share link, analytics off. `options` go to
    `build_app` (prompt, controls). With block=False it returns the running app (`app.local_url`,
    `app.close()`)."""
    from ..pipelines import TINY_PREFIX, call_defaults, load_pipeline

    if pipe is None:
        pipe = load_pipeline(model)
    steps = 2 if model is not None and str(model).startswith(TINY_PREFIX) else 25
    app = build_app(pipe, model=model, call_kwargs=call_defaults(model), steps=steps, **options)
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
