"""One prepared GPU run: the scale benchmarks at real depth in bf16, within a time budget, as JSON.

    benchmarks/gpu.sh [out.json]                      # a CUDA machine: under 8 minutes on an H100
    python benchmarks/gpu.py --tiny --json out.json   # the same code path on the CPU, tiny sizes

Sections, each with a deadline (its share of what is left of --budget); a case that would not fit
is recorded as "skipped: time budget", and the JSON is written after every section:

  flux    FLUX.1 at its real depth and width (`realscale.MODELS`: 19 double- and 38 single-stream
          blocks, 24 heads x 128), 1024 px (4,096 image tokens), 512 text tokens, bf16, random
          weights: one denoising step each of plain, maps, Attention Regulation, A-STAR (1 update)
          and SoftPAG. Peak memory (torch.cuda.max_memory_allocated, reset before every call) and
          time (synchronized; a warm-up call, then the median of up to --repeats) against plain.
  wan     Wan 2.1 1.3B (30 blocks, 12 heads x 128) at 480x832 px and 81 frames (32,760 video
          tokens), CFG, bf16: one denoising step plain against DraftAttention(sparsity 0.9) on a
          sparse step (the first block dense, as the paper): the step's speedup, and the whole-run
          speedup it implies with the paper's first 25% of steps dense.
  kernel  `attnctl.bench.draft` at 16k and 32k tokens with Wan's heads (12 x 128), bf16: dense SDPA
          against draft_attention with compiled FlexAttention and with attnctl's gather kernel,
          end to end and the attention alone on one block mask (`attend_ms`).
  nan     fp16 and bf16: every control realscale runs on FLUX and Wan, output latents (and maps)
          finite, at real width with 2 blocks (Wan: 17 frames); plain included, since a model with
          random weights may overflow by itself (then the control is not to blame).

The denoisers are built on the GPU in their dtype (`tiny_pipeline(device=, dtype=)`); text encoders
and VAE are attnctl's tiny ones (not under test), output latent. --tiny builds tiny models on the
CPU and runs every section with the same code (FlexAttention uncompiled), in well under a minute.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # realscale, maps_memory; attnctl from the checkout

import diffusers  # noqa: E402
import torch  # noqa: E402
from maps_memory import MIB, _peak_rss_bytes, _reset_peak_rss, _rss_bytes  # noqa: E402
from realscale import MODELS, PROMPT, controls  # noqa: E402

import attnctl  # noqa: E402
from attnctl.bench.draft import run_kernel_bench  # noqa: E402
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline, video_tokens  # noqa: E402

SHARES = {"flux": 0.3, "wan": 0.35, "kernel": 0.2, "nan": 0.15}  # of the time left, in section order
FLUX_VARIANTS = ("plain", "maps", "regulation", "astar", "softpag")
WAN_VARIANTS = ("plain", "draft")
SKIPPED = "skipped: time budget"
RESULTS = HERE / "results" / "gpu.json"


def specs(tiny: bool) -> dict[str, Any]:
    """What each section runs: the real configs of `realscale.MODELS` at full depth, or tiny ones."""
    flux, wan = MODELS["flux"], MODELS["wan"]
    if tiny:
        flux = {
            **flux,
            "config": {"num_layers": 1},
            "call": {"height": 64, "width": 64, "max_sequence_length": 32},
        }
        wan = {
            **wan,
            "config": {"num_layers": 2},
            "call": {"num_frames": 9, "height": 256, "width": 512, "max_sequence_length": 32},  # 12 blocks
        }
        kernel = dict(
            tokens=(2048,), sparsities=(0.9,), heads=2, head_dim=16, backends=("flex_eager", "gather")
        )
        return {"flux": flux, "wan": wan, "kernel": kernel, "nan": {"flux": flux, "wan": wan}}
    full = {
        name: {**m, "config": {**m["config"], **m["depth"]}} for name, m in (("flux", flux), ("wan", wan))
    }
    kernel = dict(
        tokens=(16384, 32768), sparsities=(0.5, 0.9), heads=12, head_dim=128, backends=("flex", "gather")
    )
    short_wan = {**wan, "call": {**wan["call"], "num_frames": 17}}  # 5 x 30 x 52 = 7,800 tokens
    return {**full, "kernel": kernel, "nan": {"flux": flux, "wan": short_wan}}


class Run:
    """The run's settings, and memory and timing on its device."""

    def __init__(self, tiny: bool, repeats: int) -> None:
        self.tiny, self.repeats = tiny, repeats
        self.device = torch.device("cpu" if tiny else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.specs = specs(tiny)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def memory_mark(self) -> int:
        """Reset the peak; return the memory in use now."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        _reset_peak_rss()
        return _rss_bytes()

    def memory_peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _peak_rss_bytes()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a check of the code)")
    parser.add_argument(
        "--json", type=Path, help=f"write the results here (default: {RESULTS}; --tiny: none)"
    )
    parser.add_argument(
        "--budget", type=float, default=400.0, help="seconds for the whole run (default: 400)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case after the warm-up")
    parser.add_argument(
        "--sections", default=",".join(SHARES), help="comma-separated, from " + ", ".join(SHARES)
    )
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SHARES]
    if bad:
        parser.error(f"--sections {','.join(bad)}: not one of {', '.join(SHARES)}")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device here; run it on a GPU machine, or pass --tiny for the CPU check")
    out = args.json or (None if args.tiny else RESULTS)
    if args.tiny:
        torch.set_num_threads(1)  # tiny models: per-op overhead, and a shared CPU
        diffusers.utils.logging.set_verbosity_error()  # fp16 on the CPU: "use an accelerator"
    # Every new shape recompiles the compiled FlexAttention; this run has more of them than a user's.
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    run = Run(args.tiny, args.repeats)
    report = header(run, args.budget)
    end = START + args.budget
    for i, name in enumerate(sections):
        now = time.monotonic()
        deadline = now + (end - now) * SHARES[name] / sum(SHARES[s] for s in sections[i:])
        print(f"== {name} ({deadline - now:.0f} s)", flush=True)
        interrupted = False
        try:
            result = SECTIONS[name](run, deadline) if deadline > now else {"skipped": SKIPPED}
        except KeyboardInterrupt:  # gpu.sh's hard time limit: keep what is done
            result, interrupted = {"skipped": "interrupted"}, True
        except Exception as error:  # noqa: BLE001 - recorded; the other sections still run
            result = {"error": _message(error)}
            print(f"{name}: {result['error']}", flush=True)
        run.free()
        result["wall_s"] = round(time.monotonic() - now, 2)
        report["sections"][name] = result
        report["wall_s"] = round(time.monotonic() - START, 2)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if interrupted:
            sys.exit(f"interrupted in section {name}" + (f"; wrote {out}" if out else ""))
    print(f"done in {report['wall_s']:.0f} s" + (f"; wrote {out}" if out else ""))


def header(run: Run, budget: float) -> dict[str, Any]:
    try:
        git = ["git", "-C", str(HERE), "rev-parse", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "benchmark": "gpu",
        "tiny": run.tiny,
        "device": torch.cuda.get_device_name() if run.cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "commit": commit,
        "dtype": str(run.dtype).removeprefix("torch."),
        "budget_s": budget,
        "repeats": run.repeats,
        "sections": {},
    }


def model_section(run: Run, name: str, variants: tuple[str, ...], deadline: float) -> dict[str, Any]:
    """Build the model, then per variant a warm-up call and timed calls; ratios against plain."""
    spec = run.specs[name]
    start = time.monotonic()
    pipe, layers = build(run, spec, run.dtype)
    run.sync()
    result: dict[str, Any] = {
        "family": spec["family"],
        "config": spec["config"],
        "call": spec["call"],
        "tokens": video_tokens(spec["family"], **spec["call"]),
        "build_s": round(time.monotonic() - start, 2),
        "variants": {},
    }
    longest = 0.0
    for variant in variants:
        if time.monotonic() + 2 * longest > deadline:
            result["variants"][variant] = {"skipped": SKIPPED}
            continue
        began = time.monotonic()
        result["variants"][variant] = r = measure(run, pipe, spec, controls(variant, layers), deadline)
        longest = max(longest, time.monotonic() - began)
        summary = (
            r.get("error") or f"{r['seconds']:.3f} s, peak {r['peak_mib']:,.0f} MiB, finite {r['finite']}"
        )
        print(f"{name}/{variant}: {summary}", flush=True)
    plain = result["variants"]["plain"]
    if "seconds" in plain:
        result["ratios"] = {
            v: {
                "time_ratio": r["seconds"] / plain["seconds"],
                "memory_ratio": r["peak_mib"] / plain["peak_mib"],
                "growth_ratio": r["growth_mib"] / plain["growth_mib"] if plain["growth_mib"] > 0 else None,
            }
            for v, r in result["variants"].items()
            if v != "plain" and "seconds" in r
        }
    return result


def flux_section(run: Run, deadline: float) -> dict[str, Any]:
    return model_section(run, "flux", FLUX_VARIANTS, deadline)


def wan_section(run: Run, deadline: float) -> dict[str, Any]:
    result = model_section(run, "wan", WAN_VARIANTS, deadline)
    if "draft" in result.get("ratios", {}):
        dense = attnctl.DraftAttention().dense_steps  # the paper's dense first fraction of the steps
        step = 1 / result["ratios"]["draft"]["time_ratio"]
        result["draft_step_speedup"] = step
        result["draft_run_speedup"] = 1 / (dense + (1 - dense) / step)
        result["draft_run_speedup_note"] = f"implied for a run whose first {dense:.0%} of steps are dense"
    return result


def kernel_section(run: Run, deadline: float) -> dict[str, Any]:
    spec = dict(run.specs["kernel"])
    result: dict[str, Any] = {"runs": [], "skipped_tokens": []}
    longest = 0.0
    for n in spec.pop("tokens"):
        if time.monotonic() + 2 * longest > deadline:
            result["skipped_tokens"].append(n)
            continue
        began = time.monotonic()
        bench = run_kernel_bench(tokens=(n,), repeats=run.repeats, device=run.device, dtype=run.dtype, **spec)
        longest = max(longest, time.monotonic() - began)
        result["config"] = bench["config"]
        for r in bench["runs"]:
            r["attend_speedup"] = r["dense_ms"] / r["attend_ms"]
        result["runs"] += bench["runs"]
    return result


def nan_section(run: Run, deadline: float) -> dict[str, Any]:
    """One call per control, fp16 then bf16: are the output latents (and maps) finite?"""
    result: dict[str, Any] = {"checks": {}}
    longest = 0.0
    for dtype in (torch.float16, torch.bfloat16):
        for name, spec in run.specs["nan"].items():
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            if time.monotonic() + 2 * longest > deadline:
                result["checks"][key] = {"skipped": SKIPPED}
                continue
            began = time.monotonic()
            pipe, layers = build(run, spec, dtype)
            checks: dict[str, Any] = {}
            for variant in spec["variants"]:
                try:
                    checks[variant] = finite(*call(pipe, spec, controls(variant, layers)))
                except Exception as error:  # noqa: BLE001 - recorded; the next control still runs
                    checks[variant] = _message(error)
            result["checks"][key] = checks
            print(f"nan {key}: {checks}", flush=True)
            del pipe
            run.free()
            longest = max(longest, time.monotonic() - began)
    result["not_finite_or_failed"] = [
        f"{key}/{v}"
        for key, checks in result["checks"].items()
        for v, ok in checks.items()
        if ok is not True and v != "skipped"
    ]
    return result


SECTIONS: dict[str, Callable[[Run, float], dict[str, Any]]] = {
    "flux": flux_section,
    "wan": wan_section,
    "kernel": kernel_section,
    "nan": nan_section,
}


def build(run: Run, spec: dict[str, Any], dtype: torch.dtype) -> tuple[Any, list]:
    """The pipeline, its denoiser built on the device in `dtype`, and its self/joint layers."""
    pipe = tiny_pipeline(spec["family"], device=run.device, dtype=dtype, **spec["config"])
    with attnctl.control(pipe) as probe:
        layers = [x for x in probe.layers if x.kind in ("self", "joint")]
    return pipe, layers


def call(pipe: Any, spec: dict[str, Any], chosen: list) -> tuple[torch.Tensor, attnctl.Session]:
    """One denoising step with the controls: (latent output, session)."""
    kwargs = tiny_call_kwargs(spec["family"], num_inference_steps=1, output_type="latent", **spec["call"])
    with attnctl.control(pipe, *chosen) as ctl:
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)[0]
    return out, ctl


def measure(run: Run, pipe: Any, spec: dict[str, Any], chosen: list, deadline: float) -> dict[str, Any]:
    """A warm-up call (compiles, caches), then up to run.repeats timed calls while the deadline
    allows (at least one): median time, peak memory of the calls, whether the output is finite.
    Errors, out of memory included, are recorded, not raised."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.perf_counter()
            call(pipe, spec, chosen)
            run.sync()
            warmup = time.perf_counter() - began
            times, peaks = [], []
            while len(times) < run.repeats and (not times or time.monotonic() + times[-1] < deadline):
                before = run.memory_mark()
                began = time.perf_counter()
                out, ctl = call(pipe, spec, chosen)
                run.sync()
                times.append(time.perf_counter() - began)
                peaks.append(run.memory_peak())
    except torch.cuda.OutOfMemoryError as error:
        return {"error": "out of memory: " + _message(error)}
    except Exception as error:  # noqa: BLE001 - recorded; the next variant still runs
        return {"error": _message(error)}
    finally:
        run.free()
    notes = sorted({str(w.message).splitlines()[0] for w in caught if "attnctl" in w.filename})
    return {
        "controls": [c.to_dict() for c in chosen],
        "seconds": statistics.median(times),
        "times_s": [round(t, 4) for t in times],
        "warmup_s": round(warmup, 3),
        "peak_mib": max(peaks) / MIB,
        "before_mib": before / MIB,
        "growth_mib": (max(peaks) - before) / MIB,
        "memory": "torch.cuda.max_memory_allocated" if run.cuda else "peak RSS (VmHWM) after reset",
        "finite": finite(out, ctl),
        "log": {k: len(v) for k, v in ctl.log.items()},
        **({"warnings": notes} if notes else {}),  # e.g. compiled FlexAttention failing: gather instead
    }


def finite(out: torch.Tensor, ctl: attnctl.Session) -> bool:
    """Whether the output latents and any recorded maps are all finite."""
    tensors = [out] + ([ctl.maps[w] for w in ctl.maps.words()] if ctl.maps is not None else [])
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _message(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


if __name__ == "__main__":
    main()
