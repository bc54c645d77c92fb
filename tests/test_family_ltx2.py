"""LTX-2 (audio + video): text keys as the pipeline really builds them (the connectors' registers
front-align the prompt; without registers it stays left-padded), prompt spans, which modules are
layers (video queries only), the audio output under added rows, and the pipeline's extra guidance
forwards (STG, modality isolation) as unconditional branches."""

from __future__ import annotations

import copy

import pytest
import torch

import attnctl
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("ltx2")


def _run(pipe, **overrides):
    kwargs = tiny_call_kwargs("ltx2", output_type="latent", **overrides)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)


def _key_ids(pipe, **overrides):
    """(input ids of the conditional row, token id at each of its text keys as the transformer sees
    them). The text encoder's states are replaced by its input ids (channel 0), the connectors'
    blocks by nothing and their input projection by channel 0, so only the connectors' own reordering
    (registers, padding) and their per-row affine norm act on the ids; the norm is undone from the
    first two valid tokens. Keys that hold no token (registers, padding) decode to junk."""
    captured = {}

    def encoder(module, args, kwargs, output):
        captured.setdefault("ids", kwargs["input_ids"][-1].clone())  # the prompt's, then the negative's
        states = torch.zeros(*kwargs["input_ids"].shape, module.config.text_config.hidden_size)
        states[..., 0] = kwargs["input_ids"].float()
        return type(output)(hidden_states=(states,) * (module.config.text_config.num_hidden_layers + 1))

    def transformer(module, args, kwargs):
        captured["keys"] = kwargs["encoder_hidden_states"][-1, :, 0].clone()

    connectors = pipe.connectors
    saved = [
        (c, c.transformer_blocks, c.norm_out)
        for c in (connectors.video_connector, connectors.audio_connector)
    ]
    weight = connectors.text_proj_in.weight.data.clone()
    connectors.text_proj_in.weight.data.zero_()
    connectors.text_proj_in.weight.data[0, 0] = 1.0  # channel 0 of the first layer's states
    hooks = [
        pipe.text_encoder.register_forward_hook(encoder, with_kwargs=True),
        pipe.transformer.register_forward_pre_hook(transformer, with_kwargs=True),
    ]
    try:
        for c, _, _ in saved:
            c.transformer_blocks, c.norm_out = torch.nn.ModuleList(), torch.nn.Identity()
        _run(pipe, num_inference_steps=1, **overrides)
    finally:
        for h in hooks:
            h.remove()
        for c, blocks, out in saved:
            c.transformer_blocks, c.norm_out = blocks, out
        connectors.text_proj_in.weight.data.copy_(weight)
    ids, keys = captured["ids"], captured["keys"]
    valid = ids[ids != pipe.tokenizer.pad_token_id].float()
    at = (keys != 0).nonzero().flatten()[:2]  # the first two valid tokens' keys (padding is zeroed)
    scale = (keys[at[1]] - keys[at[0]]) / (valid[1] - valid[0])
    return ids, torch.round((keys - keys[at[0]]) / scale + valid[0]).long()


def _check(pipe, keys):
    adapter = adapter_for(pipe.transformer)
    positions = adapter.text_positions(pipe, PROMPT, "frog")
    assert pipe.tokenizer.decode(keys[positions]).strip() == "frog"
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.decode(keys[words]).strip() == PROMPT
    assert keys[ends].tolist() == [pipe.tokenizer.bos_token_id]


def test_text_positions_land_on_the_word_with_registers(pipe):
    """LTX-2's connectors (learnable registers): the prompt's tokens from key 0 on, whatever the
    call's `max_sequence_length`."""
    assert pipe.connectors.video_connector.learnable_registers is not None
    ids, keys = _key_ids(pipe)
    valid = ids[ids != pipe.tokenizer.pad_token_id]
    assert torch.equal(keys[: len(valid)], valid)  # front-aligned
    _check(pipe, keys)


def test_text_positions_land_on_the_word_left_padded():
    """Connectors without registers (diffusers' fast tests): the left padding stays, so the keys sit
    after it, at `__call__`'s default length (1024)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    pipe = tiny_pipeline("ltx2")
    config = dict(pipe.connectors.config)
    config.update(video_connector_num_learnable_registers=None, audio_connector_num_learnable_registers=None)
    pipe.register_modules(connectors=LTX2TextConnectors.from_config(config))
    ids, keys = _key_ids(pipe, max_sequence_length=1024)
    assert len(keys) == 1024
    valid = ids[ids != pipe.tokenizer.pad_token_id]
    assert torch.equal(keys[-len(valid) :], valid)
    _check(pipe, keys)


def test_layers_are_the_video_query_modules(pipe):
    with attnctl.control(pipe) as ctl:
        layers = {x.name: x.kind for x in ctl.layers}
    assert layers == {
        f"transformer_blocks.{i}.{m}": k for i in range(2) for m, k in (("attn1", "self"), ("attn2", "cross"))
    }


def test_added_rows_leave_the_audio_output_whole(pipe):
    """SoftPAG appends perturbed rows to the batch; the audio prediction loses them again with the
    video's, so the pipeline's CFG split of the audio still sees [uncond, cond]."""
    base = _run(pipe)
    control = attnctl.SoftPAG({"transformer_blocks.0.attn1": [0]}, u=0.5, scale=3.0)
    with attnctl.control(pipe, control):
        out = _run(pipe)
    assert out.audio.shape == base.audio.shape and torch.isfinite(out.audio).all()
    assert not torch.equal(out.frames, base.frames)


def test_stg_and_modality_forwards_are_unconditional(pipe):
    """LTX2Pipeline's own STG ("uncond_stg") and modality-isolation ("uncond_modality") forwards
    are predictions its formula subtracts: the maps (conditional rows only) do not see them."""
    extra = {"stg_scale": 1.0, "audio_stg_scale": 1.0, "modality_scale": 3.0, "audio_modality_scale": 3.0}
    maps = []
    for kwargs in ({}, {**extra, "spatio_temporal_guidance_blocks": [1]}):
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
            _run(pipe, num_inference_steps=1, **kwargs)
        maps.append(ctl.maps["frog"])
    assert torch.equal(maps[0], maps[1])


def test_a_deep_copied_scheduler_steps_as_before(pipe):
    """LTX2Pipeline deep-copies its scheduler for the audio; the copy must not carry the latent
    guidance's step wrapper (which steps the video scheduler and adds the video's update)."""
    with attnctl.control(pipe, attnctl.AttendAndExcite(["cat", "frog"])):
        twin = copy.deepcopy(pipe.scheduler)
        assert "step" in vars(pipe.scheduler)
        assert twin.step.__func__ is type(twin).step and twin.step.__self__ is twin
    assert "step" not in vars(pipe.scheduler)
