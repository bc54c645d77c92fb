"""Prompt words -> token positions, for CLIP BPE, T5 sentencepiece and Llama-style tokenizers.

`token_positions(tokenizer, "a cat and a frog", "frog")` is the list of positions of every sub-token of
"frog" in `tokenizer(prompt)["input_ids"]`, with special tokens added exactly as the pipelines do (CLIP:
start-of-text at 0; T5: no BOS, `</s>` at the end; Llama: BOS at 0).

How: the word is found in the *prompt text* (whole words, case-insensitive), and tokens are matched
to it through the tokenizer's own character offsets. Offsets are the robust choice: they need no
knowledge of how a vocabulary marks word boundaries (CLIP's `</w>` suffix, sentencepiece's `▁`
prefix, byte-level `Ġ`), they survive normalisation (CLIP lower-cases and collapses whitespace), and
they tell "cat" from the "cat" piece inside "catalog" because the match is made on the text, not on
token strings. Slow (pure-Python) tokenizers have no offsets; they are converted with transformers'
own converter and checked to give the same ids.
"""

from __future__ import annotations

import re
from typing import Any

from .controls import shown

__all__ = [
    "TokenNotFoundError",
    "TokenTruncatedError",
    "prompt_positions",
    "prompt_tokens",
    "token_positions",
    "word_spans",
]

# transformers' "no limit" model_max_length is a huge sentinel; anything above this is no limit.
_NO_LIMIT = 10**9
# Characters that only mark a word boundary in common vocabularies (sentencepiece, GPT-2 byte level).
_BOUNDARY_MARKS = "▁Ġ "


class TokenNotFoundError(ValueError):
    """The word (or the requested occurrence of it) is not in the prompt."""


class TokenTruncatedError(TokenNotFoundError):
    """The word is in the prompt but past the length at which the pipeline truncates it."""


def token_positions(
    tokenizer: Any,
    prompt: str,
    word: str,
    occurrence: int = 0,
    *,
    max_length: int | None = None,
    template: str | None = None,
) -> list[int]:
    """Positions in `tokenizer(prompt)["input_ids"]` of every sub-token of `word` (or a phrase).

    Whole-word, case-insensitive match; `occurrence` picks among repeats (0 = first, -1 = last).
    `max_length` is the length the pipeline truncates to (default: the tokenizer's `model_max_length`,
    as CLIP pipelines use; T5 pipelines truncate at their `max_sequence_length`). With `template`
    (a string with one `{}`, e.g. HunyuanVideo's prompt template) the prompt is tokenised inside it,
    only the prompt part is searched, and positions index the templated sequence.
    Raises `TokenNotFoundError` (a ValueError) naming the word and listing the prompt's tokens, and
    `TokenTruncatedError` when the word lies beyond `max_length`.
    """
    parts = word.split()
    if not parts:
        raise ValueError(f"word must contain at least one non-space character, got {word!r}")
    head, tail = "", ""
    if template is not None:
        if template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' placeholder, got {template!r}")
        head, _, tail = template.partition("{}")

    matches = [(len(head) + start, len(head) + end) for start, end in word_spans(prompt, word)]
    if not matches:
        raise TokenNotFoundError(f"{shown(word)} is not in the prompt; {_listing(tokenizer, prompt)}")
    if not -len(matches) <= occurrence < len(matches):
        raise TokenNotFoundError(
            f"occurrence={occurrence} of {shown(word)} is out of range: the prompt has {len(matches)}; "
            f"{_listing(tokenizer, prompt)}"
        )
    start, end = matches[occurrence]

    text = head + prompt + tail
    ids, offsets, special = _encode(tokenizer, text)
    positions = [i for i, (s, e) in enumerate(offsets) if not special[i] and s < end and e > start]
    if not positions:  # e.g. the word became part of a token that spans other text only
        raise TokenNotFoundError(f"{shown(word)} has no tokens of its own; {_listing(tokenizer, prompt)}")
    # Sentencepiece may emit the word-start mark "▁" as a token of its own before the word's pieces;
    # it belongs to the word.
    first = positions[0] - 1
    if first >= 0 and not special[first] and _is_boundary_mark(tokenizer, ids[first], text, offsets[first]):
        positions.insert(0, first)

    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT:
        kept = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        lost = [p for p in positions if p >= len(kept) or kept[p] != ids[p]]
        if lost:
            raise TokenTruncatedError(
                f"{shown(word)} (token positions {positions}) was truncated away: the pipeline keeps only "
                f"the first {limit} tokens; {_listing(tokenizer, prompt)}"
            )
    return positions


