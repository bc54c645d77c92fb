"""Layout (regional prompts and AnyMS subjects): the spec's checks on tiny SD / SDXL / SD3 / FLUX
pipelines, a tiny IP-Adapter, composition with maps, A-STAR and Attention Regulation, restore."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.controls import Control
from attnctl.families.base import sdpa
from attnctl.processors.layout_math import box_cells, owners, pixel_masks
from attnctl.tiny import add_tiny_ip_adapter, tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def _regions(**options):
    return [attnctl.Region(LEFT, "a cat", **options), attnctl.Region(RIGHT, "a frog")]


def _run(pipe, family, prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def family_pipe(request):
    return request.param, tiny_pipeline(request.param)


class _Outputs(AttentionEdit):
    """Test-only: the attention output of each layer at each step, after the other edits (the
    step's first call of the layer), as calls[(layer name, step)] = (call, output)."""

    def __init__(self):
        self.calls = {}

    def mix_output(self, call, out):
        self.calls.setdefault((call.layer.name, call.session.step), (call, out.detach().clone()))
        return out


def _first_call(pipe, family, controls, layer_kind="cross", **overrides):
    """(call, output) of the first text-attending layer at step 0."""
    probe = _Outputs()
    with attnctl.control(pipe, *controls) as ctl:
        first = next(layer for layer in ctl.layers if layer.kind in ("cross", "joint"))
        ctl.add_edit([first], probe)
        _run(pipe, family, **overrides)
    return probe.calls[(first.name, 0)]


# ---- the controls are data ----------------------------------------------------------------------
def test_layout_round_trips_through_json():
    layout = attnctl.Layout(
        [attnctl.Region(LEFT, "a cat", priority=2, scale=0.5), {"box": [0.5, 0, 1, 1], "prompt": "a frog"}],
        base_prompt_weight=0.2,
        layers=["up_blocks.0", 3],
        steps=[0, 1],
        base_outside="other_regions",
    )
    assert isinstance(layout.regions[1], attnctl.Region) and layout.regions[1].box == (0.5, 0.0, 1.0, 1.0)
    data = json.loads(json.dumps(layout.to_dict()))
    assert data == layout.to_dict() and data["regions"][0]["box"] == [0.0, 0.0, 0.5, 1.0]
    assert Control.from_dict(data) == layout


@pytest.mark.parametrize(
    "box, message",
    [
        ((0.5, 0.0, 0.2, 1.0), "x0 < x1 fails"),
        ((0.0, 0.6, 1.0, 0.6), "y0 < y1 fails"),
        ((-0.1, 0.0, 1.0, 1.0), "outside [0, 1]"),
        ((0.0, 0.0, 1.0, 1.5), "outside [0, 1]"),
        ((0.0, 0.0, 1.0), "0 <= x0 < x1 <= 1"),
        ("0,0,1,1", "0 <= x0 < x1 <= 1"),
        ((0, 0, 10**400, 1), "0 <= x0 < x1 <= 1"),  # an int past any float: no OverflowError
        ((0, 0, float("nan"), 1), "0 <= x0 < x1 <= 1"),
    ],
)
def test_bad_boxes_name_the_value(box, message):
    with pytest.raises(ValueError, match="box=") as info:
        attnctl.Region(box, "a cat")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_region_and_layout_validation():
    with pytest.raises(ValueError, match="a prompt, an image, or both"):
        attnctl.Region(LEFT)
    with pytest.raises(ValueError, match="image="):
        attnctl.Region(LEFT, image="no/such/file.png")
    with pytest.raises(ValueError, match="scale="):
        attnctl.Region(LEFT, "a cat", scale=-1)
    with pytest.raises(ValueError, match="regions="):
        attnctl.Layout([])
    with pytest.raises(ValueError, match="mode="):
        attnctl.Layout(_regions(), mode="sum")
    with pytest.raises(ValueError, match="base_outside="):
        attnctl.Layout(_regions(), mode="mask_and_sum", base_outside="other_regions")
    with pytest.raises(ValueError, match="sub_prompts="):
        attnctl.Layout(_regions(), sub_prompts=False, base_outside="all")
    with pytest.raises(ValueError, match="base_prompt_weight="):
        attnctl.Layout(_regions(), base_prompt_weight=1.5)
    with pytest.raises(ValueError, match="Layout does not work on WanTransformer3DModel"):
        with attnctl.control(tiny_pipeline("wan"), attnctl.Layout(_regions())):
            pass


@pytest.mark.parametrize(
    "region, message",
    [
        ({"prompt": "a cat"}, r"^box=None is not allowed: a region's box"),
        (
            {"box": [0, 0, 1, 1], "prompt": "a cat", "bogus": 1},
            r"^a region has no field 'bogus'; its fields: box",
        ),
    ],
)
def test_region_dicts_missing_or_unknown_keys_name_them(region, message):
    with pytest.raises(ValueError, match=message):
        attnctl.Layout([region])
    with pytest.raises(ValueError, match=message):  # the same words from JSON, no TypeError's
        Control.list_from_json(json.dumps([{"kind": "Layout", "regions": [region]}]))


def test_two_layouts_in_one_control_are_refused(sd):
    layout = attnctl.Layout(_regions())
    with pytest.raises(ValueError, match=r"^2 Layouts in one control\(\) are not allowed: one Layout"):
        with attnctl.control(sd, layout, attnctl.Layout(_regions())):
            pass


# ---- regional prompts -------------------------------------------------------------------------
def test_every_family_runs_and_changes_the_image(family_pipe):
    family, pipe = family_pipe
    base = _run(pipe, family)
    for options in (
        {},
        {"mode": "mask_and_sum"},
        {"base_outside": "other_regions"},
        {"base_prompt_weight": 0.5},
    ):
        with attnctl.control(pipe, attnctl.Layout(_regions(), **options)):
            out = _run(pipe, family)
        assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4), options


