"""Mochi 1: what the generic family tests cannot see: the words' positions in the T5 ids the pipeline
really encodes, the prompt span, the processor's row-by-row kernel calls (each row's own unpadded
text after the video tokens; the rows' CFG branches, and SoftPAG's perturbed row, told apart per call),
a row without text (a zeroed empty negative prompt), attention modules without `set_processor`, and
several videos per call refused."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.families.base import attention_modules
from attnctl.families.mochi import MochiAdapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("mochi")


def _run(pipe, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs("mochi", **{"output_type": "latent", **overrides})
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames


def _encoded_ids(pipe, prompt=PROMPT):
    """The T5 ids of the prompt's row, as the pipeline gives them to its encoder (prompt first)."""
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, prompt)
    return seen[0]


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    adapter = adapter_for(pipe.transformer)
    ids = _encoded_ids(pipe)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words


def test_prompt_span_is_every_key_of_the_rows_text(pipe):
    ids = _encoded_ids(pipe)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([ids[p] for p in words]).strip() == PROMPT
    assert [ids[p] for p in ends] == [pipe.tokenizer.eos_token_id]
    assert ids[ends[-1] + 1] == pipe.tokenizer.pad_token_id  # padding, which the processor drops


class _Calls(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.name, call.query.shape, call.key.shape[2], call.layout, call.rows))


def test_one_kernel_call_per_row_with_its_own_text(pipe):
    """[uncond, cond], then SoftPAG's perturbed copy of cond: three calls per layer and step, each
    one row of [video ; that row's text]; 7 frames x 128 x 64 px: 2 latent frames of 8 x 4 tokens."""
    calls = _Calls()
    with attnctl.control(pipe, attnctl.SoftPAG(["transformer_blocks.1.attn1:0"], scale=2.0)) as ctl:
        ctl.add_edit(ctl.layers, calls)
        _run(pipe, width=64)
    assert [(x.name, x.kind) for x in ctl.layers] == [
        ("transformer_blocks.0.attn1", "joint"),
        ("transformer_blocks.1.attn1", "joint"),
    ]
    n, words = 2 * 8 * 4, len(pipe.tokenizer(PROMPT)["input_ids"])
    texts = {"uncond": 1, "cond": words, "perturbed": words}  # the empty negative prompt: `</s>`
    branches = []
    for _, shape, keys, layout, rows in calls.seen:
        (branch,) = [b for b in ("uncond", "cond", "perturbed") if getattr(rows, b) == (0,)]
        branches.append(branch)
        assert shape[0] == 1 and shape[2] == keys == n + texts[branch]
        assert (layout.frames, layout.height, layout.width) == (2, 8, 4)
        assert layout.image_q == layout.image_k == slice(0, n) and layout.text_k == slice(n, keys)
    assert branches == ["uncond", "cond", "perturbed"] * 4  # 2 layers x 2 steps


def test_a_zeroed_empty_negative_prompt_leaves_its_row_without_text(pipe):
    calls = _Calls()
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    try:
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
            ctl.add_edit(ctl.layers, calls)
            _run(pipe)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
    uncond = [layout for *_, layout, rows in calls.seen if rows.uncond]
    assert uncond and all(layout.text_k is None for layout in uncond)
    assert ctl.maps["frog"].shape == (2, 8, 8) and ctl.maps["frog"].sum() > 0


def test_modules_without_set_processor_are_swapped_and_restored(pipe):
    modules = attention_modules(pipe.transformer)
    assert list(modules) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert not hasattr(modules["transformer_blocks.0.attn1"], "set_processor")
    before = {name: m.processor for name, m in modules.items()}
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        assert all(m.processor is not before[name] for name, m in modules.items())
    assert {name: m.processor for name, m in modules.items()} == before
    assert isinstance(adapter_for(pipe.transformer), MochiAdapter)


def test_several_videos_per_call_are_refused(pipe):
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        with pytest.raises(ValueError, match="one video per call"):
            _run(pipe, num_videos_per_prompt=2)
