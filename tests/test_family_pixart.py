"""PixArt-Σ: what the generic family tests cannot see: the words' positions in the T5 ids the
pipeline really encodes (it lower-cases the prompt), the prompt span, matching by class name, the T5
padding mask through Layout's region prompts, and the CFG rows and scale the pipeline keeps local."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.denoiser import DenoiserWrapper
from attnctl.families import adapter_for
from attnctl.families.pixart import PixArtAdapter
from attnctl.processors.softpag import _cfg_scale
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A Cat and a FROG"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pixart")


def _encoded_ids(pipe, prompt):
    """The T5 input ids of the prompt's conditional row, as the pipeline gives them to its encoder."""
    with encoder_ids(pipe.text_encoder) as seen:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("pixart"))
    return seen[0]  # encode_prompt encodes the prompt first, then the negative


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    adapter = adapter_for(pipe.transformer)
    ids = _encoded_ids(pipe, PROMPT)
    for word in ("cat", "frog", "Frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word.lower()
    second = adapter.text_positions(pipe, "a cat and a cat", "cat", occurrence=1)
    assert second[0] > adapter.text_positions(pipe, "a cat and a cat", "cat")[-1]


def test_prompt_span_is_the_words_then_end_of_text(pipe):
    ids = _encoded_ids(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode([ids[p] for p in words]).strip() == PROMPT.lower()
    assert [ids[p] for p in ends] == [pipe.tokenizer.eos_token_id]
    assert ids[ends[-1] + 1] == pipe.tokenizer.pad_token_id  # padding follows, in neither


def test_matched_by_class_name_only(pipe):
    """AttnProcessor2_0 is also the UNet's processor: PixArt claims no model by its processors."""
    assert isinstance(adapter_for(pipe.transformer), PixArtAdapter)
    assert PixArtAdapter.processors == ()
    assert adapter_for(tiny_pipeline("sd").unet).name == "sd"
    kinds = [(x.name, x.kind) for x in adapter_for(pipe.transformer).layers(pipe.transformer)]
    assert kinds[:2] == [("transformer_blocks.0.attn1", "self"), ("transformer_blocks.0.attn2", "cross")]


def test_layout_region_prompts_keep_the_padding_masked(pipe):
    """Region prompts are appended to the T5 text and kept in `encoder_attention_mask`; the
    unconditional rows still attend to the prompt's tokens only, padding masked, as without Layout."""
    outputs = []

    def record(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    def first_step(*controls):
        outputs.clear()
        hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
        try:
            with attnctl.control(pipe, *controls):
                pipe(PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("pixart"))
        finally:
            hook.remove()
        return outputs[0]

    base = first_step()
    layout = attnctl.Layout(
        [attnctl.Region([0, 0, 0.5, 1], "a cat"), attnctl.Region([0.5, 0, 1, 1], "a frog")]
    )
    regional = first_step(layout)
    assert torch.allclose(regional[0], base[0], atol=1e-5)  # uncond row: the model's own attention
    assert not torch.allclose(regional[1], base[1], atol=1e-3)  # cond row: the boxes act


def test_append_text_extends_the_mask_in_both_forms():
    adapter = PixArtAdapter()
    text, tokens = torch.zeros(2, 5, 4), torch.ones(2, 3, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = adapter.append_text({"encoder_hidden_states": text, "encoder_attention_mask": mask}, tokens)
    assert out["encoder_hidden_states"].shape == (2, 8, 4)
    assert out["encoder_attention_mask"].tolist() == [[1, 1, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1, 1]]
    bias = (1 - mask[:, None].float()) * -10000.0
    out = adapter.append_text({"encoder_hidden_states": text, "encoder_attention_mask": bias}, tokens)
    assert out["encoder_attention_mask"][:, :, 5:].eq(0).all() and out["encoder_attention_mask"].shape == (
        2,
        1,
        8,
    )


def test_cfg_rows_and_scale_come_from_the_call(pipe):
    """The pipeline keeps do_classifier_free_guidance and guidance_scale local: the session reads
    CFG from its encode_prompt call, SoftPAG the scale from the running call."""
    seen = {}

    class Spy(attnctl.AttentionMaps):
        def install(self, session):
            super().install(session)
            session.add_wrapper(_RowSpy(seen))

    for scale, rows, cfg in ((4.5, ((0,), (1,)), 4.5), (1.0, ((), (0,)), None)):
        with attnctl.control(pipe, Spy(["cat"])):
            pipe(PROMPT, **tiny_call_kwargs("pixart", guidance_scale=scale, num_inference_steps=1))
        assert seen["rows"] == rows
        assert seen["cfg_scale"] == cfg  # what SoftPAG / PAG divide their term by


class _RowSpy(DenoiserWrapper):
    def __init__(self, seen):
        self.seen = seen

    def before(self, session, module, args, kwargs):
        self.seen["rows"] = (tuple(session.rows.uncond), tuple(session.rows.cond))
        self.seen["cfg_scale"] = _cfg_scale(session)
        return args, kwargs


def test_pixart_alpha_pipeline_uses_the_same_adapter(pipe):
    """PixArt-α's pipeline (T5 max 120 by default) around the same transformer: observing is exact
    and the words are found as it encodes them."""
    from diffusers import PixArtAlphaPipeline

    names = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
    alpha = PixArtAlphaPipeline(**{n: getattr(pipe, n) for n in names})
    alpha.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("pixart", output_type="latent")
    base = alpha(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    with attnctl.control(alpha, attnctl.AttentionMaps(["frog"])) as ctl:
        out = alpha(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(out, base) and ctl.maps["frog"].sum() > 0
    ids = _encoded_ids(alpha, PROMPT)
    positions = ctl.adapter.text_positions(alpha, PROMPT, "frog")
    assert alpha.tokenizer.decode([ids[p] for p in positions]).strip() == "frog"
