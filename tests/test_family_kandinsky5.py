"""Kandinsky 5 text-to-video: what the generic family tests cannot check — text positions after the
template tokens the pipeline crops (and after its prompt cleaning), the prompt span, the text-only
blocks left out, the unnamed CFG forwards' branches, DraftAttention on padded edges, and NABLA
sparse attention refused with the reason."""

from __future__ import annotations

import pytest
import torch
from recording import draft_kernel_calls, encoder_ids_and_text_lengths

import attnctl
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a  hippopotamus next to a frog"  # the pipeline collapses the double space


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("kandinsky5")


def test_positions_land_on_the_word_after_the_cropped_template(pipe):
    with encoder_ids_and_text_lengths(pipe) as (ids, text):
        pipe(prompt=PROMPT, **tiny_call_kwargs("kandinsky5", num_inference_steps=1))
    crop = pipe.prompt_template_encode_start_idx
    keys = ids[0][crop:]
    assert text[0] == len(keys)  # the prompt's forward sees the ids after the crop
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([keys[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert words == list(range(len(words)))
    assert pipe.tokenizer.decode([keys[p] for p in words]) == " ".join(PROMPT.split())
    assert pipe.tokenizer.convert_ids_to_tokens([keys[p] for p in ends]) == ["<|im_end|>"]


def test_layers_are_the_visual_blocks_self_and_cross_attention(pipe):
    with attnctl.control(pipe) as ctl:
        layers = [(x.name, x.kind) for x in ctl.layers]
    assert layers == [
        (f"visual_transformer_blocks.{b}.{a}_attention", a) for b in range(2) for a in ("self", "cross")
    ]


def test_unnamed_cfg_forwards_are_the_prompt_then_the_negative_prompt(pipe):
    rows = []
    hook = pipe.transformer.register_forward_hook(lambda *_: rows.append((ctl.rows.cond, ctl.rows.uncond)))
    try:
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
            pipe(prompt=PROMPT, **tiny_call_kwargs("kandinsky5"))
    finally:
        hook.remove()
    assert rows == [((0,), ()), ((), (0,))] * 2
    without = []
    hook = pipe.transformer.register_forward_hook(lambda *_: without.append(ctl.rows.cond))
    try:
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
            pipe(prompt=PROMPT, **tiny_call_kwargs("kandinsky5", guidance_scale=1.0))
    finally:
        hook.remove()
    assert without == [(0,)] * 2  # no CFG: one forward a step, the prompt's


def test_draft_runs_sparse_on_padded_edges(pipe, monkeypatch):
    calls = draft_kernel_calls(monkeypatch)
    kwargs = tiny_call_kwargs("kandinsky5", height=48, width=64)  # 2 x 3 x 4 tokens
    with attnctl.control(pipe, attnctl.DraftAttention(sparsity=0.5, pool=(2, 2), dense_steps=0.0)):
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert torch.isfinite(out).all()
    # 2 steps x 2 forwards x the second block's self-attention (the first stays dense), video only
    assert calls == [(24, 0, 2, 3, 4)] * 4


def test_nabla_sparse_attention_is_refused(pipe):
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
        with pytest.raises(ValueError, match="not NABLA sparse attention"):
            pipe.transformer(
                hidden_states=torch.randn(1, 1, 4, 4, 4),
                encoder_hidden_states=torch.randn(1, 3, 16),
                pooled_projections=torch.randn(1, 8),
                timestep=torch.tensor([500.0]),
                visual_rope_pos=[torch.arange(1), torch.arange(2), torch.arange(2)],
                text_rope_pos=torch.arange(3),
                sparse_params={"to_fractal": True},
            )
