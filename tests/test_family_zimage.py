"""Z-Image: what the generic family tests cannot check — text positions in the caption the pipeline
really encodes (a Qwen3 chat turn, its padding left out), the prompt span, image pads and caption
pads kept out of the image queries, the denoiser's list inputs ([prompt's row, negative prompt's
row], steps read from `t`), a list prompt the pipeline templates in place, and SoftPAG folded into
the pipeline's own guidance formula ε_c + w·(ε_c − ε_u)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.denoiser import DenoiserWrapper
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("zimage")


def _run(pipe, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs("zimage", **overrides)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


@contextlib.contextmanager
def _encoded(pipe):
    """The ids of the prompt the text encoder sees (mask-selected, as the pipeline keeps them) and
    the caption lengths of each denoiser call."""
    ids, captions = [], []

    def encoder(_, args, kwargs):
        mask = kwargs["attention_mask"][0]
        ids.append(kwargs["input_ids"][0][mask].tolist())

    hooks = [
        pipe.text_encoder.register_forward_pre_hook(encoder, with_kwargs=True),
        pipe.transformer.register_forward_pre_hook(
            lambda _, args: captions.append([len(c) for c in args[2]])
        ),
    ]
    try:
        yield ids, captions
    finally:
        for h in hooks:
            h.remove()


def test_positions_land_on_the_word_in_the_encoded_caption(pipe):
    with _encoded(pipe) as (ids, captions):
        _run(pipe, num_inference_steps=1)
    caption = ids[0]  # the prompt's (the negative prompt's is encoded second)
    assert captions[0] == [len(caption), len(ids[1])]  # one batch: [prompt's row, negative's row]
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([caption[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([caption[p] for p in words]) == PROMPT
    assert pipe.tokenizer.convert_ids_to_tokens([caption[p] for p in ends]) == ["<|im_start|>", "<|im_end|>"]


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.name, call.query.shape[2], call.key.shape[2], call.layout))


def test_image_and_caption_pads_are_not_image_queries(pipe):
    """48 px: 12 x 12 = 144 image tokens, padded to 160; the caption padded to 32 after them."""
    layouts = _Layouts()
    with attnctl.control(pipe) as session:
        session.add_edit(session.layers, layouts)
        _run(pipe, num_inference_steps=1, height=48, width=48)
    assert [(name, kind) for name, kind in ((x.name, x.kind) for x in session.layers)] == [
        ("noise_refiner.0.attention", "self"),  # context_refiner: the caption alone, not a layer
        ("layers.0.attention", "joint"),
        ("layers.1.attention", "joint"),
    ]
    assert [name for name, *_ in layouts.seen] == [x.name for x in session.layers]
    for name, queries, keys, layout in layouts.seen:
        assert (layout.frames, layout.height, layout.width) == (1, 12, 12)
        assert layout.image_q == layout.image_k == slice(0, 144)
        if name.startswith("noise_refiner"):
            assert queries == keys == 160 and layout.text_k is None
        else:
            assert queries == keys == 160 + 32 and layout.text_k == slice(160, 192)


class _Rows(DenoiserWrapper):
    def __init__(self):
        self.seen = []

    def before(self, session, module, args, kwargs):
        self.seen.append((session.step, session.batch, session.rows.cond, session.rows.uncond))
        return args, kwargs


def test_steps_from_t_and_cfg_rows_prompt_first(pipe):
    rows = _Rows()
    with attnctl.control(pipe) as session:
        session.add_wrapper(rows)
        _run(pipe, num_inference_steps=3)
    assert rows.seen == [(step, 2, (0,), (1,)) for step in range(3)]


def test_a_list_prompt_templated_in_place_keeps_its_words(pipe):
    """ZImagePipeline writes the chat-templated text into a list prompt; attnctl keeps the words."""
    maps = []
    for prompt in (PROMPT, [PROMPT]):
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as session:
            _run(pipe, prompt=prompt, num_inference_steps=1)
        maps.append(session.maps["frog"])
    assert torch.equal(maps[0], maps[1])


def test_softpag_folds_into_the_pipelines_guidance(pipe, monkeypatch):
    """The step gets -(c' + w·(c' - u)) with c' folded so that it equals
    -(c + w·(c - u) + s·(c - p)): the pipeline's formula is ε_u + (w + 1)·(ε_c − ε_u)."""
    scale, w = 2.0, tiny_call_kwargs("zimage")["guidance_scale"]
    raw, stepped = [], []

    class _Raw(DenoiserWrapper):  # added after SoftPAG's: sees the rows before they are folded
        def after(self, session, module, output):
            raw.append(torch.stack(output[0]).clone())
            return output

    step = pipe.scheduler.step
    monkeypatch.setattr(
        pipe.scheduler, "step", lambda out, *a, **k: (stepped.append(out.clone()), step(out, *a, **k))[1]
    )
    with attnctl.control(pipe, attnctl.SoftPAG(["layers.0.attention:0"], scale=scale)) as session:
        session.add_wrapper(_Raw())
        _run(pipe, num_inference_steps=1)
    (rows,) = raw
    assert rows.shape[0] == 3  # [prompt's, negative's, perturbed]
    c, u, p = rows[0].float(), rows[1].float(), rows[2].float()
    expected = -(c + w * (c - u) + scale * (c - p)).squeeze(1)
    assert torch.allclose(stepped[0][0], expected, atol=1e-5)
