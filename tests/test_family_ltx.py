"""LTX-Video: what the generic family tests cannot see: the words' positions in the T5 ids the
pipeline really encodes, the prompt span, a non-square multi-frame token grid read from the packed
latent's call arguments, the T5 padding kept out of the maps by the model's own key bias, DraftAttention
on a grid its pool does not divide, matching by processor, and LTXConditionPipeline's calls refused."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.families.ltx import LTXAdapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("ltx")


def _run(pipe, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs("ltx", **{"output_type": "latent", **overrides})
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames


def _encoded_ids(pipe, prompt=PROMPT):
    """The T5 input ids of the prompt, as the pipeline gives them to its encoder (prompt first)."""
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, prompt, num_inference_steps=1)
    return seen[0]


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    adapter = adapter_for(pipe.transformer)
    ids = _encoded_ids(pipe)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words


def test_prompt_span_is_the_words_then_end_of_text(pipe):
    ids = _encoded_ids(pipe)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([ids[p] for p in words]).strip() == PROMPT
    assert [ids[p] for p in ends] == [pipe.tokenizer.eos_token_id]
    assert ids[ends[-1] + 1] == pipe.tokenizer.pad_token_id  # padding follows, in neither


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.kind, call.query.shape[2], call.key.shape[2], call.layout, call.mask))


def test_grid_layouts_and_padding_bias(pipe):
    """9 frames x 32 x 64 px: 3 latent frames of 8 x 16 tokens; attn2's padded T5 keys carry -10000."""
    layouts = _Layouts()
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        ctl.add_edit(ctl.layers, layouts)
        _run(pipe, num_inference_steps=1, width=64)
    assert [(x.name, x.kind) for x in ctl.layers[:2]] == [
        ("transformer_blocks.0.attn1", "self"),
        ("transformer_blocks.0.attn2", "cross"),
    ]
    assert ctl.maps["frog"].shape == (3, 8, 16)
    text_len = tiny_call_kwargs("ltx")["max_sequence_length"]
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    for kind, queries, keys, layout, mask in layouts.seen:
        assert queries == 3 * 8 * 16 and (layout.frames, layout.height, layout.width) == (3, 8, 16)
        assert layout.image_q == slice(0, queries)
        if kind == "self":
            assert keys == queries and layout.text_k is None and mask is None
        else:
            assert keys == text_len and layout.text_k == slice(0, text_len)
            bias = mask[1].flatten(1)[0]  # the conditional row
            assert (bias[: ends[-1] + 1] == 0).all() and (bias[ends[-1] + 1 :] == -10000).all()


def test_draft_attention_on_a_grid_its_pool_does_not_divide(pipe):
    """8 x 16 tokens with 3 x 5 regions: padded edges; attn2 (text) stays dense."""
    kwargs = {"num_inference_steps": 2, "width": 64}
    base = _run(pipe, **kwargs)
    with attnctl.control(
        pipe, attnctl.DraftAttention(sparsity=1e-9, pool=(3, 5), dense_steps=0, dense_blocks=())
    ):
        kept = _run(pipe, **kwargs)
    assert (kept - base).abs().max() <= 1e-5
    with attnctl.control(
        pipe, attnctl.DraftAttention(sparsity=0.5, pool=(3, 5), dense_steps=0, dense_blocks=())
    ):
        sparse = _run(pipe, **kwargs)
    assert torch.isfinite(sparse).all() and (sparse - base).abs().max() > 1e-4


def test_a_renamed_transformer_is_recognised_by_its_processors(pipe):
    renamed = type("MyVideoModel", (torch.nn.Module,), {})()
    renamed.add_module("transformer_blocks", pipe.transformer.transformer_blocks)
    assert isinstance(adapter_for(renamed), LTXAdapter)


def test_calls_without_the_token_grid_are_refused(pipe):
    """LTXConditionPipeline passes video_coords (and conditioning tokens) instead of the grid."""
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        latents = torch.zeros(1, 12, 8)
        text = torch.zeros(1, 4, 32)
        with pytest.raises(ValueError, match="without num_frames"):
            pipe.transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                timestep=torch.tensor([1.0]),
                encoder_attention_mask=torch.ones(1, 4),
                video_coords=torch.zeros(1, 3, 12),
            )
