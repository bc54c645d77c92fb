"""Chroma: what the generic family tests cannot check — text positions in the sequence the pipeline
really encodes, the prompt span, the float 0/1 mask handed to the kernel unchanged, and the branch of
each of the pipeline's separate CFG forwards."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers import transformer_flux
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.denoiser import DenoiserWrapper
from attnctl.families import adapter_for
from attnctl.families.chroma import ChromaAdapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("chroma")


def _run(pipe, **overrides):
    kwargs = tiny_call_kwargs("chroma", **overrides)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_text_positions_land_on_the_word_in_the_encoded_sequence(pipe):
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, num_inference_steps=1)
    ids = seen[0]  # the prompt's (the negative prompt's comes second)
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).replace(" ", "") == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words


def test_prompt_span_is_the_words_then_the_end_token(pipe):
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, num_inference_steps=1)
    ids = seen[0]
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([ids[p] for p in words]) == PROMPT
    assert [ids[p] for p in ends] == [pipe.tokenizer.eos_token_id]
    assert ids[ends[0] + 1] == pipe.tokenizer.pad_token_id  # the pad the mask keeps: in neither


def test_the_float_mask_reaches_the_kernel_unchanged(pipe, monkeypatch):
    """Chroma's 0/1 mask is float, so attention adds it (a +1 bias) rather than masking: attnctl must
    pass it on as the model made it, not as a boolean mask."""
    masks = []
    original = transformer_flux.dispatch_attention_fn

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", recording)
    base = _run(pipe, num_inference_steps=1)
    plain = list(masks)
    assert len(plain) == 4  # 2 layers x (prompt, negative prompt)
    seen = []

    class _MaskSpy(AttentionEdit):
        def observe(self, call):
            seen.append(call.mask)

    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        ctl.add_edit(ctl.layers, _MaskSpy())
        out = _run(pipe, num_inference_steps=1)
    assert torch.equal(out, base)
    assert len(seen) == len(plain)  # the calls attnctl took part in: each with the model's own mask
    for got, expected in zip(seen, plain, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert set(got.unique().tolist()) == {0.0, 1.0}


class _Rows(DenoiserWrapper):
    def __init__(self):
        self.seen = []

    def before(self, session, module, args, kwargs):
        self.seen.append((session.step, session.rows.cond, session.rows.uncond))
        return args, kwargs


def test_separate_cfg_forwards_are_labelled_prompt_then_negative(pipe):
    rows = _Rows()
    with attnctl.control(pipe) as session:
        session.add_wrapper(rows)
        _run(pipe, num_images_per_prompt=2)
    # two images per prompt: a batch of 2 in each forward, not CFG's [uncond, cond] halves
    assert rows.seen == [(0, (0, 1), ()), (0, (), (0, 1)), (1, (0, 1), ()), (1, (), (0, 1))]
    rows.seen.clear()
    with attnctl.control(pipe) as session:
        session.add_wrapper(rows)
        _run(pipe, guidance_scale=1.0)  # no CFG: one forward per step
    assert rows.seen == [(0, (0,), ()), (1, (0,), ())]


def test_a_subclass_is_chroma_and_layers_are_joint(pipe):
    class Renamed(ChromaTransformer2DModel):
        pass

    model = Renamed.from_config(pipe.transformer.config)
    assert type(adapter_for(model)) is ChromaAdapter
    layers = ChromaAdapter().layers(model)
    assert [(x.name, x.kind) for x in layers] == [
        ("transformer_blocks.0.attn", "joint"),
        ("single_transformer_blocks.0.attn", "joint"),
    ]
