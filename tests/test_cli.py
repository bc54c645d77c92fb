"""The `attnctl` command on tiny offline models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnctl.cli import app, main

runner = CliRunner()


def test_generate_writes_image_and_maps(tmp_path):
    result = runner.invoke(
        app,
        [
            "generate",
            "a cat and a frog",
            "--model",
            "tiny:sd",
            "--steps",
            "2",
            "--maps",
            "cat,frog",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "image.png").size[0] > 0
    assert Image.open(tmp_path / "maps.png").size[0] == 3 * 256


def test_generate_video_family(tmp_path):
    result = runner.invoke(
        app, ["generate", "a cat", "--model", "tiny:wan", "--steps", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "image.png").exists()


def test_generate_errors_name_the_value(tmp_path):
    result = runner.invoke(app, ["generate", "a cat", "--model", "tiny:nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(
        app, ["generate", "a cat", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "missing" in result.output
    result = runner.invoke(
        app, ["generate", "a cat", "--model", "tiny:sd", "--maps", "dog", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "dog" in result.output


def test_layers_lists_kinds_heads_and_map_sizes():
    result = runner.invoke(app, ["layers", "tiny:sd"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[")]
    assert any("attn2" in line and "cross" in line and "map=" in line for line in lines)
    assert all("map=-" not in line for line in lines)  # every layer ran and has a size
    result = runner.invoke(app, ["layers", "tiny:flux"])
    assert result.exit_code == 0 and "joint" in result.output


def test_generate_prompts_file_names_images_by_prompt_index(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na red cat\na cat and a frog\n")  # blank lines are not prompts
    base = ["generate", "--model", "tiny:sd", "--steps", "2", "--seed", "5"]
    batch = tmp_path / "batch"
    result = runner.invoke(app, [*base, "--prompts", str(prompts), "--maps", "cat", "--out", str(batch)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in batch.iterdir()) == [f"{i}{s}.png" for i in range(3) for s in ("", "_maps")]
    wrote = [line.removeprefix("wrote ") for line in result.output.splitlines() if line.startswith("wrote")]
    assert wrote == [str(batch / f"{i}{s}.png") for i in range(3) for s in ("", "_maps")]
    # image i is the single-prompt run of prompt i with the same seed
    result = runner.invoke(app, [*base, "a cat and a frog", "--out", str(tmp_path / "single")])
    assert result.exit_code == 0, result.output
    single = np.asarray(Image.open(tmp_path / "single" / "image.png"))
    assert np.array_equal(np.asarray(Image.open(batch / "2.png")), single)


def test_generate_prompts_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for args, names in (
        (["--prompts", str(empty)], "holds no prompt"),
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
        (["a cat", "--prompts", str(empty)], "one PROMPT or --prompts"),
        ([], "one PROMPT or --prompts"),
    ):
        result = runner.invoke(app, ["generate", "--model", "tiny:sd", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and result.output.count("error: ") == 1 and names in result.output, args


def test_generate_with_regions_writes_the_layout(tmp_path):
    result = runner.invoke(
        app,
        [
            "generate",
            "a cat and a frog",
            "--model",
            "tiny:sd",
            "--steps",
            "2",
            "--region",
            "0,0,0.5,1:a cat",
            "--region",
            "0.5,0,1,1:a frog",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "layout.png").size == (2 * 256, 256)


def test_bad_regions_give_one_line(tmp_path):
    for value, expected in (
        ("0.5,0,0.2,1:a cat", "x0 < x1"),
        ("0,0,1:a cat", "0 <= x0 < x1 <= 1"),
        ("0,0,a,1:a cat", "four comma-separated numbers"),
        ("0,0,1,1", "x0,y0,x1,y1:sub-prompt"),
    ):
        result = runner.invoke(
            app, ["generate", "a cat", "--model", "tiny:sd", "--region", value, "--out", str(tmp_path)]
        )
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and value in lines[0], result.output


def test_bench_layout_command(tmp_path):
    out = tmp_path / "layout.json"
    result = runner.invoke(
        app,
        ["bench", "layout", "--method", "none,crop_merge", "--sizes", "2", "--num-prompts", "1", "--seeds", "1",
         "--steps", "2", "--json", str(out), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "crop_merge" in result.output and out.exists()


def test_bench_bad_values_end_with_one_line():
    for args, message in (
        (["bench", "maps", "--sizes", "1"], "sizes=[1]"),
        (["bench", "layout", "--sizes", "1"], "sizes=[1]"),
        (["bench", "pag", "--models", "sdxl"], "models=['sdxl']"),
        (["bench", "pag", "--against", "diffusers", "--models", "testbed"], "models=['testbed']"),
        (["bench", "pag", "--against", "comfy"], "against='comfy'"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_ui_without_gradio_names_the_extra(monkeypatch):
    """Installed from a wheel there is no clone: the message names the package's extra."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a)
    )
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 2 and 'pip install "attnctl[ui]"' in result.output, result.output


