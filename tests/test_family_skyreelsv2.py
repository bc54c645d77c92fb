"""SkyReels-V2: what the generic family tests (text-to-video) cannot see: the words' positions in the UMT5
ids the pipeline really encodes, structural matching by its own processor, and the diffusion-forcing
pipeline on the same denoiser (a timestep per frame; causal blocks, whose per-pair mask keeps
DraftAttention dense). Its I2V image context: tests/test_family_video.py."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.families.skyreelsv2 import SkyReelsV2Adapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a Cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("skyreelsv2")


class _Calls(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.layer.name, call.key.shape[2], call.layout, call.mask))


def test_text_positions_land_on_the_word_in_the_encoded_ids(pipe):
    with encoder_ids(pipe.text_encoder) as seen:
        kwargs = tiny_call_kwargs("skyreelsv2", num_inference_steps=1, output_type="latent")
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    ids = seen[0]  # the prompt first, then the negative prompt
    adapter = adapter_for(pipe.transformer)
    assert adapter.name == "skyreelsv2"
    for word in ("Cat", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == word


def test_structural_matching_by_its_processor(pipe):
    wrapper = torch.nn.Module()  # another class holding the same blocks
    wrapper.blocks = pipe.transformer.blocks
    adapter = adapter_for(wrapper)
    assert type(adapter) is SkyReelsV2Adapter
    assert [(x.name, x.kind) for x in adapter.layers(wrapper)] == [
        (f"blocks.{i}.attn{j}", kind) for i in (0, 1) for j, kind in ((1, "self"), (2, "cross"))
    ]


def test_diffusion_forcing_with_causal_blocks():
    """SkyReelsV2DiffusionForcingPipeline (synchronous, two causal blocks of 3 latent frames): a
    timestep per frame, a boolean mask per pair of tokens in self-attention. Observing is bit-identical,
    PAG and SoftPAG perturb through the mask, DraftAttention keeps the masked calls dense."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    t2v = tiny_pipeline("skyreelsv2")
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    pipe = SkyReelsV2DiffusionForcingPipeline(**{k: getattr(t2v, k) for k in names})
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("skyreelsv2", num_frames=21, output_type="latent", causal_block_size=3)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames

    base = run()
    calls = _Calls()
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as ctl:
        ctl.add_edit(ctl.select("blocks.0.attn1"), calls)
        out = run()
    assert torch.equal(out, base)
    assert ctl.grid == (6, 2, 2) and ctl.maps["frog"].shape == (6, 2, 2) and ctl.step == 1
    mask = calls.seen[0][3]
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 24, 24) and not mask.all()  # frames 0-2 see 0-2
    for control in (attnctl.PAG(["blocks.0.attn1"], scale=3.0), attnctl.SoftPAG({"blocks.0.attn1": [0]})):
        with attnctl.control(pipe, control):
            out = run()
        assert torch.isfinite(out).all() and not torch.equal(out, base)
    with attnctl.control(pipe, attnctl.DraftAttention(sparsity=0.5, pool=(1, 1), dense_steps=0.0)):
        assert torch.equal(run(), base)
