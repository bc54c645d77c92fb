"""Qwen-Image: what the generic family tests cannot check — text positions after the template tokens
the pipeline drops, the prompt span, an Edit call's condition-image tokens kept out of the image
queries, and the Edit pipelines' text positions refused with the reason."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from recording import encoder_ids_and_text_lengths

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("qwenimage")


def test_positions_land_on_the_word_after_the_dropped_system_turn(pipe):
    with encoder_ids_and_text_lengths(pipe) as (ids, text):
        pipe(prompt=PROMPT, **tiny_call_kwargs("qwenimage", num_inference_steps=1))
    drop = pipe.prompt_template_encode_start_idx
    assert drop == 34  # the tiny tokenizer spells the system turn in as many tokens as Qwen's
    assert text[0] == len(ids[0]) - drop  # the prompt's forward sees the ids after the drop
    keys = ids[0][drop:]
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([keys[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert words == list(range(len(words))) and pipe.tokenizer.decode([keys[p] for p in words]) == PROMPT
    assert pipe.tokenizer.convert_ids_to_tokens([keys[p] for p in ends]) == ["<|im_end|>"]


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.query.shape[2], call.layout))


def test_edit_condition_image_tokens_are_keys_not_image_queries(pipe):
    """The Edit pipelines' denoiser call: condition-image tokens after the generated ones, their
    shape a second `img_shapes` entry."""
    transformer = pipe.transformer
    text, generated, condition = 7, 8 * 8, 4 * 4
    layouts = _Layouts()
    with attnctl.control(pipe) as session:
        session.add_edit(session.layers, layouts)
        transformer(
            hidden_states=torch.randn(1, generated + condition, 16),
            encoder_hidden_states=torch.randn(1, text, 16),
            encoder_hidden_states_mask=None,
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 8, 8), (1, 4, 4)]],
            return_dict=False,
        )
        assert session.grid == (1, 8, 8)
    assert len(layouts.seen) == 2  # two double-stream blocks
    for queries, layout in layouts.seen:
        assert queries == text + generated + condition
        assert layout.text_k == slice(0, text)
        assert layout.image_q == slice(text, text + generated)
        assert layout.image_k == slice(text, queries)


def test_edit_text_positions_are_refused_with_the_reason(pipe, monkeypatch):
    from diffusers import QwenImageEditPipeline

    source = inspect.getsource(QwenImageEditPipeline.__init__)
    template = re.search(r'self\.prompt_template_encode = "(.*)"', source).group(1)
    monkeypatch.setattr(pipe, "prompt_template_encode", template.encode().decode("unicode_escape"))
    with pytest.raises(NotImplementedError, match="vision tokens before the prompt"):
        adapter_for(pipe.transformer).text_positions(pipe, PROMPT, "cat")


def test_region_prompts_extend_the_text_mask(pipe):
    adapter = adapter_for(pipe.transformer)
    kwargs = {"encoder_hidden_states": torch.zeros(2, 5, 16), "encoder_hidden_states_mask": torch.ones(2, 5)}
    kwargs["encoder_hidden_states_mask"][0, 3:] = 0
    out = adapter.append_text(kwargs, torch.ones(2, 3, 16))
    assert out["encoder_hidden_states"].shape == (2, 8, 16)
    assert out["encoder_hidden_states_mask"][0].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
