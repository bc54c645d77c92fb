"""Wan VACE: what the generic family tests cannot see: the words' positions in the UMT5 ids the pipeline
really encodes, the control branch (`vace_blocks`) left out of the layers and untouched by controls, a
re-wrapped VACE transformer matched by its processors, reference-image frames in the grid, and Wan 2.2's
two experts (`transformer`, `transformer_2`) both controlled."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.processor import AttnctlProcessor
from attnctl.families import adapter_for
from attnctl.families.wan import WanAdapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a Cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("wanvace")


def _run(pipe, **overrides):
    kwargs = tiny_call_kwargs("wanvace", **{"output_type": "latent", **overrides})
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames


class _Calls(AttentionEdit):
    def __init__(self, state=None):
        self.seen, self.state = [], state or {}

    def observe(self, call):
        self.seen.append((call.layer.name, call.session.step, call.layout, dict(self.state)))


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, num_inference_steps=1)
    ids = seen[0]  # the prompt first, then the negative prompt
    adapter = adapter_for(pipe.transformer)
    assert adapter.name == "wanvace"
    for word in ("Cat", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word


def test_control_blocks_are_no_layers_and_run_as_the_model_made_them(pipe):
    vace = [n for n in pipe.transformer.attn_processors if n.startswith("vace_blocks.")]
    assert len(vace) == 4  # two control blocks, attn1 and attn2 each
    calls = _Calls()
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        assert not any(x.name.startswith("vace_blocks.") for x in ctl.layers)
        assert [x.name for x in ctl.layers] == [f"blocks.{i}.attn{j}" for i in (0, 1) for j in (1, 2)]
        for name in vace:  # the control branch keeps the model's own processor
            module = pipe.transformer.get_submodule(name.removesuffix(".processor"))
            assert not isinstance(module.processor, AttnctlProcessor)
        ctl.add_edit(ctl.layers, calls)
        _run(pipe, num_inference_steps=1)
    # two forwards (cond, uncond) x four main-block layers; every query of every call is a video token
    assert len(calls.seen) == 8
    assert all(lay.image_q == slice(0, 8) and lay.image_tokens == 8 for _, _, lay, _ in calls.seen)


def _vace_and_main_outputs(pipe, *controls):
    """Outputs of the first forward's control-branch and main self-attentions (the control blocks run
    before the main blocks, so their inputs are the same with any control)."""
    out, hooks = {}, []
    for name in ("vace_blocks.0.attn1", "vace_blocks.1.attn1", "blocks.0.attn1"):
        module = pipe.transformer.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, a, o, name=name: _keep_first(out, name, o)))
    try:
        with attnctl.control(pipe, *controls):
            _run(pipe, num_inference_steps=1, height=64, width=64)  # 2 x 4 x 4 video tokens
    finally:
        for h in hooks:
            h.remove()
    return out


def _keep_first(out, name, output):
    if name not in out:
        out[name] = output.clone()


def test_perturbation_and_sparse_attention_leave_the_control_branch_dense(pipe):
    base = _vace_and_main_outputs(pipe)
    for control in (
        attnctl.PAG(["blocks.0.attn1"], scale=3.0),
        attnctl.DraftAttention(sparsity=0.5, pool=(1, 1), dense_steps=0.0, dense_blocks=()),
    ):
        got = _vace_and_main_outputs(pipe, control)
        name = type(control).__name__
        for row in got["vace_blocks.0.attn1"]:  # PAG: [cond, perturbed]; DraftAttention: [cond]
            assert torch.allclose(row, base["vace_blocks.0.attn1"][0], atol=1e-6), name
        for row in got["vace_blocks.1.attn1"]:
            assert torch.allclose(row, base["vace_blocks.1.attn1"][0], atol=1e-6), name
        # the last row: PAG's perturbed one, DraftAttention's sparse one
        assert (got["blocks.0.attn1"][-1] - base["blocks.0.attn1"][0]).abs().max() > 1e-3, name


def test_a_rewrapped_vace_transformer_gets_the_same_layers(pipe):
    """Matched by its processors (another class holding the same blocks), a VACE transformer gets the
    Wan adapter, which leaves the control branch out as the VACE declaration does."""
    wrapper = torch.nn.Module()
    wrapper.blocks, wrapper.vace_blocks = pipe.transformer.blocks, pipe.transformer.vace_blocks
    adapter = adapter_for(wrapper)
    assert type(adapter) is WanAdapter
    layers = [x.name for x in adapter.layers(wrapper)]
    assert layers == [x.name for x in adapter_for(pipe.transformer).layers(pipe.transformer)]
    assert not any(name.startswith("vace_blocks.") for name in layers)


def test_reference_image_frames_are_frames_of_the_grid(pipe):
    image = PIL.Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    base = _run(pipe, reference_images=[image])
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        out = _run(pipe, reference_images=[image])
        grid = ctl.grid
    assert torch.equal(out, base)
    # 5 frames -> 2 latent frames, and the reference image's latent frame in front of them
    assert grid == (3, 2, 2) and ctl.maps["frog"].shape == (3, 2, 2)
