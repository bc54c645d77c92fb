"""HunyuanVideo 1.5: what the generic family tests cannot check — text positions among keys the model
reorders per row ([valid ByT5 glyph tokens ; valid Qwen tokens ; pads]), after the chat template's
cropped [system, user] head; the prompt span; the text-only token refiner left out; DraftAttention
running sparse under the model's pair mask; the guider's branch names and CFG scale."""

from __future__ import annotations

import contextlib

import pytest
import torch
from recording import draft_kernel_calls

import attnctl
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"
GLYPH = 'a sign saying "hello world" next to a frog and a cat'


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("hunyuanvideo15")


@contextlib.contextmanager
def _text_keys(pipe):
    """Per denoiser call: the Qwen input ids, the refined Qwen states [B, L, C] and the text keys as
    the first block receives them (after the model's reordering)."""
    seen = {"ids": [], "refined": [], "keys": []}
    t = pipe.transformer
    hooks = [
        pipe.text_encoder.register_forward_pre_hook(
            lambda _, a, kw: seen["ids"].append(kw["input_ids"][0].tolist()), with_kwargs=True
        ),
        t.context_embedder.register_forward_hook(lambda _, a, out: seen["refined"].append(out)),
        t.transformer_blocks[0].register_forward_pre_hook(lambda _, a: seen["keys"].append(a[1])),
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("prompt", [PROMPT, GLYPH])
def test_positions_land_on_the_word_among_the_reordered_text_keys(pipe, prompt):
    with _text_keys(pipe) as seen:
        pipe(prompt=prompt, **tiny_call_kwargs("hunyuanvideo15", num_inference_steps=1))
    crop = pipe.prompt_template_encode_start_idx
    ids = seen["ids"][0][crop:]  # the prompt's encoding, cropped as the pipeline crops it
    refined, keys = seen["refined"][0][0], seen["keys"][0][0]  # the prompt's (conditional) forward
    cond = pipe.transformer.cond_type_embed.weight[0]  # the model adds it to every Qwen token
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog") if prompt == PROMPT else ("cat", "frog", "hello"):
        positions = adapter.text_positions(pipe, prompt, word)
        if word == "hippopotamus":
            assert len(positions) > 1  # split into sub-words
        # each key position holds the refined state of a Qwen token of the word
        found = []
        for p in positions:
            j = [i for i in range(len(ids)) if torch.allclose(keys[p] - cond, refined[i], atol=1e-6)]
            assert len(j) == 1, (word, p)
            found.append(ids[j[0]])
        assert pipe.tokenizer.decode(found).strip() == word
    if prompt == GLYPH:  # the ByT5 tokens of 'Text "hello world". ' come first
        assert adapter.text_positions(pipe, prompt, "a")[0] == len(
            pipe.tokenizer_2('Text "hello world". ').input_ids
        )


def test_prompt_span(pipe):
    adapter = adapter_for(pipe.transformer)
    crop = pipe.prompt_template_encode_start_idx
    full = pipe.tokenizer(adapter_template(pipe).format(PROMPT))["input_ids"][crop:]
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert words == list(range(len(words))) and pipe.tokenizer.decode([full[p] for p in words]) == PROMPT
    assert pipe.tokenizer.convert_ids_to_tokens([full[p] for p in ends]) == ["<|im_end|>"]
    shift = len(pipe.tokenizer_2('Text "hello world". ').input_ids)
    glyph_words, glyph_ends = adapter.prompt_span(pipe, GLYPH)
    assert glyph_words[0] == shift and glyph_ends == [glyph_words[-1] + 1]


def adapter_template(pipe):
    from attnctl.families.hunyuanvideo15 import qwen_template

    return qwen_template(pipe)


def test_layers_leave_out_the_text_only_token_refiner(pipe):
    with attnctl.control(pipe) as ctl:
        names = [x.name for x in ctl.layers]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert all(x.kind == "joint" for x in ctl.layers)


def test_draft_runs_sparse_under_the_pair_mask(pipe, monkeypatch):
    """The model masks padded text with mask_q & mask_k [B, 1, S, S]: DraftAttention keeps its
    sparse kernel on the valid tokens (not a dense fallback) and the padded text queries' rows as the
    model computes them."""
    calls = draft_kernel_calls(monkeypatch)
    kwargs = tiny_call_kwargs("hunyuanvideo15", height=48, width=64)  # 2 x 3 x 4 tokens: padded edges
    with attnctl.control(pipe, attnctl.DraftAttention(sparsity=0.5, pool=(2, 2), dense_steps=0.0)):
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert torch.isfinite(out).all()
    video = 2 * 3 * 4
    qwen = len(pipe.tokenizer(adapter_template(pipe).format(PROMPT))["input_ids"]) - (
        pipe.prompt_template_encode_start_idx
    )
    # per step: the prompt's row, then the negative prompt's ("" is templated as " ")
    assert calls and all(c[2:] == (2, 3, 4) for c in calls)
    assert calls[0][:2] == (video + qwen, qwen)


def test_guider_branches_and_cfg_scale(pipe):
    adapter = adapter_for(pipe.transformer)
    assert adapter.cfg_scale(pipe) == 6.0
    branches = []
    hook = pipe.transformer.register_forward_hook(lambda *_: branches.append(session.rows))
    try:
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as session:
            pipe(prompt=PROMPT, **tiny_call_kwargs("hunyuanvideo15", num_inference_steps=1))
    finally:
        hook.remove()
    assert [(r.cond, r.uncond) for r in branches] == [((0,), ()), ((), (0,))]
