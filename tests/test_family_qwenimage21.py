"""Qwen-Image 2.1: what the generic family tests cannot check — text positions after the system turn
the pipeline drops, the prompt span, that controls see only the target image's kernel call (the
prefill's text-segment calls run untouched, the decode's one call over [cached prefix ; target]),
and the flex processor refused with the reason."""

from __future__ import annotations

import pytest
from recording import encoder_ids_and_text_lengths

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("qwenimage21")


def test_positions_land_on_the_word_after_the_dropped_system_turn(pipe):
    with encoder_ids_and_text_lengths(pipe) as (ids, text):
        pipe(prompt=PROMPT, **tiny_call_kwargs("qwenimage21", num_inference_steps=1))
    drop = pipe._drop_idx
    assert pipe.processor.tokenizer.decode(ids[0][:drop]).startswith("<|im_start|>system\n")
    assert text[0] == len(ids[0]) - drop  # the prompt's forward sees the ids after the drop
    keys = ids[0][drop:]
    tokenizer, adapter = pipe.processor.tokenizer, adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert tokenizer.decode([keys[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert tokenizer.decode([keys[p] for p in words]).strip() == PROMPT
    assert tokenizer.convert_ids_to_tokens([keys[p] for p in ends]) == ["<|im_start|>", "<|im_end|>"]


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.query.shape[2], call.key.shape[2], call.layout))


def test_only_the_target_image_call_is_seen_at_prefill_and_decode(pipe):
    with encoder_ids_and_text_lengths(pipe) as (_, text):
        pipe(prompt=PROMPT, **tiny_call_kwargs("qwenimage21", negative_prompt=None))
    layouts, image = _Layouts(), 8 * 8
    with attnctl.control(pipe) as session:
        session.add_edit(session.layers, layouts)
        pipe(prompt=PROMPT, **tiny_call_kwargs("qwenimage21", negative_prompt=None))
    # 2 steps (prefill with a text call and the image's, then a decode) x 2 blocks: 4 image calls
    assert len(layouts.seen) == 4
    for queries, keys, layout in layouts.seen:
        assert (queries, keys) == (image, text[0] + image)
        assert layout.image_q == slice(0, image) and layout.image_k == slice(text[0], keys)
        assert layout.text_k == slice(0, text[0]) and (layout.height, layout.width) == (8, 8)


def test_the_flex_processor_is_refused_with_the_reason():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    pipe = tiny_pipeline("qwenimage21")
    pipe.transformer.set_attn_processor(QwenImage21FlexAttnProcessor())
    with pytest.raises(ValueError, match="QwenImage21FlexAttnProcessor: its prefill is one flex call"):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            pass


def test_image_scope_softpag_runs_on_the_image_only_call(pipe):
    """The image-scope perturbation on a call whose queries are the image alone (fewer than its keys)."""
    import torch

    base = pipe(prompt=PROMPT, **tiny_call_kwargs("qwenimage21"), generator=torch.Generator().manual_seed(0))
    with attnctl.control(pipe) as ctl:
        layer = ctl.layers[0].name
    with attnctl.control(pipe, attnctl.SoftPAG({layer: [0]}, u=0.5, scale=3.0, scope="image")):
        out = pipe(
            prompt=PROMPT, **tiny_call_kwargs("qwenimage21"), generator=torch.Generator().manual_seed(0)
        )
    assert torch.isfinite(out.images).all() and not torch.equal(out.images, base.images)
