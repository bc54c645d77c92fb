"""SoftPAG / PAG: the spec's checks, every family that allows them, and parity with diffusers' PAG pipelines."""

from __future__ import annotations

import json

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import ADAPTERS
from attnctl.tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline


def _run(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    out = pipe(prompt="a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs)
    return (out.frames if hasattr(out, "frames") else out.images).float()


def _self_layers(pipe):
    with attnctl.control(pipe) as ctl:
        return [layer for layer in ctl.layers if layer.kind in ("self", "joint")]


# The tiny families whose adapter does not refuse SoftPAG (Sana's self-attention is linear).
PERTURBABLE_FAMILIES = [
    f for f in FAMILIES if "SoftPAG" not in next((a.refuses for a in ADAPTERS if a.name == f), {})
]


@pytest.mark.parametrize("family", PERTURBABLE_FAMILIES)
def test_softpag_changes_the_image_and_restores(family):
    pipe = tiny_pipeline(family)
    base = _run(pipe, family)
    layer = _self_layers(pipe)[0]
    with attnctl.control(pipe, attnctl.SoftPAG([f"{layer.name}:0"], scale=3.0)):
        guided = _run(pipe, family)
    assert guided.shape == base.shape and not torch.allclose(guided, base, atol=1e-4)
    assert torch.equal(_run(pipe, family), base)  # restored exactly


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "wan"])
def test_u_zero_or_scale_zero_is_the_unguided_run_exactly(family):
    pipe = tiny_pipeline(family)
    base = _run(pipe, family)
    layer = _self_layers(pipe)[0].name
    for control in (attnctl.SoftPAG({layer: [0]}, u=0.0), attnctl.SoftPAG({layer: [0]}, scale=0.0)):
        with attnctl.control(pipe, control):
            assert torch.equal(_run(pipe, family), base)


def _record_outputs(ctl, layer):
    seen = []

    class _Out(AttentionEdit):
        def mix_output(self, call, out):
            seen.append((out.detach().clone(), call.value.detach().clone(), call.rows))
            return out

    ctl.add_edit([layer], _Out())
    return seen


@pytest.mark.parametrize("u", [1.0, 0.5])
def test_selected_heads_of_the_perturbed_rows_only(u):
    """u = 1 on a head gives that head's output V; other heads and rows are bit-identical to the
    unperturbed attention of the same call."""
    pipe = tiny_pipeline("sd")
    layer = [x for x in _self_layers(pipe) if x.block == "mid_block"][0]
    with attnctl.control(pipe, attnctl.SoftPAG({layer.name: [1]}, u=u, batch="auto")) as ctl:
        seen = _record_outputs(ctl, layer)
        _run(pipe, "sd", num_inference_steps=1)
    out, value, rows = seen[0]
    assert rows.uncond == (0,) and rows.cond == (1,) and rows.perturbed == (2,)
    q_rows = out[[0, 1]]
    # the perturbed row's input equals the conditional row's, so its unperturbed output is row 1's
    torch.testing.assert_close(out[2, [0]], q_rows[1, [0]], rtol=0, atol=1e-6)
    if u == 1.0:
        assert torch.equal(out[2, 1], value[2, 1])
    else:
        torch.testing.assert_close(out[2, 1], 0.5 * q_rows[1, 1] + 0.5 * value[2, 1], rtol=0, atol=1e-6)


def test_three_branch_batch_equals_separate_forwards():
    pipe = tiny_pipeline("sd")
    layer = [x.name for x in _self_layers(pipe) if x.block == "mid_block"]
    images = {}
    for mode in ("auto", "split"):
        with attnctl.control(pipe, attnctl.PAG(layer, batch=mode)):
            images[mode] = _run(pipe, "sd", num_inference_steps=3)
    torch.testing.assert_close(images["auto"], images["split"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "split"])
def test_unconditional_rows_are_untouched(mode):
    pipe = tiny_pipeline("sd")
    layer = [x.name for x in _self_layers(pipe) if x.block == "mid_block"]
    outs = {}
    for key, controls in (("base", ()), ("pag", (attnctl.PAG(layer, batch=mode),))):
        seen = outs.setdefault(key, [])

        def hook(module, args, kwargs, output, seen=seen):
            if output[0].shape[0] == 2:  # the [uncond, cond] call, not split mode's perturbed forward
                seen.append(output[0][0].detach().clone())

        handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
        with attnctl.control(pipe, *controls):
            _run(pipe, "sd", num_inference_steps=1)
        handle.remove()
    assert torch.equal(outs["base"][0], outs["pag"][0])  # the uncond row of the first step