def test_a_layout_that_never_acts_is_the_plain_model(family_pipe):
    """At a step the layout does not act on, region tokens are in the text but no query sees them:
    the latent after that step is the plain model's."""
    family, pipe = family_pipe

    def first_latent(*controls):
        seen = []

        def keep(p, step, t, kwargs):
            seen.append(kwargs["latents"].clone())
            return kwargs

        with attnctl.control(pipe, *controls):
            _run(pipe, family, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        return seen[0]

    base = first_latent()
    out = first_latent(attnctl.Layout(_regions(), steps=[1], prompt_fraction=1.0))  # the second step only
    assert (out - base).abs().max() <= 1e-5


def test_one_box_over_the_whole_image_is_plain_cross_attention(sd):
    """In its box a region's text stream replaces the prompt's: one box over the whole image, held
    at every step, with the region prompt's whole encoding, is the plain pipeline on that prompt
    (the unconditional rows see their own prompt only, as in the plain pipeline)."""
    region = attnctl.Region((0.0, 0.0, 1.0, 1.0), "a frog")
    with attnctl.control(sd, attnctl.Layout([region], region_tokens="all", prompt_fraction=1.0)):
        out = _run(sd, "sd", "the cat")
    assert (out - _run(sd, "sd", "a frog")).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_outside_every_box_region_prompts_contribute_exactly_zero(family):
    pipe = tiny_pipeline(family)
    regions = [attnctl.Region((0.0, 0.0, 0.5, 0.5), "a cat")]
    # region_tokens="all": both region prompts bring the same number of tokens, so the two calls'
    # joint sequences line up position by position
    call, a = _first_call(pipe, family, [attnctl.Layout(regions, base_outside="all", region_tokens="all")])
    _, b = _first_call(
        pipe,
        family,
        [
            attnctl.Layout(
                [attnctl.Region((0.0, 0.0, 0.5, 0.5), "a green frog")],
                base_outside="all",
                region_tokens="all",
            )
        ],
    )
    lay = call.layout
    cells = box_cells(regions[0].box, lay.height, lay.width)
    image = torch.arange(lay.image_q.start, lay.image_q.stop)
    cond = list(call.rows.cond)
    outside, inside = image[~cells], image[cells]
    assert torch.equal(a[cond][:, :, outside], b[cond][:, :, outside])
    assert not torch.allclose(a[cond][:, :, inside], b[cond][:, :, inside])


def test_unconditional_rows_are_untouched(sd):
    _, base = _first_call(sd, "sd", [attnctl.AttentionMaps(["cat"])])
    call, out = _first_call(sd, "sd", [attnctl.Layout(_regions(), base_outside="all")])
    uncond = list(call.rows.uncond)
    assert uncond and torch.equal(out[uncond], base[uncond])


def test_priority_decides_the_overlap(sd):
    # no word in common: each region's own words of the prompt are the same alone or together
    wide = attnctl.Region((0.0, 0.0, 0.75, 1.0), "cat", priority=1)
    narrow = attnctl.Region((0.25, 0.0, 1.0, 1.0), "frog")
    call, both = _first_call(sd, "sd", [attnctl.Layout([wide, narrow], base_outside="all")])
    _, wide_only = _first_call(sd, "sd", [attnctl.Layout([wide], base_outside="all")])
    _, narrow_only = _first_call(sd, "sd", [attnctl.Layout([narrow], base_outside="all")])
    lay = call.layout
    overlap = box_cells(wide.box, lay.height, lay.width) & box_cells(narrow.box, lay.height, lay.width)
    right = box_cells(narrow.box, lay.height, lay.width) & ~overlap
    cond = list(call.rows.cond)
    assert overlap.any() and right.any()
    assert torch.allclose(both[cond][:, :, overlap], wide_only[cond][:, :, overlap], atol=1e-6)
    assert torch.allclose(both[cond][:, :, right], narrow_only[cond][:, :, right], atol=1e-6)
    # the other priority flips the overlap
    _, flipped = _first_call(
        sd, "sd", [attnctl.Layout([attnctl.Region(wide.box, "cat"), narrow], base_outside="all")]
    )
    assert torch.allclose(flipped[cond][:, :, overlap], narrow_only[cond][:, :, overlap], atol=1e-6)


def test_base_prompt_weight_interpolates_towards_the_plain_attention(sd):
    call, regional = _first_call(sd, "sd", [attnctl.Layout(_regions())])
    _, half = _first_call(sd, "sd", [attnctl.Layout(_regions(), base_prompt_weight=0.5)])
    _, plain = _first_call(sd, "sd", [attnctl.Layout(_regions(), steps=[1])])  # not at step 0
    cond = list(call.rows.cond)
    assert torch.allclose(half[cond], 0.5 * (regional[cond] + plain[cond]), atol=1e-6)


def test_only_the_chosen_layers_act(sd):
    with attnctl.control(sd) as probe:
        cross = [layer.name for layer in probe.layers if layer.kind == "cross"]
    chosen = cross[:1]
    outputs = _Outputs()
    plain_outputs = _Outputs()
    for probe_edit, steps in ((outputs, None), (plain_outputs, [1])):  # the calls kept are step 0's
        with attnctl.control(sd, attnctl.Layout(_regions(), layers=chosen, steps=steps)) as ctl:
            ctl.add_edit([layer for layer in ctl.layers if layer.name in cross[:2]], probe_edit)
            _run(sd, "sd")
    cond = list(outputs.calls[(cross[0], 0)][0].rows.cond)
    assert not torch.allclose(
        outputs.calls[(cross[0], 0)][1][cond], plain_outputs.calls[(cross[0], 0)][1][cond]
    )
    # the second layer sees other hidden states, so compare it with its own plain computation
    call, out = outputs.calls[(cross[1], 0)]
    n_base = sd.tokenizer.model_max_length  # the prompt's 77 CLIP tokens, then the regions' own
    prompt_only = sdpa(call.query, call.key[:, :, :n_base], call.value[:, :, :n_base], None, None)
    assert torch.allclose(out, prompt_only, atol=1e-6)


def test_region_prompts_bring_their_own_tokens_only(family_pipe):
    """region_tokens="words": the text keys are the prompt's, then each region prompt's word tokens;
    "span": its start, word and end tokens (prompt_span), without its padding; "all": its whole
    padded encoding."""
    family, pipe = family_pipe
    lengths = {}
    for mode in ("words", "span", "all"):
        call, _ = _first_call(pipe, family, [attnctl.Layout(_regions(), region_tokens=mode)])
        lengths[mode] = call.layout.text_k.stop - call.layout.text_k.start
    plain, _ = _first_call(pipe, family, [])
    base = plain.layout.text_k.stop - plain.layout.text_k.start
    spans = [plain.session.adapter.prompt_span(pipe, r.prompt) for r in _regions()]
    assert lengths["words"] == base + sum(len(w) for w, _ in spans)
    assert lengths["span"] == base + sum(len({*w, *e}) for w, e in spans)
    assert lengths["words"] < lengths["span"] < lengths["all"]
    if family in ("sd", "sdxl"):  # CLIP pads every prompt to 77 (SD3/FLUX's T5 to its own default)
        assert lengths["all"] == 3 * base


def test_hidden_words_make_maps_zero_outside_their_box(family_pipe):
    family, pipe = family_pipe
    layout = attnctl.Layout(_regions(), base_outside="other_regions", prompt_fraction=1.0)  # at every step
    with attnctl.control(pipe, layout, attnctl.AttentionMaps(["cat", "frog"])) as ctl:
        _run(pipe, family)
        grids = ctl.maps.grids("cat")
    for grid in grids:
        cat, frog = ctl.maps.at("cat", grid), ctl.maps.at("frog", grid)
        left = box_cells(LEFT, *grid[1:]).view(grid[1:])
        assert cat[~left].abs().max() == 0 and cat[left].min() > 0
        assert frog[left].abs().max() == 0 and frog[~left].min() > 0


def test_maps_record_the_regional_attention(sd):
    """Maps of the prompt's words follow the regional softmax: in its box "cat" shares the text
    attention with its region's tokens only (no start, end or other words), so its map there is
    above the plain one; outside its box it is hidden, so its map is zero: the maps show the box."""
    with attnctl.control(sd, attnctl.AttentionMaps(["cat"], steps=[0])) as plain:
        _run(sd, "sd")
    with attnctl.control(sd, attnctl.Layout(_regions()), attnctl.AttentionMaps(["cat"], steps=[0])) as ctl:
        _run(sd, "sd")
    for grid in ctl.maps.grids("cat"):
        left = box_cells(LEFT, *grid[1:]).view(grid[1:])
        cat = ctl.maps.at("cat", grid)
        assert (cat[left] > plain.maps.at("cat", grid)[left]).all() and cat[~left].abs().max() == 0


def test_hiding_words_without_sub_prompts(family_pipe):
    family, pipe = family_pipe
    layout = attnctl.Layout(_regions(), base_outside="other_regions", sub_prompts=False, prompt_fraction=1.0)
    with attnctl.control(pipe, layout, attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(pipe, family)
        text_len = ctl.text_len
    assert torch.isfinite(out).all()
    with attnctl.control(pipe) as plain:
        _run(pipe, family)
    assert text_len == plain.text_len  # no tokens appended
    grid = ctl.maps.grids("cat")[0]
    assert ctl.maps.at("cat", grid)[~box_cells(LEFT, *grid[1:]).view(grid[1:])].abs().max() == 0


def test_composes_with_regulation_and_astar(sd):
    layout = attnctl.Layout(_regions(), base_outside="all")
    with attnctl.control(sd, layout):
        alone = _run(sd, "sd")
    with attnctl.control(sd, layout, attnctl.AttentionRegulation(["cat", "frog"])) as ctl:
        with_ar = _run(sd, "sd")
    assert ctl.log["AttentionRegulation"] and not torch.allclose(with_ar, alone)
    with attnctl.control(sd, layout, attnctl.AStar(["cat", "frog"])) as ctl:
        with_astar = _run(sd, "sd")
    assert ctl.log["AStar"] and torch.isfinite(with_astar).all() and not torch.allclose(with_astar, alone)
    # Regulation acts on the masked logits: outside every box the region prompt still adds nothing
    regions = [attnctl.Region((0.0, 0.0, 0.5, 0.5), "a cat")]
    other = [attnctl.Region((0.0, 0.0, 0.5, 0.5), "a green frog")]
    ar = attnctl.AttentionRegulation(["cat"], layers=["down_blocks.1"])
    call, a = _first_call(sd, "sd", [attnctl.Layout(regions, base_outside="all"), ar])
    _, b = _first_call(sd, "sd", [attnctl.Layout(other, base_outside="all"), ar])
    outside = ~box_cells(regions[0].box, call.layout.height, call.layout.width)
    cond = list(call.rows.cond)
    assert torch.allclose(a[cond][:, :, outside], b[cond][:, :, outside], atol=1e-6)


def _acting_steps(pipe, layout, steps=4):
    """The steps at which the layout's region prompts act on the first cross-attention layer: those
    whose conditional output is not the plain attention over the prompt's own keys."""
    probe = _Outputs()
    with attnctl.control(pipe, layout) as ctl:
        first = next(layer for layer in ctl.layers if layer.kind == "cross")
        ctl.add_edit([first], probe)
        _run(pipe, "sd", num_inference_steps=steps)
    n_base = pipe.tokenizer.model_max_length
    acting = []
    for (_, step), (call, out) in sorted(probe.calls.items()):
        plain = sdpa(call.query, call.key[:, :, :n_base], call.value[:, :, :n_base], None, None)
        cond = list(call.rows.cond)
        if not torch.allclose(out[cond], plain[cond], atol=1e-6):
            acting.append(step)
    return acting


def test_region_prompts_act_on_the_first_fraction_of_the_chosen_steps(sd):
    assert _acting_steps(sd, attnctl.Layout(_regions(), prompt_fraction=0.5)) == [0, 1]
    assert _acting_steps(sd, attnctl.Layout(_regions())) == [0, 1]  # 0.3 of 4 steps: steps 0 and 1
    assert _acting_steps(sd, attnctl.Layout(_regions(), prompt_fraction=1.0)) == [0, 1, 2, 3]
    # the fraction is of the chosen steps: the first half of [2, 3]
    assert _acting_steps(sd, attnctl.Layout(_regions(), steps=[2, 3], prompt_fraction=0.5)) == [2]


def test_region_words_past_a_truncated_prompt_are_ignored():
    """T5 keeps max_sequence_length tokens: a region's words past them are not in the text, and the
    box sees the region's tokens (and the words that are there)."""
    pipe = tiny_pipeline("flux")
    prompt = " ".join(["filler"] * 40) + " a cat and a frog"
    with attnctl.control(pipe, attnctl.Layout(_regions(), base_outside="all")):
        out = _run(pipe, "flux", prompt, max_sequence_length=32)
    assert torch.isfinite(out).all()


def test_prompt_embeds_without_the_prompt_text(sd):
    """Without the prompt's text a box sees its region's tokens only; hiding words needs the text."""
    embeds = sd.encode_prompt(PROMPT, "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    with attnctl.control(sd, attnctl.Layout(_regions(), base_outside="all")):
        out = _run(sd, "sd", None, **kwargs)
    assert torch.isfinite(out).all() and not torch.allclose(out, _run(sd, "sd", None, **kwargs))
    with pytest.raises(ValueError, match="without `prompt`"):
        with attnctl.control(sd, attnctl.Layout(_regions())):
            _run(sd, "sd", None, **kwargs)


def test_restores_the_pipeline_after_an_exception(sd):
    before = {n: p for n, p in sd.unet.attn_processors.items()}
    base = _run(sd, "sd")

    def fail(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("stop")
        return kwargs

    with pytest.raises(RuntimeError, match="stop"):
        with attnctl.control(sd, attnctl.Layout(_regions())):
            _run(sd, "sd", num_inference_steps=3, callback_on_step_end=fail)
    assert sd.unet.attn_processors == before
    assert "encode_prompt" not in vars(sd) and not hasattr(sd.unet, "_diffusers_hook")
    assert torch.equal(_run(sd, "sd"), base)


# ---- subjects through an IP-Adapter -----------------------------------------------------------
def _picture(path, seed):
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype("uint8")).save(path)
    return str(path)


@pytest.fixture(scope="module")
def ip_sd():
    return add_tiny_ip_adapter(tiny_pipeline("sd"))


@pytest.fixture
def subjects(tmp_path):
    return [_picture(tmp_path / "a.png", 0), _picture(tmp_path / "b.png", 1)]


def test_one_subject_over_the_whole_image_is_the_plain_ip_adapter(ip_sd, subjects):
    with attnctl.control(ip_sd, attnctl.Layout([attnctl.Region((0, 0, 1, 1), image=subjects[0])])):
        out = _run(ip_sd, "sd")
    plain = _run(ip_sd, "sd", ip_adapter_image=Image.open(subjects[0]))
    assert (out - plain).abs().max() <= 1e-5


def test_mask_and_sum_is_diffusers_ip_adapter_masks(ip_sd, subjects):
    regions = [attnctl.Region(LEFT, image=subjects[0]), attnctl.Region(RIGHT, image=subjects[1], scale=0.5)]
    with attnctl.control(ip_sd, attnctl.Layout(regions, mode="mask_and_sum")):
        out = _run(ip_sd, "sd")
    ip_sd.set_ip_adapter_scale([[1.0, 0.5]])
    try:
        masks = IPAdapterMaskProcessor().preprocess(
            [
                Image.fromarray((m.numpy() * 255).astype("uint8"))
                for m in pixel_masks([LEFT, RIGHT], 32, 32)[0]
            ],
            32,
            32,
        )
        plain = _run(
            ip_sd,
            "sd",
            ip_adapter_image=[[Image.open(p) for p in subjects]],
            cross_attention_kwargs={"ip_adapter_masks": [masks.reshape(1, 2, 32, 32)]},
        )
    finally:
        ip_sd.set_ip_adapter_scale(1.0)
    assert (out - plain).abs().max() <= 1e-5


def test_subject_streams_are_zero_outside_and_merged_by_priority(ip_sd, subjects):
    a = attnctl.Region((0.0, 0.0, 0.75, 1.0), image=subjects[0], priority=1)
    b = attnctl.Region((0.25, 0.0, 1.0, 0.5), image=subjects[1])
    call, out = _first_call(ip_sd, "sd", [attnctl.Layout([a, b])])
    lay = call.layout
    owner = owners([a.box, b.box], [1, 0], lay.height, lay.width)
    text = sdpa(call.query, call.key, call.value, None, None)
    assert call.image_streams == []  # taken over by the layout
    outside = owner < 0
    assert outside.any() and torch.equal(out[:, :, outside], text[:, :, outside])
    _, a_only = _first_call(ip_sd, "sd", [attnctl.Layout([a])])
    _, b_only = _first_call(ip_sd, "sd", [attnctl.Layout([b])])
    for j, alone in ((0, a_only), (1, b_only)):
        assert torch.allclose(out[:, :, owner == j], alone[:, :, owner == j], atol=1e-6)
    assert (box_cells(b.box, lay.height, lay.width) & (owner == 0)).any()  # the overlap went to `a`


def test_subjects_stay_in_their_boxes_after_the_prompt_fraction(ip_sd, subjects):
    """prompt_fraction is for region prompts: the subject's stream is still the layout's (confined to
    its box) at the last step."""
    probe = _Outputs()
    layout = attnctl.Layout([attnctl.Region(LEFT, image=subjects[0])], prompt_fraction=0.3)
    with attnctl.control(ip_sd, layout) as ctl:
        first = next(layer for layer in ctl.layers if layer.kind == "cross")
        ctl.add_edit([first], probe)
        _run(ip_sd, "sd", num_inference_steps=4)
    call, out = probe.calls[(first.name, 3)]
    outside = ~box_cells(LEFT, call.layout.height, call.layout.width)
    text = sdpa(call.query, call.key, call.value, None, None)
    assert call.image_streams == [] and torch.equal(out[:, :, outside], text[:, :, outside])


def test_subjects_and_region_prompts_together(ip_sd, subjects):
    layout = attnctl.Layout(
        [attnctl.Region(LEFT, "a cat", image=subjects[0]), attnctl.Region(RIGHT, "a frog")]
    )
    with attnctl.control(ip_sd, layout, attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(ip_sd, "sd")
    assert torch.isfinite(out).all() and ctl.maps["cat"].dim() == 2


def test_subject_errors(sd, ip_sd, subjects):
    with pytest.raises(ValueError, match="exactly one IP-Adapter loaded"):
        with attnctl.control(sd, attnctl.Layout([attnctl.Region(LEFT, image=subjects[0])])):
            pass
    with pytest.raises(ValueError, match="ip_adapter_image="):
        with attnctl.control(ip_sd, attnctl.Layout([attnctl.Region(LEFT, image=subjects[0])])):
            _run(ip_sd, "sd", ip_adapter_image=Image.open(subjects[1]))
    flux = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="exactly one IP-Adapter loaded"):
        with attnctl.control(flux, attnctl.Layout([attnctl.Region(LEFT, image=subjects[0])])):
            pass


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_never_builds_explicit_logits(family, monkeypatch):
    """The layout runs the model's own kernel per query group: no N x N logits and no mask."""
    from attnctl.core import attention as attention_module
    from attnctl.core.attention import AttentionCall

    pipe = tiny_pipeline(family)
    calls = []
    init = AttentionCall.__init__

    def spy(self, session, layer, prepared, default_kernel, native=False):
        def run(q, k, v, mask, scale):
            calls.append(mask)
            return default_kernel(q, k, v, mask, scale)

        init(self, session, layer, prepared, run, native)

    def no_logits(*args, **kwargs):
        raise AssertionError("explicit logits were computed")

    monkeypatch.setattr(AttentionCall, "__init__", spy)
    monkeypatch.setattr(AttentionCall, "text_logits", no_logits)
    monkeypatch.setattr(attention_module, "_logit_chunks", no_logits)
    with attnctl.control(pipe, attnctl.Layout(_regions())):
        _run(pipe, family)
    assert calls and all(mask is None for mask in calls)
