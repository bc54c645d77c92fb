"""Placement benchmark: boxes from the renderer's layouts, scoring against rendered truth, a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnctl.testbed.data import IMAGE_SIZE, render, render_random
from attnctl.testbed.placement import run_placement, sample_boxes, score


def test_sample_boxes_are_the_renderers_normalised():
    boxes = sample_boxes(5, 3)
    truth = render_random(np.random.default_rng(5), n_objects=3)
    assert len(boxes) == 3
    for box, obj in zip(boxes, truth.objects, strict=True):
        assert box == tuple(v / IMAGE_SIZE for v in obj.box)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_scoring_against_a_rendered_truth():
    sample = render([(("red", "circle"), (2, 2, 14, 14)), (("blue", "square"), (18, 18, 30, 30))])
    prompt = "a red circle and a blue square"
    right = [tuple(v / IMAGE_SIZE for v in o.box) for o in sample.objects]
    scored = score(sample.image, prompt, right)
    assert scored["all_in_box"] and all(o["iou"] > 0.9 and o["centre_in_box"] for o in scored["objects"])
    swapped = score(sample.image, prompt, right[::-1])
    assert not any(o["in_box"] or o["centre_in_box"] for o in swapped["objects"])
    assert swapped["all_present"] and all(o["bound"] for o in swapped["objects"])


def test_run_writes_the_report(tmp_path):
    out = tmp_path / "placement.json"
    report = run_placement(
        "none,crop_merge,hide_words", n_prompts=1, n_seeds=1, sizes=(2, 3), steps=2, json_out=out, log=None
    )
    data = json.loads(out.read_text())
    assert data["config"]["methods"] == ["none", "crop_merge", "hide_words"]
    assert len(data["records"]) == 6
    for method in report["results"]:
        row = report["results"][method]["2"]
        assert {"in_box", "mean_iou", "centre_in_box", "all_in_box", "all_present", "binding"} <= set(row)
    # the same boxes for every method
    boxes = {
        tuple(map(tuple, (o["box"] for o in r["objects"]))) for r in data["records"] if r["n_objects"] == 2
    }
    assert len(boxes) == 1


def test_run_rejects_unknown_methods():
    with pytest.raises(ValueError, match="sum"):
        run_placement("sum", log=None)
