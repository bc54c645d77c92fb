"""HiDream-I1: what the generic family tests cannot see: the words' positions in the T5 ids the
pipeline really encodes (the text keys attnctl gives controls are the T5 segment of
[image ; T5 ; Llama last ; Llama of the block]), the prompt span, the padded image tokens of a
non-square latent, the stacked Llama states whose batch is their second dimension, and the
`timesteps` keyword."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.denoiser import append_rows, take_rows
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A Cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("hidream")


def _encoded_t5_ids(pipe, prompt):
    with encoder_ids(pipe.text_encoder_3) as seen:
        pipe(
            prompt,
            generator=torch.Generator().manual_seed(0),
            **tiny_call_kwargs("hidream", num_inference_steps=1),
        )
    return seen[0]  # the prompt first, then the negative prompt


def test_text_positions_land_on_the_word_in_the_encoded_t5_ids(pipe):
    adapter = adapter_for(pipe.transformer)
    ids = _encoded_t5_ids(pipe, PROMPT)
    for word in ("Cat", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer_3.decode([ids[p] for p in positions]).strip() == word


def test_prompt_span_is_the_t5_words_then_end_of_text(pipe):
    ids = _encoded_t5_ids(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer_3.decode([ids[p] for p in words]).strip() == PROMPT
    assert [ids[p] for p in ends] == [pipe.tokenizer_3.eos_token_id] and ends[0] == words[-1] + 1


class _Calls(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.name, call.session.step, call.query.shape[2], call.layout))


@pytest.mark.parametrize("size", [(32, 32), (32, 64)])
def test_token_layout_square_and_padded(pipe, size):
    """[image ; T5 ; Llama ; Llama] in both blocks; a non-square latent's image tokens are padded to
    `max_seq`, and only the first h * w of them are image queries and keys."""
    text = tiny_call_kwargs("hidream")["max_sequence_length"]
    kwargs = tiny_call_kwargs("hidream", height=size[0], width=size[1])
    capture = _Calls()
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        ctl.add_edit(ctl.layers, capture)
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        _, h, w = ctl.grid
    image = h * w if h == w else pipe.transformer.max_seq
    if size[0] == size[1]:
        assert h == w and image == h * w
    else:
        assert h != w and image == pipe.transformer.max_seq > h * w
    assert {(name, step) for name, step, _, _ in capture.seen} == {
        (name, step)
        for name in ("double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1")
        for step in (0, 1)
    }  # steps counted from the `timesteps` keyword
    for _, _, queries, layout in capture.seen:
        assert queries == image + 3 * text
        assert layout.image_q == layout.image_k == slice(0, h * w)
        assert layout.text_k == slice(image, image + text)
    assert ctl.maps["frog"].shape == (h, w) and torch.isfinite(ctl.maps["frog"]).all()


def test_non_square_maps_equal_an_explicit_softmax(pipe):
    """Over every key (padded image keys and Llama segments included), image queries to the T5 keys."""
    kwargs = tiny_call_kwargs("hidream", height=32, width=64, num_inference_steps=1)
    layer = "single_stream_blocks.0.block.attn1"
    seen = []

    class Keep(AttentionEdit):
        def observe(self, call):
            seen.append((call.query.detach().clone(), call.key.detach().clone(), call.layout, call.cond_rows))

    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"], layers=[layer])) as ctl:
        ctl.add_edit([x for x in ctl.layers if x.name == layer], Keep())
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    ((q, k, layout, rows),) = seen
    positions = ctl.adapter.text_positions(pipe, PROMPT, "frog")
    probs = ((q[rows] @ k[rows].transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    columns = [layout.text_k.start + p for p in positions]
    expected = (
        probs[:, :, layout.image_q][..., columns]
        .mean(-1)
        .mean(1)
        .mean(0)
        .reshape(layout.height, layout.width)
    )
    assert torch.allclose(ctl.maps["frog"], expected, atol=1e-6)


def test_rows_of_the_stacked_llama_states_are_taken_along_their_batch_dimension(pipe):
    """`encoder_hidden_states_llama3` is [layers, B, L, C]; with 2 layers and 2 rows (the tiny model)
    the first dimension is no sign of the batch."""
    dims = adapter_for(pipe.transformer).batch_dims
    llama = torch.arange(2 * 2 * 3).reshape(2, 2, 3, 1).float()
    t5 = torch.arange(2 * 3).reshape(2, 3, 1).float()
    kwargs = {"encoder_hidden_states_llama3": llama, "encoder_hidden_states_t5": t5}
    taken = take_rows(((), kwargs), [1], 2, dims)[1]
    assert torch.equal(taken["encoder_hidden_states_llama3"], llama[:, [1]])
    assert torch.equal(taken["encoder_hidden_states_t5"], t5[[1]])
    grown = append_rows(((), kwargs), [1], 2, dims)[1]
    assert torch.equal(grown["encoder_hidden_states_llama3"], llama[:, [0, 1, 1]])


def test_layout_is_refused_with_its_reason(pipe):
    layout = attnctl.Layout([attnctl.Region([0, 0, 0.5, 1], "a cat")])
    with pytest.raises(ValueError, match="T5 and both Llama text segments"):
        with attnctl.control(pipe, layout):
            pass
