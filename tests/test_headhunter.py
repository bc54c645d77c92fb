"""HeadHunter: the greedy order on a known objective, resuming, refusing other settings, the search on
a tiny model read back by SoftPAG, the objectives and the command's bad values."""

from __future__ import annotations

import json

import pytest
import torch

import attnctl
from attnctl import headhunter
from attnctl.headhunter import (
    ClipScore,
    candidate_heads,
    greedy,
    objective_from_name,
    search,
)
from attnctl.testbed.data import render
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


class Known:
    """A scorer with a known greedy answer: each head's own worth, except that b adds nothing once a is
    chosen (a and b do the same job). Alone, a > b > c > d; greedily after a: c, then d."""

    worth = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0, "e": 0.5}

    def __init__(self, fail_after: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_after = fail_after

    def __call__(self, heads: list[str]) -> list[float]:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt  # a user stopping the search
        self.calls.append(list(heads))
        total = sum(self.worth[h] for h in heads if not (h == "b" and "a" in heads))
        return [total - 0.25, total + 0.25]  # two samples; their mean is the total


def _greedy(score, out=None, rounds=3, top_k=1, settings=None, **kwargs):
    return greedy(
        list(Known.worth),
        score,
        rounds=rounds,
        top_k=top_k,
        settings=settings or {"samples": 2},
        objective="known",
        out=out,
        progress=False,
        **kwargs,
    )


def test_greedy_order_on_a_known_objective():
    score = Known()
    result = _greedy(score)
    assert result["selected"] == ["a", "c", "d"]  # not b: redundant once a is in
    first, second, third = result["rounds"]
    assert first["base"] == [] and first["picked"] == ["a"]
    assert first["scores"] == {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0, "e": 0.5}
    assert first["sample_scores"]["a"] == [3.75, 4.25]
    assert second["base"] == ["a"] and second["scores"] == {"b": 4.0, "c": 6.0, "d": 5.0, "e": 4.5}
    assert third["base"] == ["a", "c"] and third["picked"] == ["d"]
    # each candidate guided by the selection so far plus itself, every remaining one once per round
    assert score.calls[:5] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert score.calls[5:9] == [["a", "b"], ["a", "c"], ["a", "d"], ["a", "e"]]
    assert len(score.calls) == 5 + 4 + 3 and result["finished"]
    # k per round: one round of k = 2 takes the two best alone, redundant or not
    assert _greedy(Known(), rounds=1, top_k=2)["selected"] == ["a", "b"]
    # ties keep the candidates' order
    flat = _greedy(lambda heads: [1.0], rounds=1, top_k=3)
    assert flat["selected"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="top_k=3 is not allowed"):
        _greedy(Known(), rounds=2, top_k=3)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path):
    whole = _greedy(Known(), out=tmp_path / "whole.json")
    out = tmp_path / "split.json"
    with pytest.raises(KeyboardInterrupt):
        _greedy(Known(fail_after=7), out=out)  # in round 2, after two of its four candidates
    saved = json.loads(out.read_text())
    assert not saved["finished"] and saved["selected"] == ["a"]
    assert list(saved["rounds"][1]["scores"]) == ["b", "c"]
    rest = Known()
    resumed = _greedy(rest, out=out)
    assert rest.calls[0] == ["a", "d"] and len(rest.calls) == 12 - 7  # nothing scored twice
    assert resumed["timing"]["generations"] == whole["timing"]["generations"] == 24

    def without_timing(result):
        return {k: v for k, v in result.items() if k != "timing"}

    assert without_timing(json.loads(out.read_text())) == without_timing(whole)
    assert without_timing(resumed) == without_timing(whole)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_a_result_from_other_settings_is_refused(tmp_path):
    out = tmp_path / "heads.json"
    _greedy(Known(), out=out, rounds=1)
    before = out.read_text()
    with pytest.raises(ValueError, match=r"other settings \(rounds differ\)"):
        _greedy(Known(), out=out, rounds=2)
    with pytest.raises(ValueError, match=r"samples differ"):
        _greedy(Known(), out=out, rounds=1, settings={"samples": 3})
    with pytest.raises(ValueError, match=r"objective differ"):
        greedy(list(Known.worth), Known(), rounds=1, top_k=1, settings={"samples": 2}, objective="x", out=out)
    assert out.read_text() == before  # nothing mixed in
    (tmp_path / "other.json").write_text('{"selected": ["a:0"]}')
    with pytest.raises(ValueError, match="not a head-search result"):
        _greedy(Known(), out=tmp_path / "other.json")
    assert _greedy(Known(), out=out, rounds=2, resume=False)["settings"]["rounds"] == 2  # start over


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("rounds"),
        lambda r: r.update(selected=None),
        lambda r: r.update(timing=None),
        lambda r: r["rounds"][0].update(picked=["z"]),  # a head that is no candidate
        lambda r: r["rounds"][0]["scores"].update(z=1.0),
        lambda r: r["rounds"][0]["scores"].update(a="high"),
        lambda r: r.update(selected=["b"]),
        # found by the bad-input audit (benchmarks/audit.py): KeyErrors, TypeErrors or silently kept
        lambda r: r["rounds"][0]["scores"].update(e=float("nan")),
        lambda r: r["rounds"][0]["scores"].update(e=True),
        lambda r: r["rounds"][0]["sample_scores"].update(e=5),
        lambda r: r["rounds"][0]["sample_scores"].update(e=["x", "y"]),
        lambda r: r["rounds"][0]["sample_scores"].update(z=[1.0]),
        lambda r: r["rounds"][0].pop("base"),
        lambda r: (r["rounds"][0].update(picked=["a", "b"]), r.update(selected=["a", "b", "c", "d"])),
        lambda r: (r["rounds"][1].update(picked=["a"]), r.update(selected=["a", "a", "d"])),
        lambda r: (
            r["rounds"].append({"base": r["selected"], "scores": {}, "sample_scores": {}, "picked": ["e"]}),
            r["timing"]["rounds"].append({}),
            r["selected"].append("e"),
        ),
        lambda r: r["timing"]["rounds"].__setitem__(0, None),
        lambda r: r["timing"]["rounds"][0].update(a="x"),
        lambda r: r["timing"].pop("wall_seconds"),
    ],
)
def test_a_damaged_result_is_one_error_and_left_as_it_is(tmp_path, damage):
    out = tmp_path / "heads.json"
    _greedy(Known(), out=out)
    result = json.loads(out.read_text())
    damage(result)
    out.write_text(json.dumps(result))
    before = out.read_text()
    with pytest.raises(ValueError, match=r"is a damaged head-search result \(.*\).*--no-resume"):
        _greedy(Known(), out=out)
    assert out.read_text() == before


