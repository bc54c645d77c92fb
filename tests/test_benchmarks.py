"""The prepared GPU run, `benchmarks/gpu.py`: its code path on the CPU (--tiny) and its refusal to run
at full size without CUDA."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_gpu_run_tiny_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(GPU), "--tiny", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "gpu" and report["tiny"] and report["device"] == "cpu"
    assert {"torch", "diffusers", "commit", "wall_s"} <= set(report)
    sections = report["sections"]
    assert list(sections) == ["flux", "wan", "kernel", "nan"]
    for name, section in sections.items():
        assert "error" not in section and "skipped" not in section, (name, section)
        assert section["wall_s"] >= 0

    flux, wan = sections["flux"], sections["wan"]
    assert list(flux["variants"]) == ["plain", "maps", "regulation", "astar", "softpag"]
    assert list(wan["variants"]) == ["plain", "draft"]
    for section in (flux, wan):
        for variant, r in section["variants"].items():
            assert r["finite"] is True and _positive(r["seconds"]) and r["peak_mib"] > 0, variant
        assert set(section["ratios"]) == set(section["variants"]) - {"plain"}
        for ratios in section["ratios"].values():
            assert _positive(ratios["time_ratio"]) and _positive(ratios["memory_ratio"])
            assert ratios["growth_ratio"] is None or math.isfinite(ratios["growth_ratio"])
    assert flux["variants"]["astar"]["log"] == {"AStar": 1}  # one latent update in the step
    assert flux["tokens"] == 256 and wan["tokens"] == 3 * 16 * 32
    assert _positive(wan["draft_step_speedup"]) and _positive(wan["draft_run_speedup"])

    kernel = sections["kernel"]
    assert {r["backend"] for r in kernel["runs"]} == {"flex_eager", "gather"} and not kernel["skipped_tokens"]
    for r in kernel["runs"]:
        assert all(_positive(float(r[k])) for k in ("speedup", "attend_speedup", "attend_ms", "rel_l2"))

    nan = sections["nan"]
    assert set(nan["checks"]) == {"flux/float16", "wan/float16", "flux/bfloat16", "wan/bfloat16"}
    assert set(nan["checks"]["wan/float16"]) == {"plain", "maps", "softpag", "draft"}
    assert nan["not_finite_or_failed"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: gpu.py would run")
def test_gpu_run_without_cuda_says_so_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(GPU), "--json", str(tmp_path / "gpu.json")],
        capture_output=True, text=True, env=ENV, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "no CUDA device" in done.stderr
    assert done.stderr.count("\n") == 1 and not any(tmp_path.iterdir())