def _diffusers_pag(pipe, cls, layers, **kwargs):
    return cls.from_pipe(pipe, pag_applied_layers=layers)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize(
    "family, cls_name", [("sd", "StableDiffusionPAGPipeline"), ("sdxl", "StableDiffusionXLPAGPipeline")]
)
def test_pag_equals_diffusers_pag_pipeline(family, cls_name, guidance):
    import diffusers

    pipe = tiny_pipeline(family)
    kwargs = tiny_call_kwargs(family, guidance_scale=guidance, num_inference_steps=3)
    theirs_pipe = getattr(diffusers, cls_name).from_pipe(pipe, pag_applied_layers=["mid"])
    theirs = theirs_pipe(
        "a cat and a frog", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **kwargs
    ).images
    with attnctl.control(pipe, attnctl.PAG(["mid_block"], scale=3.0)):
        ours = pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pag_image_scope_equals_diffusers_sd3_pag(guidance):
    from diffusers import StableDiffusion3PAGPipeline

    pipe = tiny_pipeline("sd3")
    kwargs = tiny_call_kwargs("sd3", guidance_scale=guidance, num_inference_steps=3)
    theirs_pipe = StableDiffusion3PAGPipeline.from_pipe(pipe, pag_applied_layers=["blocks.1"])
    theirs = theirs_pipe(
        "a cat and a frog", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **kwargs
    ).images
    with attnctl.control(pipe, attnctl.PAG(["transformer_blocks.1"], scale=3.0, scope="image")):
        ours = pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "family, control",
    [
        ("sd3", attnctl.PAG(["transformer_blocks.1"], scope="image")),
        ("sd3", attnctl.SoftPAG(["transformer_blocks.0.attn:1"], scope="image")),
        ("flux", attnctl.PAG(["single_transformer_blocks.0"], scope="image")),
        ("sd", attnctl.SoftPAG(["mid_block.attentions.0.transformer_blocks.0.attn1:0"])),
    ],
)
def test_the_short_way_is_taken_only_where_it_gives_the_long_ways_bits(family, control, monkeypatch):
    """The perturbed part computed alone (and, at the first perturbed layer, the unperturbed part
    taken from the conditional rows it still copies) gives the bits of the model's kernel on every
    row with the perturbed part overwritten; a shape where it would not takes the long way."""
    from attnctl.processors import softpag
    from attnctl.processors.softpag import _PerturbHeads

    pipe = tiny_pipeline(family)
    monkeypatch.setattr(softpag, "_SAME_BITS", {})
    with attnctl.control(pipe, control):
        short = _run(pipe, family)
    assert softpag._SAME_BITS and all(softpag._SAME_BITS.values())  # the short way, taken
    monkeypatch.setattr(
        _PerturbHeads,
        "_short",
        lambda self, call, first, heads, scope, *_: self._whole(call, first, heads, scope),
    )
    with attnctl.control(pipe, control):
        whole = _run(pipe, family)
    assert torch.equal(short, whole)
    monkeypatch.undo()
    short_way = _PerturbHeads._short  # a short way that does differ: found at the first call, not taken
    monkeypatch.setattr(_PerturbHeads, "_short", lambda *args: short_way(*args) + 1e-3)
    monkeypatch.setattr(softpag, "_SAME_BITS", {})
    with attnctl.control(pipe, control):
        assert torch.equal(_run(pipe, family), whole)


