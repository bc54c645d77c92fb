"""What family tests record from a pipeline's own calls: the ids its text encoder receives, and the
calls of DraftAttention's sparse kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def encoder_ids(encoder) -> Iterator[list[list[int]]]:
    """The input ids of each call of a text encoder (by keyword or first argument), the first row of
    each: the prompt's, which pipelines encode before the negative prompt."""
    seen: list[list[int]] = []

    def record(_, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append(ids[0].tolist())

    hook = encoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


@contextlib.contextmanager
def encoder_ids_and_text_lengths(pipe) -> Iterator[tuple[list[list[int]], list[int]]]:
    """`encoder_ids` of the pipeline's text encoder, and the text length of each denoiser call."""
    text: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: text.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        with encoder_ids(pipe.text_encoder) as ids:
            yield ids, text
    finally:
        hook.remove()


def draft_kernel_calls(monkeypatch) -> list[tuple[int, int, int, int, int]]:
    """Each call of DraftAttention's sparse kernel, passed through: (queries, text tokens, frames,
    height, width)."""
    from attnctl.processors import draft

    calls = []
    sparse = draft.draft_attention

    def record(q, k, v, **kw):
        calls.append((q.shape[2], kw["text"], kw["frames"], kw["height"], kw["width"]))
        return sparse(q, k, v, **kw)

    monkeypatch.setattr(draft, "draft_attention", record)
    return calls
