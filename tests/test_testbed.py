"""The shapes testbed: data, detector, trainer (smoke), the shipped model and the compose benchmark."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import attnctl
from attnctl.testbed import load_pipeline, model_path
from attnctl.testbed.bench import SIZES, format_table, mean_ci, method_controls, run_compose, wilson
from attnctl.testbed.data import (
    CAPTION_WORDS,
    COLORS,
    bench_prompts,
    combo_key,
    generate,
    heldout_combos,
    parse_caption,
    search_prompts,
)
from attnctl.testbed.detector import DETECTOR_EVAL_SEED, evaluate
from attnctl.testbed.train import (
    TOKEN_LENGTH,
    TrainConfig,
    _MapRecorder,
    build_tokenizer,
    grounding_loss,
    train,
    word_masks,
)

SHIPPED = Path(model_path()) / "model_index.json"


def test_data_is_deterministic_by_seed():
    a, b, c = generate(3, 12), generate(3, 12), generate(4, 12)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert [s.caption for s in a] != [s.caption for s in c]
    assert {len(s.objects) for s in generate(0, 60)} == {1, 2, 3}


def test_boxes_match_rendered_pixels():
    for sample in generate(11, 40):
        for color, rgb in COLORS.items():
            pixels = np.all(sample.image == np.array(rgb, dtype=np.uint8), axis=-1)
            covered = np.zeros_like(pixels)
            for obj in sample.objects:
                if obj.color != color:
                    continue
                x0, y0, x1, y1 = obj.box
                inside = pixels[y0:y1, x0:x1]
                # The object's pixels reach every edge of its box...
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                covered[y0:y1, x0:x1] = True
            # ...and no pixel of that colour lies outside the boxes.
            assert not (pixels & ~covered).any()
        assert sample.caption == " and ".join(f"a {o.color} {o.shape}" for o in sample.objects)


def test_benchmark_prompts_are_held_out_of_training():
    held = heldout_combos()
    assert all(combo_key([(o.color, o.shape) for o in s.objects]) not in held for s in generate(0, 500))
    for n in (2, 3):
        prompts = bench_prompts(n)
        assert prompts and all(combo_key(parse_caption(p)) in held for p in prompts)
    assert len(bench_prompts(1)) == 12
    assert bench_prompts(2) == bench_prompts(2)


def test_search_prompts_are_not_benchmark_prompts():
    bench = {combo_key(parse_caption(p)) for n in SIZES for p in bench_prompts(n)}
    prompts = search_prompts()
    keys = [combo_key(parse_caption(p)) for p in prompts]
    assert not set(keys) & bench and all(len(k) in (2, 3) for k in keys)
    assert len(set(keys)) == len(keys) == 27 + 18  # every two- and three-object training combination
    assert set(keys) | {k for k in bench if len(k) > 1} == heldout_combos() | set(keys)
    assert search_prompts() == prompts


def test_detector_accuracy_on_held_out_renders():
    result = evaluate(DETECTOR_EVAL_SEED, n=200)
    assert result["image_accuracy"] >= 0.98, result
    assert result["object_accuracy"] >= 0.98, result


def test_word_masks_name_each_objects_colour_and_shape_tokens():
    samples = generate(5, 30)
    masks, owner = word_masks(samples)
    tokenizer = build_tokenizer(CAPTION_WORDS)
    for sample, cover, own in zip(samples, masks, owner, strict=True):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(sample.caption).input_ids)
        for j, obj in enumerate(sample.objects):
            named = [tokens[k].removesuffix("</w>") for k in range(TOKEN_LENGTH) if own[k] == j]
            assert named == [obj.color, obj.shape]
            # coverage on the 16x16 grid: each cell holds 2x2 pixels
            assert cover[j].sum() * 4 == pytest.approx(sample.masks[j].sum())
        assert (own[tokens.index("<|endoftext|>") :] == -1).all() and own[0] == -1


def test_grounding_loss_is_the_share_of_attention_outside_the_object():
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, :4, :4] = 1  # object 0: the top-left 4x4 cells of 16x16 (2x2 cells of 8x8)
    owner = torch.full((1, TOKEN_LENGTH), -1)
    owner[0, 2] = 0
    inside = torch.zeros(1, 64, TOKEN_LENGTH)
    inside[0, [0, 1, 8, 9], 2] = 1.0  # token 2 attends only within its object's 8x8 cells
    assert grounding_loss([inside], masks, owner).item() == pytest.approx(0.0)
    uniform = torch.full((1, 256, TOKEN_LENGTH), 1 / TOKEN_LENGTH)
    assert grounding_loss([uniform], masks, owner).item() == pytest.approx((1 - 16 / 256) ** 2)
    # unnamed tokens (and dropped captions: owner -1 everywhere) contribute nothing
    assert grounding_loss([uniform], masks, torch.full_like(owner, -1)).item() == 0.0


def test_map_recorder_is_the_models_own_cross_attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16, heads=2, dim_head=16)
    x, ctx = torch.randn(2, 64, 32), torch.randn(2, TOKEN_LENGTH, 16)
    expected = attn(x, encoder_hidden_states=ctx)
    recorder = _MapRecorder()
    attn.set_processor(recorder)
    assert torch.allclose(attn(x, encoder_hidden_states=ctx), expected, atol=1e-6)
    (probs,) = recorder.maps
    assert probs.shape == (2, 64, TOKEN_LENGTH) and torch.allclose(probs.sum(-1), torch.ones(2, 64))


def test_smoke_training_loads_and_resumes(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    config = TrainConfig.smoke()
    saved = train(tmp_path / "full", config, threads=1)
    pipe = DiffusionPipeline.from_pretrained(saved)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in CAPTION_WORDS)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    # Stop half-way, resume: the same weights as the uninterrupted run.
    train(tmp_path / "split", replace(config, unet_steps=config.unet_steps // 2), threads=1)
    resumed = DiffusionPipeline.from_pretrained(train(tmp_path / "split", config, threads=1))
    for (name, p), q in zip(pipe.unet.state_dict().items(), resumed.unet.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_shipped_model_generates():
    pipe = load_pipeline()
    sizes = {p.stat().st_size for p in Path(model_path()).rglob("*") if p.is_file()}
    assert sum(sizes) <= 30 * 2**20
    assert not list(Path(model_path()).rglob("*.bin"))
    # Cross-attention maps at 16x16 and 8x8 (16x16 latents; one downsampling).
    assert pipe.unet.config.sample_size == 16 and len(pipe.unet.config.block_out_channels) == 2
    image = pipe("a blue square", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_confidence_intervals():
    r = wilson(9, 10)
    assert r["ci_low"] < 0.9 < r["ci_high"] <= 1.0
    assert wilson(0, 5)["ci_low"] == 0.0
    m = mean_ci([1.0, 2.0, 3.0])
    assert (
        m["mean"] == 2.0 and 1.0 <= m["ci_low"] < 2.0 < m["ci_high"] <= 3.0 and m == mean_ci([1.0, 2.0, 3.0])
    )
    skewed = mean_ci([0.0] * 9 + [1.0])  # a positive quantity: a Student-t interval goes below 0 here
    assert 0.0 <= skewed["ci_low"] <= 0.1 <= skewed["ci_high"] <= 1.0


def test_bench_compose_writes_json(tmp_path):
    from typer.testing import CliRunner

    from attnctl.cli import app

    out = tmp_path / "compose.json"
    result = CliRunner().invoke(
        app,
        # --prompts: the count's old name, a hidden alias of --num-prompts for one release
        ["bench", "compose", "--prompts", "1", "--seeds", "2", "--steps", "2", "--json", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["bench", "compose", "--help"]).output
    assert "--num-prompts" in shown and "--prompts " not in shown
    report = json.loads(out.read_text())
    assert report["config"]["methods"] == ["none"] and len(report["records"]) == 6
    for group in ("1", "2", "3", "2+3", "overall"):
        row = report["results"]["none"][group]
        for metric in ("object_presence", "all_present", "binding", "all_correct"):
            assert {"rate", "ci_low", "ci_high", "n"} <= set(row[metric])
        assert {"mean", "ci_low", "ci_high"} <= set(row["seconds_per_image"])


def test_bench_compares_methods_on_the_same_samples(tmp_path):
    report = run_compose("none,astar,regulation,excite,pag,softpag", 1, 1, steps=2, sizes=(2,), log=None)
    records = report["records"]
    assert [r["method"] for r in records] == ["none", "astar", "regulation", "excite", "pag", "softpag"]
    assert len({(r["prompt"], r["seed"]) for r in records}) == 1  # same prompt and seed for all
    assert report["time_ratio"]["none"]["mean"] == 1.0 and report["time_ratio"]["astar"]["to"] == "none"
    assert set(report["results"]) == {"none", "astar", "regulation", "excite", "pag", "softpag"}
    with pytest.raises(ValueError, match="sizes"):
        run_compose("none", 1, 1, sizes=(4,), pipe=object())


def test_bench_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        run_compose("nope", pipe=object())
    with pytest.raises(ValueError, match="missing.json"):
        run_compose("none,softpag:missing.json", pipe=object())


def test_bench_softpag_on_a_head_search_result(tmp_path):
    result = tmp_path / "heads.json"
    selected = [
        "mid_block.attentions.0.transformer_blocks.0.attn1:1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1:3",
    ]
    result.write_text(json.dumps({"selected": selected}))
    method = f"softpag:{result}"
    assert method_controls(method)("a red circle") == [attnctl.SoftPAG(str(result), u=1.0, scale=3.0)]
    report = run_compose(f"none,{method}", 1, 1, steps=4, sizes=(2,), log=None)
    assert [r["method"] for r in report["records"]] == ["none", method]
    assert set(report["results"]) == {"none", method} and method in format_table(report)


def test_in_box_ratio():
    from attnctl.testbed.localisation import in_box_ratio

    flat = torch.ones(8, 8)
    assert in_box_ratio(flat, (0, 0, 16, 16), (32, 32)) == pytest.approx(1.0)
    peaked = torch.zeros(8, 8)
    peaked[0:2, 0:2] = 1.0  # all mass in the top-left 8x8 pixels
    assert in_box_ratio(peaked, (0, 0, 8, 8), (32, 32)) == pytest.approx(16.0)
    assert in_box_ratio(peaked, (16, 16, 32, 32), (32, 32)) == 0.0


def test_bench_maps_reports_every_text_layer(tmp_path):
    from attnctl.testbed.localisation import run_maps

    out = tmp_path / "maps.json"
    report = run_maps(4, 1, sizes=(2,), steps=25, json_out=out, log=None)
    saved = json.loads(out.read_text())
    assert report["records"] and saved["summary"] == report["summary"]
    layers = set(report["layer_grids"])
    assert layers and set(report["default_layers"]) <= layers
    for row in report["records"]:
        assert set(row["layers"]) == layers and row["kind"] in ("colour", "shape")
        assert row["default"] >= 0 and all(v >= 0 for v in row["resolutions"].values())
    with pytest.raises(ValueError, match="sizes"):
        run_maps(1, 1, sizes=(1,), pipe=object())


def test_methods_read_the_shipped_models_8x8_text_layers():
    """The layer rule (text-attending level at latent/4, else the lowest above it) on the bundled
    model: a 16x16 latent attending to text at 16x16 and 8x8 gives the 8x8 layers."""
    import attnctl
    from attnctl.core.layers import working_layers

    pipe = load_pipeline()
    with attnctl.control(pipe) as ctl:
        chosen = working_layers(ctl.layers, 16, 16)
        text = [x for x in ctl.layers if x.kind == "cross"]
    assert chosen and all(16 // x.downsample == 8 for x in chosen)
    assert {x.name for x in chosen} == {x.name for x in text if 16 // x.downsample == 8}
