"""AuraFlow: what the generic family tests cannot see: the words' positions in the T5 ids the
pipeline really encodes, the prompt span, and the 8 register tokens the model puts before the text,
which are neither image queries nor text keys and stay visible under Layout."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A Cat and a frog"
REGISTERS = 8


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("auraflow")


def _encoded_ids(pipe, prompt):
    """The T5 input ids of the prompt's row, as the pipeline gives them to its encoder."""
    with encoder_ids(pipe.text_encoder) as seen:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("auraflow"))
    return seen[0]  # the prompt first, then the negative prompt


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    adapter = adapter_for(pipe.transformer)
    ids = _encoded_ids(pipe, PROMPT)
    for word in ("Cat", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word


def test_prompt_span_is_the_words_then_end_of_text(pipe):
    ids = _encoded_ids(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([ids[p] for p in words]).strip() == PROMPT
    assert [ids[p] for p in ends] == [pipe.tokenizer.eos_token_id] and ends[0] == words[-1] + 1


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.name, call.query.shape[2], call.layout))


def test_registers_are_neither_image_nor_text(pipe):
    kwargs = tiny_call_kwargs("auraflow", num_inference_steps=1)
    text, grid = kwargs["max_sequence_length"], (kwargs["height"] // 4, kwargs["width"] // 4)
    capture = _Layouts()
    with attnctl.control(pipe) as ctl:
        ctl.add_edit(ctl.layers, capture)
        pipe(PROMPT, **kwargs)
    assert {name for name, _, _ in capture.seen} == {
        "joint_transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
    }
    for _, queries, layout in capture.seen:
        start = REGISTERS + text
        assert queries == start + grid[0] * grid[1]
        assert layout.text_k == slice(REGISTERS, start)
        assert layout.image_q == layout.image_k == slice(start, queries)
        assert (layout.height, layout.width) == grid


def test_layout_keeps_the_registers_visible(pipe):
    """Under Layout the unconditional rows attend as without it: to the registers too."""
    outputs = []

    def first_step(*controls):
        outputs.clear()
        hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
        try:
            with attnctl.control(pipe, *controls):
                pipe(PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("auraflow"))
        finally:
            hook.remove()
        return outputs[0]

    base = first_step()
    regional = first_step(
        attnctl.Layout([attnctl.Region([0, 0, 0.5, 1], "a cat"), attnctl.Region([0.5, 0, 1, 1], "a frog")])
    )
    assert torch.allclose(regional[0], base[0], atol=1e-6)  # uncond row
    assert (regional[1] - base[1]).abs().max() > 2e-5  # cond row: the boxes act (an untrained model)