def test_adaptive_scale_matches_diffusers():
    from diffusers import StableDiffusionPAGPipeline

    pipe = tiny_pipeline("sd")
    kwargs = tiny_call_kwargs("sd", num_inference_steps=4)
    theirs = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])(
        "a cat", generator=torch.Generator().manual_seed(0), pag_scale=3.0, pag_adaptive_scale=0.005, **kwargs
    ).images
    with attnctl.control(pipe, attnctl.PAG(["mid_block"], scale=3.0, adaptive_scale=0.005)):
        ours = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_composes_with_maps_regulation_and_draft():
    pipe = tiny_pipeline("sd")
    layer = [x.name for x in _self_layers(pipe) if x.block == "mid_block"]
    with attnctl.control(
        pipe,
        attnctl.SoftPAG({layer[0]: [0, 1]}, u=0.7),
        attnctl.AttentionRegulation(["frog"]),
        attnctl.AttentionMaps(["frog"]),
    ) as ctl:
        _run(pipe, "sd")
    assert ctl.maps["frog"].isfinite().all() and ctl.log["AttentionRegulation"]

    wan = tiny_pipeline("wan")
    kwargs = {"height": 128, "width": 128, "num_frames": 5, "num_inference_steps": 2}
    name = _self_layers(wan)[-1].name
    with attnctl.control(wan, attnctl.DraftAttention(0.5, pool=(2, 2), dense_steps=0.0, dense_blocks=())):
        draft_only = _run(wan, "wan", **kwargs)
    with attnctl.control(
        wan,
        attnctl.DraftAttention(0.5, pool=(2, 2), dense_steps=0.0, dense_blocks=()),
        attnctl.SoftPAG({name: [0]}),
    ) as ctl:
        seen = _record_outputs(ctl, [x for x in ctl.layers if x.name == name][0])
        both = _run(wan, "wan", **kwargs)
    assert not torch.allclose(both, draft_only, atol=1e-4)
    assert any(rows.perturbed for _, _, rows in seen)


def test_json_round_trip_and_validation(tmp_path):
    for control in (
        attnctl.SoftPAG({"mid_block": [0, 2]}, u=0.5, target="uniform"),
        attnctl.SoftPAG(["mid_block.attentions.0.transformer_blocks.0.attn1:1"], scope="image"),
        attnctl.PAG(["mid_block", 3], adaptive_scale=0.01, batch="split"),
    ):
        assert attnctl.Control.from_dict(json.loads(json.dumps(control.to_dict()))) == control
    result = tmp_path / "heads.json"
    result.write_text(json.dumps({"selected": ["a.attn1:3", "b.attn1:0", "a.attn1:1"]}))
    assert attnctl.SoftPAG(str(result), top=2).head_map() == {"a.attn1": [3], "b.attn1": [0]}
    bad = [
        (dict(heads=[]), "heads"),
        (dict(heads=["mid_block"]), "layer path:head"),
        (dict(heads={"mid_block": [-1]}), "heads"),
        (dict(heads=str(tmp_path / "missing.json")), "existing"),
        (dict(heads={"mid_block": [0]}, u=1.5), "u=1.5"),
        (dict(heads={"mid_block": [0]}, target="seg"), "target"),
        (dict(heads={"mid_block": [0]}, scope="text"), "scope"),
        (dict(heads={"mid_block": [0]}, batch="never"), "batch"),
        (dict(heads={"mid_block": [0]}, top=2), "top"),
        (dict(heads=str(result), top=4), "at most the 3 heads"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            attnctl.SoftPAG(**kwargs)
    with pytest.raises(ValueError, match="layers"):
        attnctl.PAG([])
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="head indices below"):
        with attnctl.control(pipe, attnctl.SoftPAG({"mid_block": [99]})):
            pass


def test_unreadable_or_damaged_result_files_are_one_error_naming_heads(tmp_path):
    files = {
        "/proc/self/mem": "Input/output error",  # a file that cannot be read (was an OSError)
    }
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b"\xff\xfe{}")
    files[str(latin1)] = "not UTF-8 text"
    deep = tmp_path / "deep.json"
    deep.write_text('{"selected": ' + "[" * 100_000 + "]" * 100_000 + "}")
    files[str(deep)] = "nested too deeply"
    for path, reason in files.items():
        with pytest.raises(
            ValueError, match=r"^heads=.* is not allowed: a JSON file with a 'selected' list"
        ) as err:
            attnctl.SoftPAG(path)
        assert reason in str(err.value) and "codec" not in str(err.value), str(err.value)
    superscript = tmp_path / "superscript.json"
    superscript.write_text(json.dumps({"selected": ["mid_block.attentions.0.transformer_blocks.0.attn1:²"]}))
    with pytest.raises(ValueError, match="^heads="):  # '²'.isdigit() but no int (was int()'s error)
        attnctl.SoftPAG(str(superscript))
    with pytest.raises(ValueError, match="^heads="):
        attnctl.SoftPAG(["mid_block.attentions.0.transformer_blocks.0.attn1:²"])


