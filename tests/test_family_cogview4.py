"""CogView4 specifics the generic family tests cannot see: GLM's `[gMASK] <sop>` prefix and the left
padding to a multiple of 16 in front of the text keys, and prompt lists padded to one length."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A cat and a frog next to a hippopotamus and a cat"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("cogview4")


def _run(pipe, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs("cogview4", **{"num_inference_steps": 1, **overrides})
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def _encoded_keys(pipe, prompt):
    """The token ids of the text keys of the conditional rows: what the text encoder received (the
    pipeline pads before encoding, and the transformer sees every position)."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        _run(pipe, prompt, max_sequence_length=64)
    finally:
        hook.remove()
    return seen[0].tolist()  # the prompt is encoded first, then the negative prompt


@pytest.mark.parametrize("prompt", [PROMPT, "a frog"])
def test_text_positions_land_on_the_words_tokens_among_the_keys(pipe, prompt):
    (keys,) = _encoded_keys(pipe, prompt)
    assert len(keys) % 16 == 0 and keys[0] == pipe.tokenizer.pad_token_id  # left padding
    adapter = adapter_for(pipe.transformer)
    words = (
        [("cat", 0), ("frog", 0), ("hippopotamus", 0), ("cat", 1), ("next to", 0)] if prompt == PROMPT else []
    )
    for word, occurrence in [*words, ("frog", 0)]:
        positions = adapter.text_positions(pipe, prompt, word, occurrence)
        assert pipe.tokenizer.decode([keys[p] for p in positions]).strip() == word, word


def test_prompt_span_is_the_prompt_after_the_glm_prefix(pipe):
    (keys,) = _encoded_keys(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.convert_ids_to_tokens([keys[p] for p in ends]) == ["[gMASK]", "<sop>"]
    assert words == list(range(ends[-1] + 1, len(keys)))  # the prompt ends the text
    assert pipe.tokenizer.decode([keys[p] for p in words]) == PROMPT
    assert set(keys[: ends[0]]) == {pipe.tokenizer.pad_token_id}  # padding is in neither


def test_prompt_lists_must_pad_to_one_length(pipe):
    """Prompts padded to one multiple of 16 share the offsets; prompts whose lengths cross one would
    shift the shorter ones' tokens, which attnctl refuses."""
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        _run(pipe, ["a cat and a frog", "a frog"])
    assert ctl.maps["frog"].shape == (8, 8)
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        with pytest.raises(ValueError, match="pad to different lengths"):
            _run(pipe, ["a frog", PROMPT])
        with pytest.raises(ValueError, match="max_sequence_length cut"):
            _run(pipe, PROMPT, max_sequence_length=16)  # cut to 16 tokens: no padding in front


def test_a_renamed_transformer_is_recognised_by_its_processors(pipe):
    model = torch.nn.Module()
    model.transformer_blocks = pipe.transformer.transformer_blocks
    assert adapter_for(model).name == "cogview4"
