"""SkyReels-V2: what the generic family tests (text-to-video) cannot see: the words' positions in the UMT5
ids the pipeline really encodes, structural matching by its own processor, I2V's image-context attention
kept as the model made it, and the diffusion-forcing pipeline on the same denoiser (a timestep per
frame; causal blocks, whose per-pair mask keeps DraftAttention dense)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        kwargs = tiny_call_kwargs("skyreelsv2", num_inference_steps=1, output_type="latent")
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        hook.remove()
    ids = seen[0][0].tolist()  # the prompt first, then the negative prompt
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


def test_i2v_image_context_is_kept():
    """attn2 of an I2V model also attends to CLIP image tokens (the context before the last 512), in a
    separate kernel call: controls see the text attention only, and the output stays bit-identical."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=1,
        image_dim=8,
        added_kv_proj_dim=24,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 2, 4, 6),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 512, 16),  # diffusers hard-codes 512 text tokens
        "encoder_hidden_states_image": torch.randn(1, 3, 8),
        "return_dict": False,
    }
    with torch.no_grad():
        base = model(**inputs)[0]
        calls = _Calls()
        with attnctl.control(SimpleNamespace(transformer=model)) as ctl:
            ctl.add_edit(ctl.select("blocks.0.attn2"), calls)
            out = model(**inputs)[0]
    assert torch.equal(base, out)
    assert [(keys, lay.text_k) for _, keys, lay, _ in calls.seen] == [(512, slice(0, 512))]
    lay = calls.seen[0][2]
    assert (lay.frames, lay.height, lay.width) == (2, 2, 3)


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
