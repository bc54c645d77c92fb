"""attnctl.generate: one generation with controls, images, maps and logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnctl
from attnctl.pipelines.generate import default_size
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


def _kwargs(family="sd"):
    kwargs = tiny_call_kwargs(family)
    kwargs.pop("num_inference_steps", None)
    kwargs.pop("output_type", None)
    return kwargs


def test_no_controls_is_the_plain_pipeline(sd):
    plain = sd(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(7), **_kwargs()).images[
        0
    ]
    result = attnctl.generate(sd, PROMPT, seed=7, steps=3, **_kwargs())
    assert np.array_equal(np.asarray(plain), np.asarray(result.image))
    assert result.maps is None and result.log == {} and result.video is False
    assert result.heatmaps() is None and result.layout_image() is None


def test_controls_as_objects_or_dicts_give_the_same_result(sd):
    controls = [attnctl.AttentionMaps(["cat", "frog"]), attnctl.AStar(["cat", "frog"])]
    steps = []
    a = attnctl.generate(
        sd, PROMPT, controls, seed=1, steps=3, on_step=lambda i, n: steps.append((i, n)), **_kwargs()
    )
    b = attnctl.generate(sd, PROMPT, [c.to_dict() for c in controls], seed=1, steps=3, **_kwargs())
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert a.maps.words() == ["cat", "frog"] and torch.equal(a.maps["cat"], b.maps["cat"])
    assert [e["step"] for e in a.log["AStar"]] == [0, 1]  # guided: the first half of 3 steps
    grid = a.heatmaps()
    assert grid.size[0] == 3 * grid.size[1] - 3 * 18 or grid.size[0] > grid.size[1]  # image + 2 maps
    assert a.controls == controls and b.controls == controls


def test_layout_image(sd):
    layout = attnctl.Layout([attnctl.Region((0, 0, 0.5, 1), "a cat")])
    result = attnctl.generate(sd, PROMPT, [layout], seed=0, steps=2, **_kwargs())
    assert result.layout_image().size == (512, 256)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "^prompt="),
        ({"prompt": ["a cat", " "]}, "^prompt="),
        ({"seed": -1}, "^seed="),
        ({"steps": 0}, "^steps="),
        ({"height": -8}, "^height="),
        ({"controls": [{"kind": "AStar", "concepts": ["cat"], "scael": 1}]}, "has no field 'scael'"),
        # found by the bad-input audit (benchmarks/audit.py)
        ({"seed": 2**64}, r"^seed=18446744073709551616 is not allowed"),  # torch's "Overflow" before
        ({"steps": 2**62}, r"^steps=\d+ is not allowed: an integer in \[1, 1000\]"),  # numpy's "too big"
        ({"height": 10**30, "width": 32}, r"^height=\d+ is not allowed"),  # a torch TypeError before
        ({"height": True}, "^height="),
        ({"controls": 5}, r"^controls=5 is not allowed: a list of controls"),  # "'int' is not iterable"
        ({"guidance_scale": float("nan")}, "^guidance_scale=nan"),  # ran without guidance
        ({"guidance_scale": float("inf")}, "^guidance_scale=inf"),  # a NaN image
        ({"prompt": "a \udcff cat"}, "^prompt=.*UTF-8"),  # a command line's undecodable byte: a TypeError
    ],
)
def test_bad_input_is_refused_before_generating(sd, kwargs, match):
    before = dict(sd.unet.attn_processors)
    args = {"prompt": PROMPT, "controls": [], **kwargs}
    with pytest.raises(ValueError, match=match):
        attnctl.generate(sd, args.pop("prompt"), args.pop("controls"), **{**_kwargs(), **args})
    assert dict(sd.unet.attn_processors) == before


def test_one_side_given_keeps_it_and_the_other_is_the_default(sd):
    """SD's pipeline drops a height given without a width (both become the default): generate fills
    the other side with the pipeline's default, so the side given is the side made."""
    kwargs = {k: v for k, v in _kwargs().items() if k not in ("height", "width")}
    tall = attnctl.generate(sd, PROMPT, seed=0, steps=1, height=64, **kwargs)
    wide = attnctl.generate(sd, PROMPT, seed=0, steps=1, width=64, **kwargs)
    side = default_size(sd)
    assert tall.image.size == (side[1], 64) and wide.image.size == (64, side[0])


def test_video_models_give_frames():
    pipe = tiny_pipeline("wan")
    kwargs = tiny_call_kwargs("wan")
    kwargs.pop("num_inference_steps", None)
    kwargs.pop("output_type", None)
    result = attnctl.generate(pipe, PROMPT, [attnctl.AttentionMaps(["cat"])], seed=0, steps=2, **kwargs)
    assert (
        result.video
        and len(result.images) == kwargs.get("num_frames", len(result.images))
        and len(result.images) > 1
    )
    assert result.maps["cat"].dim() == 3  # [frames, h, w]
