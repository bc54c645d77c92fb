"""Two CPU processes through `accelerate launch` give what one process gives: the head search (same
selection and scores), `bench compose` (same records) and `generate --prompts` (each image once)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _attnctl(*args: str, processes: int, cwd: Path) -> str:
    """Run `python -m attnctl ARGS`, under `accelerate launch` for several processes (on CPU, so that
    both sides compute on the same device); returns stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "attnctl"]
    if processes > 1:
        with socket.socket() as s:  # a free port: other test runs may be using accelerate's default
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
            *("--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port)),
            *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnctl"),
        ]
    run = subprocess.run(
        [*command, *args, "--threads", "1"], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def test_head_search_on_two_processes_equals_one(tmp_path, tiny_clip_path):
    args = [
        *("headhunter", "--model", "tiny:sd", "--layers", "mid_block", "--steps", "2"),
        *("--samples", "3", "--batch-size", "2", "--rounds", "2", "--top-k", "2"),
        *("--objective", f"clip:{tiny_clip_path}"),
    ]
    _attnctl(*args, "--out", "one.json", processes=1, cwd=tmp_path)
    _attnctl(*args, "--out", "two.json", processes=2, cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["timing"]["processes"] == 2 and two["finished"]
    assert two["selected"] == one["selected"] and len(one["selected"]) == 4
    # Same candidates, picks and scores. A score may move in its last float32 bits: a process that
    # generated other candidates before has another memory layout, and CPU kernels can round
    # differently with it (one process launched alone gives the single-process scores bit for bit).
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        assert (a["base"], a["picked"], list(a["scores"])) == (b["base"], b["picked"], list(b["scores"]))
        for key in ("scores", "sample_scores"):
            x, y = (np.array(list(r[key].values())) for r in (a, b))
            assert np.allclose(x, y, rtol=1e-6, atol=0)
    rest = ("format", "objective", "settings", "selected", "finished")
    assert {k: one[k] for k in rest} == {k: two[k] for k in rest}
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_compose_on_two_processes_equals_one(tmp_path):
    args = ["bench", "compose", "--method", "none,pag", "--sizes", "2,3", "--num-prompts", "1", "--seeds", "2"]
    args += ["--steps", "2", "--quiet"]
    _attnctl(*args, "--json", "one.json", processes=1, cwd=tmp_path)
    log = _attnctl(*args, "--json", "two.json", processes=2, cwd=tmp_path)
    assert log.count("compose benchmark:") == 1  # one table, from the main process
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["config"]["processes"] == 2 and len(two["records"]) == 2 * 2 * 2

    def content(report):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report["records"]]

    assert content(two) == content(one)
    for m in ("none", "pag"):
        rates = ("all_present", "binding", "all_correct")
        assert {k: two["results"][m]["overall"][k] for k in rates} == {
            k: one["results"][m]["overall"][k] for k in rates
        }


def test_generate_prompts_on_two_processes_writes_each_image_once(tmp_path):
    prompts = ["a cat", "a frog", "a red cat", "a cat and a frog", "a blue frog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["generate", "--prompts", "prompts.txt", "--model", "tiny:sd", "--steps", "2", "--seed", "3"]
    _attnctl(*args, "--out", "one", processes=1, cwd=tmp_path)
    log = _attnctl(*args, "--out", "two", processes=2, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{i}.png" for i in range(5)]
    for i in range(5):
        assert log.count(f"wrote two/{i}.png") == 1  # by one process only
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i}.png")) for d in ("one", "two"))
        assert np.array_equal(a, b)