@pytest.mark.parametrize("settings", [None, [], "x"])
def test_a_result_without_settings_is_no_head_search_result(tmp_path, settings):
    out = tmp_path / "heads.json"
    _greedy(Known(), out=out)
    result = json.loads(out.read_text())
    result["settings"] = settings
    out.write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"is not a head-search result"):  # a KeyError or TypeError before
        _greedy(Known(), out=out)
    assert json.loads(out.read_text()) == result


def test_an_output_that_is_no_regular_file_or_cannot_be_written_is_refused_before_scoring(tmp_path):
    """The result is written by renaming a new file over --out: over a device (as root, /dev/null)
    that replaced the device; an output that cannot be written failed after the first candidate."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, message in (
        (fifo, "is not a regular file"),
        (tmp_path, "is not a regular file"),
        (a_file / "heads.json", "cannot be written"),
    ):
        for resume in (True, False):
            score = Known()
            with pytest.raises(ValueError, match=f"^out=.*{message}"):
                _greedy(score, out=out, resume=resume)
            assert score.calls == []
    assert fifo.is_fifo() and a_file.read_text() == ""


def test_search_arguments_are_checked_before_generating():
    pipe = tiny_pipeline("sd")
    heads = [f"{MID}:0", f"{MID}:1"]

    def flat(images, prompts):
        return [0.5] * len(images)

    kwargs = dict(candidates=heads, samples=1, rounds=1, top_k=1, steps=1, progress=False)
    for changes, message in (
        ({"seeds": [True]}, "^seeds="),  # torch's manual_seed(bool) error, after generating
        ({"seeds": [10**30]}, "^seeds="),
        ({"guidance_scale": float("nan")}, "^guidance_scale="),
        ({"guidance_scale": -1.0}, "^guidance_scale="),
        ({"rounds": 3}, "^rounds=3 is not allowed: at most 2"),
    ):
        with pytest.raises(ValueError, match=message):
            search(pipe, ["a cat"], flat, **{**kwargs, **changes})
    with pytest.raises(ValueError, match="^prompts=None"):
        search(pipe, None, flat, **kwargs)
    with pytest.raises(ValueError, match="^objective='testbed' is not allowed: a function"):
        search(pipe, ["a cat"], "testbed", **kwargs)
    with pytest.raises(ValueError, match=r"^objective 'strings' gave \['x'\] for 1 images"):

        def strings(images, prompts):
            return ["x"] * len(images)

        search(pipe, ["a cat"], strings, **{**kwargs, "call_kwargs": tiny_call_kwargs("sd")})


def test_search_on_a_tiny_model_and_softpag_reads_the_result(tmp_path, tiny_clip_path):
    pipe = tiny_pipeline("sd")
    heads = candidate_heads(pipe)
    with attnctl.control(pipe) as ctl:
        expected = [f"{x.name}:{h}" for x in ctl.layers if x.kind == "self" for h in range(x.heads)]
    assert heads == expected and len(heads) == 6 * 8
    assert candidate_heads(pipe, ["mid_block"]) == [f"{MID}:{h}" for h in range(8)]
    with pytest.raises(ValueError, match="layers=\\['nope'\\] is not allowed"):
        candidate_heads(pipe, ["nope"])

    out = tmp_path / "heads.json"
    kwargs = dict(
        candidates=[f"{MID}:{h}" for h in range(4)],
        samples=3,
        rounds=2,
        top_k=1,
        steps=2,
        batch_size=2,
        call_kwargs=tiny_call_kwargs("sd"),
        out=out,
        progress=False,
    )
    clip = ClipScore(tiny_clip_path)
    result = search(pipe, ["a cat", "a frog"], clip, **kwargs)
    saved = json.loads(out.read_text())
    assert saved == result and saved["finished"] and len(saved["selected"]) == 2
    settings = saved["settings"]
    assert saved["objective"] == f"clip:{tiny_clip_path}"
    assert settings["prompts"] == ["a cat", "a frog", "a cat"] and settings["seeds"] == [
        900_000,
        900_001,
        900_002,
    ]
    assert settings["call"]["num_inference_steps"] == 2 and settings["call"]["output_type"] == "pil"
    assert len({round(v, 6) for v in saved["rounds"][0]["scores"].values()}) > 1  # heads differ
    # resuming a finished search generates nothing and gives the same result
    again = search(pipe, ["a cat", "a frog"], _Idle(clip.name), **kwargs)
    assert again["rounds"] == result["rounds"] and again["selected"] == result["selected"]

    control = attnctl.SoftPAG(heads=str(out), top=2, u=0.5)
    layer, head = result["selected"][0].rsplit(":", 1)
    assert control.head_map()[layer][0] == int(head)
    with attnctl.control(pipe, control):
        pipe("a cat", generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("sd"))

    # another model (other weights) is another search
    with pytest.raises(ValueError, match="weights differ"):
        search(tiny_pipeline("sd", seed=1), ["a cat", "a frog"], clip, **kwargs)
    with pytest.raises(ValueError, match="candidates="):
        search(
            pipe,
            ["a cat"],
            clip,
            **{**kwargs, "candidates": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2:0"]},
        )


class _Idle:
    """An objective of the given name that must not be called."""

    def __init__(self, name):
        self.name = name

    def __call__(self, images, prompts):
        raise AssertionError("a finished search generates nothing")


def test_clip_objective_from_a_local_folder(tiny_clip_path):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    clip = objective_from_name(f"clip:{tiny_clip_path}")
    images = [Image.new("RGB", (32, 32), (215, 40, 40)), Image.new("RGB", (48, 48), (40, 80, 215))]
    prompts = ["a red circle", "a blue square and a green triangle"]
    scores = clip(images, prompts)
    model = CLIPModel.from_pretrained(tiny_clip_path).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        for image, prompt, score in zip(images, prompts, scores, strict=True):
            inputs = processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
            out = model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
            assert score == pytest.approx(float(model.logit_scale.exp() * cos), abs=1e-4)
    assert clip.name == f"clip:{tiny_clip_path}"
    with pytest.raises(ValueError, match="objective clip:"):
        objective_from_name(f"clip:{tiny_clip_path / 'missing'}")
    with pytest.raises(ValueError, match="objective 'pickscore' is not allowed"):
        objective_from_name("pickscore")


def test_testbed_objective_is_the_fraction_of_objects_in_their_colours():
    image = render([(("red", "circle"), (2, 2, 14, 14)), (("blue", "square"), (18, 18, 30, 30))]).image
    scores = headhunter.testbed(
        [image] * 3,
        ["a red circle and a blue square", "a red circle and a green square", "a yellow triangle"],
    )
    assert scores == [1.0, 0.5, 0.0]
    assert objective_from_name("testbed") is headhunter.testbed


def _invoke(*args):
    """The `attnctl` command as a user runs it (through `main`, which turns usage errors into one
    `error:` line)."""
    import contextlib
    import io
    import types

    from attnctl.cli import main

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(["headhunter", "--model", "tiny:sd", "--steps", "2", *args])
        except SystemExit as e:
            code = e.code or 0
    return types.SimpleNamespace(exit_code=code, output=out.getvalue())


@pytest.mark.parametrize(
    "args, names",
    [
        (["--samples", "0"], "--samples"),
        (["--rounds", "0"], "--rounds"),
        (["--layers", "mid_block", "--top-k", "5", "--rounds", "2"], "top_k=5"),
        (["--objective", "pickscore"], "'pickscore'"),
        (["--objective", "clip:/nowhere"], "clip:/nowhere"),
        (["--layers", "nope"], "'nope'"),
        (["--u", "2"], "u=2.0"),
        (["--steps", "0"], "--steps"),
        (["--prompts", "/nowhere.txt"], "/nowhere.txt"),
        (["--model", "tiny:nope"], "tiny:nope"),
    ],
)
def test_cli_bad_values_give_one_line(args, names, tmp_path):
    result = _invoke(*args, "--out", str(tmp_path / "heads.json"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and names in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "heads.json").exists()


def test_cli_testbed_objective_needs_testbed_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle and a blue square\na cat\n")
    result = _invoke("--prompts", str(prompts), "--out", str(tmp_path / "h.json"))
    assert result.exit_code == 2 and "'a cat'" in result.output


def test_cli_search_writes_the_result(tmp_path, tiny_clip_path):
    out = tmp_path / "heads.json"
    args = ["--layers", "mid_block", "--samples", "2", "--rounds", "1", "--top-k", "2"]
    result = _invoke(*args, "--objective", f"clip:{tiny_clip_path}", "--out", str(out), "--threads", "1")
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["finished"] and len(saved["selected"]) == 2
    assert saved["settings"]["candidates"] == [f"{MID}:{h}" for h in range(8)]
    assert "selected: " + ", ".join(saved["selected"]) in result.output
    result = _invoke(*args, "--samples", "3", "--objective", f"clip:{tiny_clip_path}", "--out", str(out))
    assert result.exit_code == 2 and "samples" in result.output and "other settings" in result.output