def prompt_positions(
    tokenizer: Any, prompt: str, *, template: str | None = None, max_length: int | None = None
) -> list[int]:
    """Positions in `tokenizer(template.format(prompt))["input_ids"]` (or of the prompt alone) of every
    token that covers part of the prompt's text: its words, not the template's tokens nor special
    tokens; only those below `max_length` (where the pipeline truncates). For `prompt_span`."""
    head, tail = "", ""
    if template is not None:
        if template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' placeholder, got {template!r}")
        head, _, tail = template.partition("{}")
    start, end = len(head), len(head) + len(prompt)
    text = head + prompt + tail
    ids, offsets, special = _encode(tokenizer, text)
    limit = len(offsets) if max_length is None else max_length
    positions = [i for i, (s, e) in enumerate(offsets[:limit]) if not special[i] and s < end and e > start]
    # a word-start mark "▁" emitted as a token of its own belongs to the prompt's first word
    first = positions[0] - 1 if positions else -1
    if first >= 0 and not special[first] and _is_boundary_mark(tokenizer, ids[first], text, offsets[first]):
        positions.insert(0, first)
    return positions


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of `word` (or a phrase) in `prompt`: whole words, case-insensitive, any
    whitespace inside a phrase. What `token_positions` matches tokens to; no tokenizer needed."""
    parts = word.split()
    if not parts:
        return []
    # Whole words: no letter/digit/underscore right before or after.
    pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, parts)) + r"(?!\w)", re.IGNORECASE)
    return [(m.start(), m.end()) for m in pattern.finditer(prompt)]


def prompt_tokens(tokenizer: Any, prompt: str) -> list[str]:
    """Readable tokens of `tokenizer(prompt)` (special tokens included), for messages and the CLI."""
    ids = tokenizer(prompt)["input_ids"]
    raw = tokenizer.convert_ids_to_tokens(ids)
    readable = []
    for token_id, token in zip(ids, raw, strict=True):
        text = tokenizer.decode([token_id]).strip()
        # Whitespace-only pieces (a lone "▁", a newline byte) decode to nothing; show the raw token.
        readable.append(text or token)
    return readable


def _listing(tokenizer: Any, prompt: str) -> str:
    tokens = " ".join(f"[{i}] {t}" for i, t in enumerate(prompt_tokens(tokenizer, prompt)))
    return f"its tokens are: {tokens}"


def _is_boundary_mark(tokenizer: Any, token_id: int, text: str, offset: tuple[int, int]) -> bool:
    token = tokenizer.convert_ids_to_tokens(token_id)
    covered = text[offset[0] : offset[1]]
    return bool(token) and not token.strip(_BOUNDARY_MARKS) and not covered.strip()


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """ids, character offsets and special-token mask of `text`, special tokens added, not truncated."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            text,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            verbose=False,  # long prompts: the truncation check below reports what is lost
        )
        return (
            list(enc["input_ids"]),
            [tuple(o) for o in enc["offset_mapping"]],
            list(enc["special_tokens_mask"]),
        )
    backend = _converted_backend(tokenizer)
    enc = backend.encode(text)
    expected = tokenizer(text, verbose=False)["input_ids"]
    if list(enc.ids) != list(expected):
        raise TypeError(
            f"token_positions needs character offsets, which {type(tokenizer).__name__} does not give, "
            "and its converted fast version tokenises differently; load the pipeline's fast tokenizer"
        )
    return list(enc.ids), [tuple(o) for o in enc.offsets], list(enc.special_tokens_mask)


def _converted_backend(tokenizer: Any) -> Any:
    """A `tokenizers.Tokenizer` equivalent to a slow tokenizer, converted once and cached on it."""
    backend = getattr(tokenizer, "_attnctl_backend", None)
    if backend is None:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            backend = convert_slow_tokenizer(tokenizer)
        except Exception as error:  # the converter raises several types for unsupported classes
            raise TypeError(
                f"token_positions needs a fast tokenizer (character offsets); cannot convert "
                f"{type(tokenizer).__name__}: {error}"
            ) from error
        tokenizer._attnctl_backend = backend
    return backend
