"""Attention Regulation on UNet pipelines: the spec's checks, layouts, dtypes, the plain processor."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.layers import working_layers
from attnctl.families.unet import UNetAdapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _kwargs(**overrides):
    return tiny_call_kwargs("sd", **{"num_inference_steps": 3, "height": 64, "width": 64, **overrides})


def _run(pipe, **overrides):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **_kwargs(**overrides)).images


class _UNetOutputs:
    """Records the UNet's output at every forward (a plain torch forward hook: independent of attnctl)."""

    def __init__(self, unet):
        self.outputs = []
        self.handle = unet.register_forward_hook(
            lambda m, a, k, out: self.outputs.append(out[0].clone()), with_kwargs=True
        )

    def close(self):
        self.handle.remove()


def test_regulation_changes_only_the_conditional_half(pipe):
    rec = _UNetOutputs(pipe.unet)
    try:
        _run(pipe)
        base = rec.outputs[0]
        rec.outputs.clear()
        with attnctl.control(pipe, attnctl.AttentionRegulation(["cat", "frog"])) as ctl:
            _run(pipe)
        edited = rec.outputs[0]
    finally:
        rec.close()
    half = base.shape[0] // 2
    assert torch.equal(edited[:half], base[:half])  # unconditional rows: bit-identical
    assert not torch.allclose(edited[half:], base[half:])  # conditional rows: edited
    entries = ctl.log["AttentionRegulation"]
    assert entries and all(e["best_loss"] <= e["first_loss"] for e in entries)  # keep-best never rises
    assert any(e["best_loss"] < e["first_loss"] for e in entries)  # and the optimisation does something


def test_edited_steps_and_layers(pipe):
    with attnctl.control(pipe, attnctl.AttentionRegulation(["frog"], edit_fraction=0.5)) as ctl:
        _run(pipe, num_inference_steps=4)
        working = {layer.name for layer in working_layers(ctl.layers, *ctl.grid[1:])}
    entries = ctl.log["AttentionRegulation"]
    assert {e["step"] for e in entries} == {0, 1}  # the first half of 4 steps
    assert {e["layer"] for e in entries} == working


def test_targets_mean_attention_moves_towards_goal(pipe):
    """At step 0 (same latent), targets' mean attention moves towards 0.2 and their 90th percentile up."""
    with attnctl.control(pipe) as probe:
        _run(pipe, num_inference_steps=1)
    layers = [layer.name for layer in working_layers(probe.layers, *probe.grid[1:])]

    def maps(*controls):
        with attnctl.control(
            pipe, *controls, attnctl.AttentionMaps(["cat", "frog"], layers=layers, steps=[0])
        ) as ctl:
            _run(pipe, num_inference_steps=2)
        return {w: ctl.maps[w] for w in ("cat", "frog")}

    base = maps()
    edited = maps(attnctl.AttentionRegulation(["cat", "frog"]))
    for word in ("cat", "frog"):
        assert abs(edited[word].mean() - 0.2) < abs(base[word].mean() - 0.2)
        assert edited[word].quantile(0.9) > base[word].quantile(0.9)


def test_combines_with_maps_and_astar(pipe):
    base = _run(pipe)
    with attnctl.control(pipe, attnctl.AttentionRegulation(["cat"])):
        ar = _run(pipe)
    with attnctl.control(pipe, attnctl.AttentionRegulation(["cat"]), attnctl.AttentionMaps(["cat"])) as ctl:
        ar_maps = _run(pipe)
    assert torch.equal(ar, ar_maps) and not torch.equal(ar, base)
    assert ctl.maps["cat"].dim() == 2
    with attnctl.control(pipe, attnctl.AttentionRegulation(["cat"]), attnctl.AStar(["cat", "frog"])) as ctl:
        both = _run(pipe)
    assert torch.isfinite(both).all() and "AStar" in ctl.log and "AttentionRegulation" in ctl.log


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    pipe = tiny_pipeline("sd").to(dtype=dtype)
    with attnctl.control(pipe, attnctl.AttentionRegulation(["cat", "frog"])) as ctl:
        out = _run(pipe, num_inference_steps=2)
    assert torch.isfinite(out.float()).all()
    assert ctl.log["AttentionRegulation"]


def test_plain_processor_matches_the_control(pipe):
    with attnctl.control(pipe, attnctl.AttentionRegulation(["cat", "frog"])):
        via_control = _run(pipe)
    original = dict(pipe.unet.attn_processors)
    proc = attnctl.AttentionRegulationProcessor.for_prompt(
        pipe, PROMPT, ["cat", "frog"], num_steps=3, height=64, width=64
    )
    pipe.unet.set_attn_processor(
        {name: proc if name in proc.layer_names else p for name, p in original.items()}
    )
    try:
        via_processor = _run(pipe)
    finally:
        pipe.unet.set_attn_processor(dict(original))
    assert torch.allclose(via_processor, via_control, atol=1e-6)


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="^targets="):
        attnctl.AttentionRegulation([])
    with pytest.raises(ValueError, match="^edit_fraction=0"):
        attnctl.AttentionRegulation(["cat"], edit_fraction=0)
    with pytest.raises(ValueError, match="^iterations=0"):
        attnctl.AttentionRegulation(["cat"], iterations=0)
    with pytest.raises(ValueError, match="^targets="):
        attnctl.AttentionRegulationProcessor([], [0], num_steps=5)