def test_version_and_short_help_everywhere():
    import attnctl

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"attnctl {attnctl.__version__}"
    for args in ([], ["generate"], ["bench"], ["bench", "draft"], ["testbed"], ["testbed", "eval-detector"]):
        result = runner.invoke(app, [*args, "-h"])
        assert result.exit_code == 0 and "Usage: " in result.output, args


def test_generate_prints_only_what_it_wrote(tmp_path):
    result = runner.invoke(
        app,
        ["generate", "a cat", "--model", "tiny:sd", "--steps", "2", "--maps", "cat", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote {tmp_path / 'image.png'}", f"wrote {tmp_path / 'maps.png'}"]


def test_generate_bad_values_end_with_one_line(tmp_path, monkeypatch):
    import attnctl.cli.generate

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    early = (  # found before any model is loaded
        (
            ["a red circle", "--maps", "red,dog", "--out", out],
            "--maps dog: not a word of the prompt 'a red circle'",
        ),
        (["a cat", "--out", str(a_file)], f"--out {str(a_file)!r} is a file"),
    )
    late = (
        (["a cat", "--height", "-8", "--out", out], "--height -8 is not allowed: a positive multiple of 8"),
        (["a cat", "--width", "0", "--out", out], "--width 0 is not allowed: a positive multiple of 8"),
        (["a cat", "--height", "30", "--out", out], "--height 30 is not allowed: a positive multiple of 8"),
        (["a cat", "--model", "tiny:wan", "--height", "24", "--out", out], "a positive multiple of 16"),
    )
    for args, message in (*early, *late):
        result = runner.invoke(app, ["generate", "--model", "tiny:sd", "--steps", "1", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and lines == [f"error: {lines[0][7:]}"] and message in lines[0], (
            result.output
        )
    assert not (tmp_path / "out").exists()

    def no_loading(model):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(attnctl.cli.generate, "load_model", no_loading)
    for args, message in early:
        result = runner.invoke(app, ["generate", *args])
        assert result.exit_code == 2 and message in result.output


def test_bad_values_of_every_command_end_with_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    not_utf8 = tmp_path / "prompts.txt"
    not_utf8.write_bytes(b"\xff\xfe a cat")
    for args, message in (
        (["testbed", "eval-detector", "--n", "0"], "--n"),
        (["testbed", "train", "--smoke", "--out", str(a_file)], "is a file"),
        (
            ["bench", "draft", "--json", str(tmp_path / "d.json"), "--sparsity", "1.5"],
            "sparsity=1.5 is not allowed",
        ),
        (
            ["bench", "draft", "--json", str(tmp_path / "d.json"), "--tokens", "2048,100"],
            "tokens=100 is not allowed",
        ),
        (["bench", "draft", "--json", str(tmp_path / "d.json"), "--backend", "flex,nope"], "backend='nope'"),
        (["bench", "draft", "--json", str(tmp_path / "d.json"), "--sparsity", "0.5,x"], "--sparsity 'x'"),
        (["bench", "draft", "--json", str(tmp_path)], "is a folder"),
        (["bench", "compose", "--method", "bogus"], "method 'bogus' is not one of"),
        (["bench", "compose", "--sizes", "1,x"], "--sizes 'x' is not an integer"),
        (["bench", "compose", "--json", str(tmp_path)], "is a folder"),
        (["bench", "compose", "--model", str(tmp_path / "missing")], "no such folder"),
        (["bench", "compose", "--steps", "0"], "--steps"),
        (["bench", "maps", "--steps", "0"], "--steps"),
        (["bench", "layout", "--method", ","], "--method names nothing"),
        (["bench", "pag", "--json", str(tmp_path)], "is a folder"),
        (["headhunter", "--out", str(tmp_path)], "is a folder"),
        (["generate", "a cat", "--threads", "0"], "--threads"),
        (["layers", str(tmp_path / "missing")], "MODEL"),
        (["generate", "a cat", "--guidance", "-5"], "--guidance"),
        (["headhunter", "--guidance", "-1"], "--guidance"),
        (["bench", "compose", "--guidance", "-1"], "--guidance"),
        (["bench", "compose", "--model", "tiny:sd"], "not tiny:<family>"),
        (["generate", "--prompts", str(not_utf8)], "is not UTF-8 text"),
        (["headhunter", "--samples", "-2"], "--samples"),
        (["headhunter", "--top-k", "0"], "--top-k"),
        (["bench", "pag", "--samples", "0"], "--samples"),
        (["bench", "compose", "--seeds", "0"], "--seeds"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_output_paths_are_checked_before_any_work(tmp_path):
    """Every output option: the right kind where it exists, and a place that can be written (missing
    parent folders are created when the output is written, so they are only tried here)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["generate", "a cat", "--out", str(a_file / "out")], "is a file, not a folder"),
        (["bench", "pag", "--json", str(a_file / "x.json")], "is a file, not a folder"),
        (["headhunter", "--out", str(a_file / "x.json")], "is a file, not a folder"),
        (["bench", "compose", "--json", str(a_file / "deeper" / "x.json")], "is a file, not a folder"),
        (["generate", "a cat", "--out", "/proc/attnctl-out"], "cannot be written"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["bench", "maps", "--json", str(locked / "new" / "x.json")], "cannot be written"))
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"] and not any(locked.iterdir())


def test_list_options_take_commas_and_repeats(tmp_path):
    small = ["bench", "draft", "--no-e2e", "--heads", "1", "--head-dim", "8", "--repeats", "1"]
    runs = []
    for i, lists in enumerate(
        (
            ["--tokens", "2048", "--sparsity", "0.5,0.75", "--backend", "gather,dense"],
            [
                "--tokens",
                "2048",
                "--sparsity",
                "0.5",
                "--sparsity",
                "0.75",
                "--backend",
                "gather",
                "--backend",
                "dense",
            ],
        )
    ):
        out = tmp_path / f"{i}.json"
        result = runner.invoke(app, [*small, *lists, "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs.append([(r["sparsity"], r["backend"]) for r in json.loads(out.read_text())["kernel"]["runs"]])
    assert runs[0] == runs[1] == [(0.5, "gather"), (0.5, "dense"), (0.75, "gather"), (0.75, "dense")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", "a red circle", "--threads", "0"], "error: Invalid value for '--threads'"),
        (["testbed", "train", "--ground-weight", "-1"], "error: Invalid value for '--ground-weight'"),
        (["bench", "compose", "--num-prompts", "abc"], "error: Invalid value for '--num-prompts'"),
        (["bogus"], "error: No such command 'bogus'."),
    ],
)
def test_the_command_reports_bad_option_values_in_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_a_bare_command_group_prints_its_help_and_no_error(capsys):
    for args in ([], ["bench"], ["testbed"]):
        with pytest.raises(SystemExit) as done:
            main(args)
        out, err = capsys.readouterr()
        assert done.value.code == 0 and "Usage" in out and "error" not in err, args


def test_threads_default_to_one_for_a_small_model(tmp_path, monkeypatch):
    """A model under SMALL_MODEL denoiser parameters runs on one thread unless --threads says otherwise;
    a large one keeps torch's own choice."""
    import torch

    from attnctl.cli import common

    base = ["generate", "a cat", "--model", "tiny:sd", "--steps", "1", "--out", str(tmp_path)]
    try:
        torch.set_num_threads(2)
        assert runner.invoke(app, base).exit_code == 0 and torch.get_num_threads() == 1
        assert runner.invoke(app, [*base, "--threads", "2"]).exit_code == 0 and torch.get_num_threads() == 2
        monkeypatch.setattr(common, "SMALL_MODEL", 1)  # every model counts as large
        torch.set_num_threads(2)
        assert runner.invoke(app, base).exit_code == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


# ---- found by the bad-input audit (benchmarks/audit.py) ----------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "a cat", "--threads", str(2**31)], "--threads"),  # torch's Overflow, a traceback
        (["generate", "a cat", "--seed", str(2**64)], "--seed"),  # torch's Overflow after loading
        (["generate", "a cat", "--steps", str(2**63)], "--steps"),  # numpy's "Maximum allowed size"
        (["generate", "a cat", "--height", str(10**30)], "--height"),  # dropped by SD's pipeline
        (["generate", "a cat", "--guidance", "nan"], "--guidance"),
        (["generate", "a cat", "--guidance", "inf"], "inf is not a finite number"),  # a NaN image
        (["bench", "maps", "--prompts", str(2**63)], "--prompts"),  # ran on and on
        (["headhunter", "--guidance", "1e400"], "inf is not a finite number"),
        (["testbed", "eval-detector", "--seed", str(10**30)], "--seed"),  # accepted
        (["testbed", "train", "--ground-weight", "inf"], "inf is not a finite number"),  # accepted
        (["ui", "--max-seconds", "inf"], "inf is not a finite number"),  # served with no time limit
        (["ui", "--max-pixels", str(10**30)], "--max-pixels"),
    ],
)
def test_numbers_past_their_type_or_not_finite_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err


def test_files_and_values_found_by_the_audit_end_with_one_line(tmp_path, monkeypatch):
    import attnctl.cli.headhunter
    import attnctl.cli.ui

    latin1 = tmp_path / "controls.json"
    latin1.write_bytes(b"[\xff]")
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()

    def no_loading(model, option="--model", **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(attnctl.cli.ui, "load_model", no_loading)
    monkeypatch.setattr(attnctl.cli.headhunter, "load_model", no_loading)
    for args, message in (
        (["generate", "a cat", "--controls", str(latin1)], "is not UTF-8 text"),  # the codec's words
        (["ui", "--controls", str(latin1)], "is not UTF-8 text"),
        (["ui", "--host", "no such host.invalid"], "--host 'no such host.invalid' is not an address"),
        (["bench", "draft", "--json", str(tmp_path / "d.json"), "--tokens", str(2**71)], "tokens=2361183"),
        (["headhunter", "--layers", ",", "--out", str(tmp_path / "h.json")], "--layers ',' names nothing"),
        (
            ["bench", "maps", "--model", str(empty_model), "--prompts", "1", "--seeds", "1"],
            "cannot load model",
        ),
    ):
        result = runner.invoke(app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_generate_keeps_a_height_given_alone(tmp_path):
    result = runner.invoke(
        app,
        ["generate", "a cat", "--model", "tiny:sd", "--steps", "1", "--height", "64", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "image.png").size[1] == 64  # SD's pipeline alone made its default