def test_heads_of_a_layer_the_model_lacks_name_heads():
    with pytest.raises(
        ValueError, match=r"^SoftPAG heads of 'nope': layers=\['nope'\] is not allowed"
    ) as err:
        with attnctl.control(tiny_pipeline("sd"), attnctl.SoftPAG({"nope": [0]})):
            pass
    assert "\n" not in str(err.value)


def test_bench_pag_reports_paired_ratios(tmp_path):
    from attnctl.bench.pag import run_pag

    report = run_pag(("sd3",), samples=1, json_out=tmp_path / "pag.json", log=None)
    row = report["sd3"]
    assert row["perturbed_layers"] and row["cfg_seconds"] > 0 and row["ratio_median"] > 0
    assert json.loads((tmp_path / "pag.json").read_text())["sd3"]["ratios"] == row["ratios"]
    with pytest.raises(ValueError, match="models"):
        run_pag(("sdxl",))


def test_bench_pag_against_diffusers_times_the_same_guidance(tmp_path):
    from attnctl.bench.pag import run_pag

    report = run_pag(
        ("sd3",), samples=2, steps=1, against="diffusers", json_out=tmp_path / "p.json", log=None
    )
    row = report["sd3"]
    assert row["diffusers_pipeline"] == "StableDiffusion3PAGPipeline" and row["attnctl"]["scope"] == "image"
    assert row["max_abs_diff"] < 1e-4 and len(row["ratios"]) == 2 and row["attnctl_seconds"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["config"]["against"] == "diffusers"
    with pytest.raises(ValueError, match="models"):
        run_pag(("testbed",), against="diffusers")
    with pytest.raises(ValueError, match="against"):
        run_pag(against="comfy")
    with pytest.raises(ValueError, match="size"):
        run_pag(("sd3",), size=64)  # a size only for the diffusers comparison


@pytest.mark.parametrize("guide", ["AStar", "AttendAndExcite"])
def test_composes_with_latent_guidance(guide):
    """Latent guidance runs its own gradient forward inside the guided call; the perturbed branch
    stays out of it and is still folded out of the call around it."""
    pipe = tiny_pipeline("sd")
    kwargs = {"num_inference_steps": 3}
    with attnctl.control(pipe, getattr(attnctl, guide)(["cat", "frog"])):
        guided = _run(pipe, "sd", **kwargs)
    for order in ("pag_first", "guide_first"):
        controls = [attnctl.PAG(["mid_block"]), getattr(attnctl, guide)(["cat", "frog"])]
        with attnctl.control(pipe, *(controls if order == "pag_first" else controls[::-1])) as ctl:
            both = _run(pipe, "sd", **kwargs)
        assert both.shape == guided.shape and not torch.allclose(both, guided, atol=1e-4)
        assert ctl.log[guide]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_softpag_and_pag_together_perturb_the_union_in_one_branch(family):
    """One perturbed branch: PAG's layers (every head) and SoftPAG's heads, as one SoftPAG of them all."""
    pipe = tiny_pipeline(family)
    with attnctl.control(pipe) as probe:
        first, second = [x for x in probe.layers if x.kind in ("self", "joint")][:2]
    kwargs = tiny_call_kwargs(family)

    def run(*controls):
        with attnctl.control(pipe, *controls):
            return pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).images

    both = run(attnctl.PAG([first.name]), attnctl.SoftPAG({second.name: [1]}))
    union = run(attnctl.SoftPAG({first.name: list(range(first.heads)), second.name: [1]}))
    assert torch.allclose(both, union, atol=1e-6)
    assert not torch.equal(both, run(attnctl.PAG([first.name])))
    with pytest.raises(ValueError, match="share one perturbed branch"):
        run(attnctl.PAG([first.name], scale=2.0), attnctl.SoftPAG({second.name: [1]}))