def _layout_unet(levels: tuple[str, ...], sample_size: int) -> UNet2DConditionModel:
    """A UNet with SD 2 / SDXL block structure and tiny channels (no forward needed for layer sides)."""
    up = tuple(reversed([b.replace("Down", "Up") for b in levels]))
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(8,) * len(levels),
        layers_per_block=1,
        down_block_types=levels,
        up_block_types=up,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def test_a_method_needing_larger_maps_takes_the_next_level_up():
    """SD 1.5 at 128 px: latent/4 is the 4x4 level, too small for Attention Regulation (sides >= 8),
    so it takes the 8x8 level; the maps of the default rule stay at 4x4."""
    layers = UNetAdapter().layers(_layout_unet(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), 16))
    sides = lambda chosen: {-(-16 // layer.downsample) for layer in chosen}  # noqa: E731
    assert sides(working_layers(layers, 16, 16)) == {4}
    assert sides(working_layers(layers, 16, 16, min_side=8)) == {8}
    assert sides(working_layers(layers, 16, 16, min_side=32)) == {16}  # none that large: the finest


@pytest.mark.parametrize(
    "levels, latent, side, blocks",
    [
        # SD 1.x/2.x: cross-attention at 1/1, 1/2, 1/4 (+ mid 1/8); 512 px -> latent 64 -> 16x16 maps
        (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (64, 64), 16, {"down_blocks.2", "up_blocks.1"}),
        (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (96, 96), 24, {"down_blocks.2", "up_blocks.1"}),
        # non-square 512x768: sides follow the shorter side
        (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (64, 96), 16, {"down_blocks.2", "up_blocks.1"}),
        # SDXL at 1024 px: attention only at 1/2 (64) and 1/4 (32, + mid) -> 32
        (
            ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            (128, 128),
            32,
            {"down_blocks.2", "up_blocks.0", "mid_block"},
        ),
        # SD 1.x at 256 px: latent 32 -> latent/4 = 8
        (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (32, 32), 8, {"down_blocks.2", "up_blocks.1"}),
        # the bundled testbed: 16x16 latent, text attention at 8x8 only (no latent/4 level: the one above)
        (("DownBlock2D", "CrossAttnDownBlock2D"), (16, 16), 8, {"down_blocks.1", "up_blocks.0", "mid_block"}),
        # the wave-1 testbed layout (text attention at 16 and 8): 8, not the full-resolution 16
        (("CrossAttnDownBlock2D",) * 2, (16, 16), 8, {"down_blocks.1", "up_blocks.0", "mid_block"}),
    ],
)
def test_working_layers_follow_the_layout(levels, latent, side, blocks):
    unet = _layout_unet(levels, latent[0])
    layers = UNetAdapter().layers(unet)
    chosen = working_layers(layers, *latent)
    assert {layer.block for layer in chosen} == blocks
    assert all(-(-min(latent) // layer.downsample) == side for layer in chosen)


def test_regulation_on_an_sd2_layout_non_square():
    """One UNet forward at an SD-2-like layout, 512x640 px (latent 64x80): the 16x20 maps are edited."""
    pipe = tiny_pipeline("sd")
    pipe.unet = _layout_unet(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), 64)
    pipe._guidance_scale = 7.5  # do_classifier_free_guidance: the batch is [uncond, cond]
    pipe.scheduler.set_timesteps(2)
    seen = {}

    class _Grid(AttentionEdit):
        def observe(self, call):
            seen[call.layer.name] = (call.layout.height, call.layout.width)

    with attnctl.control(pipe, attnctl.AttentionRegulation(["frog"])) as ctl:
        ctl.add_edit([layer for layer in ctl.layers if layer.kind == "cross"], _Grid())
        pipe.encode_prompt(
            PROMPT, "cpu", 1, True
        )  # what the pipeline does first: the session reads the prompt
        with torch.no_grad():
            pipe.unet(
                torch.randn(2, 4, 64, 80),
                pipe.scheduler.timesteps[0],
                encoder_hidden_states=torch.randn(2, 77, 8),
            )
    edited = {e["layer"] for e in ctl.log["AttentionRegulation"]}
    assert edited and all(seen[name] == (16, 20) for name in edited)
    assert {(64, 80), (32, 40), (16, 20), (8, 10)} == set(seen.values())
