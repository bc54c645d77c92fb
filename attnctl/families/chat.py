"""Prompt words among the text keys of families whose text encoder reads the prompt inside a chat
template (FLUX.2, Qwen-Image, Z-Image).

Such a pipeline renders the prompt into its template, tokenizes the text (with the tokenizer's own
special tokens, as `tokenizer(text)`, or without, as `apply_chat_template(tokenize=True)`), may
drop a fixed number of leading tokens (Qwen-Image's system turn) and truncates at a maximum length.
Text key p is then token p + dropped of that sequence. A template here is the rendered text with
`{}` where the prompt goes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..core.tokens import TokenTruncatedError, token_positions

_MARK = "\ue000"  # a private-use character: where the prompt goes in a rendered template


def render_template(render: Callable[[str], str]) -> str:
    """The text `render(prompt)` makes around a prompt, with `{}` where the prompt goes."""
    text = render(_MARK)
    if text.count(_MARK) != 1:
        raise ValueError(f"the chat template does not hold the prompt once: {text!r}")
    return text.replace(_MARK, "{}")


def user_turn(tokenizer: Any, **options: Any) -> str:
    """The template of one user turn and the assistant's start (Qwen3's `enable_thinking` in options)."""
    return render_template(
        lambda p: tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, **options
        )
    )


def default_length(pipe: Any) -> int | None:
    """The pipeline's default `max_sequence_length` of `encode_prompt`, where it truncates the text."""
    param = inspect.signature(type(pipe).encode_prompt).parameters.get("max_sequence_length")
    return None if param is None else param.default


def text_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer itself where a pipeline holds a processor (FLUX.2's Mistral processor)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def positions(
    tokenizer: Any,
    template: str,
    prompt: str,
    word: str,
    occurrence: int = 0,
    *,
    specials: bool = True,
    drop: int = 0,
    max_length: int | None = None,
) -> list[int]:
    """Text-key positions of `word`: its tokens in `template` filled with `prompt`, tokenized with
    (`specials`) or without the tokenizer's special tokens, less the `drop` leading tokens;
    `max_length`: where the pipeline truncates that sequence (before the drop)."""
    tokenizer = text_tokenizer(tokenizer)
    shift = 0 if specials else _added_before(tokenizer, template.replace("{}", prompt, 1))
    limit = None if max_length is None else max_length + shift
    found = token_positions(tokenizer, prompt, word, occurrence, max_length=limit, template=template)
    return [p - shift - drop for p in found]


def span(
    tokenizer: Any,
    template: str,
    prompt: str,
    *,
    specials: bool = True,
    drop: int = 0,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """(the prompt's own tokens, its start/end tokens) among the text keys, as `positions` counts
    them: start, the first key where it is a special token (a BOS, `<|im_start|>`); end, the
    template's token right after the prompt (`[/INST]`, `<|im_end|>`). Tokens past the truncation
    are in neither."""
    tokenizer = text_tokenizer(tokenizer)
    head = template.partition("{}")[0]
    text = template.replace("{}", prompt, 1)
    enc = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    kept = len(ids) if max_length is None else min(len(ids), max_length)
    special = set(tokenizer.all_special_ids)
    start, end = len(head), len(head) + len(prompt)
    own = [
        i
        for i in range(drop, kept)
        if ids[i] not in special and offsets[i][0] < end and offsets[i][1] > start
    ]
    if not own:
        raise TokenTruncatedError(f"no token of the prompt {prompt!r} is among the {kept - drop} text keys")
    ends = [drop] if ids[drop] in special else []
    ends += [own[-1] + 1] if own[-1] + 1 < kept else []
    return [i - drop for i in own], [i - drop for i in ends]


def _added_before(tokenizer: Any, text: str) -> int:
    """How many special tokens `tokenizer(text)` puts before the text's own tokens (e.g. a BOS)."""
    full = tokenizer(text)["input_ids"]
    own = tokenizer(text, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(own) + 1):
        if full[k : k + len(own)] == own:
            return k
    raise ValueError(f"{type(tokenizer).__name__} adds tokens inside the text; cannot place the prompt")
