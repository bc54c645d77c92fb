"""Lumina 2 specifics the generic family tests cannot see: the system-prompt template, the unpadded
per-sample text in the joint layers (one text length per call is supported), CFG as two unnamed
forwards (conditional first), the refiners, grouped-query attention."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A cat and a frog next to a hippopotamus and a cat"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("lumina2")


def _run(pipe, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs("lumina2", **{"num_inference_steps": 1, **overrides})
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def _encoded_keys(pipe, prompt):
    """The token ids of the conditional prompt's text keys: what the text encoder received, cut to
    the mask's length as the transformer cuts each sample's text."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(
            (kwargs["input_ids"] if "input_ids" in kwargs else args[0], kwargs)
        ),
        with_kwargs=True,
    )
    try:
        _run(pipe, prompt)
    finally:
        hook.remove()
    ids, kwargs = seen[0]  # the prompt is encoded first, then the negative prompt
    return ids[0, : int(kwargs["attention_mask"][0].sum())].tolist()


def test_text_positions_land_on_the_words_tokens_among_the_keys(pipe):
    keys = _encoded_keys(pipe, PROMPT)
    adapter = adapter_for(pipe.transformer)
    for word, occurrence in [("cat", 0), ("frog", 0), ("hippopotamus", 0), ("cat", 1), ("next to", 0)]:
        positions = adapter.text_positions(pipe, PROMPT, word, occurrence)
        assert pipe.tokenizer.decode([keys[p] for p in positions]).strip() == word, word
    assert adapter.text_positions(pipe, PROMPT, "cat")[0] > 20  # after the system prompt


def test_prompt_span_is_the_prompt_after_the_system_prompt(pipe):
    keys = _encoded_keys(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert ends == [0] and keys[0] == pipe.tokenizer.bos_token_id
    assert words == list(range(words[0], len(keys)))  # the prompt ends the unpadded text
    assert pipe.tokenizer.decode([keys[p] for p in words]).strip() == PROMPT
    assert "<Prompt Start>" in pipe.tokenizer.decode(keys[: words[0]])


def test_cfg_forwards_are_labelled_conditional_then_unconditional(pipe):
    rows = []
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        hook = pipe.transformer.register_forward_hook(lambda *_: rows.append((ctl.step, ctl.rows)))
        try:
            _run(pipe, num_inference_steps=2)
            _run(pipe, guidance_scale=1.0)  # no CFG: one forward per step, conditional
        finally:
            hook.remove()
    labels = [(step, "cond" if r.cond else "uncond") for step, r in rows]
    assert labels == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"), (0, "cond")]


def test_one_text_length_per_call(pipe):
    """Prompts of one length (here also two images per prompt) share the image offset; prompts of
    different lengths put their image tokens at different offsets, which attnctl refuses."""
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        _run(pipe, ["a cat and a frog", "a dog and a frog"], num_images_per_prompt=2)
    assert ctl.maps["frog"].shape == (8, 8)
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        with pytest.raises(ValueError, match="different token lengths"):
            _run(pipe, ["a cat and a frog", "a small green frog sitting on the grass"])


def test_refiners_grouped_query_attention_and_kinds(pipe):
    with attnctl.control(pipe) as ctl:
        kinds = {x.name: x.kind for x in ctl.layers}
    assert kinds == {"noise_refiner.0.attn": "self", "layers.0.attn": "joint", "layers.1.attn": "joint"}
    attn = pipe.transformer.layers[0].attn
    assert attn.to_k.out_features < attn.to_q.out_features  # fewer key/value heads than query heads
    renamed = torch.nn.Module()  # another class whose attention runs Lumina 2's processors
    renamed.layers = pipe.transformer.layers
    assert adapter_for(renamed).name == "lumina2"
