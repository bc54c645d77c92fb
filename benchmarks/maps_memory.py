"""Peak memory of a Wan run with and without `AttentionMaps`, at >= 16k video tokens.

Requirement: recording maps keeps peak memory within 1.2x of the same run without recording.

Each variant runs in its own Python process, so one run's allocations cannot hide in the other's
peak. Memory is the process's peak resident set (VmHWM), the memory the operating system actually
gave it: torch's CPU tensors bypass Python's allocator, so tracemalloc would not see them. Before
the measured call the peak is reset (`/proc/self/clear_refs`, Linux), so the figure is the peak
*during generation*, not of model building; glibc's mmap threshold is fixed (`MMAP_THRESHOLD`) so
that the resident set follows the live tensors. On CUDA the figure is `torch.cuda.max_memory_allocated`.
Reported: the peak (the requirement's figure), and the growth during the call above the resident set
just before it (the tiny model's weights are small, so this shows the recording's own cost).

    python benchmarks/maps_memory.py [--frames 61 --size 512 --steps 2] [--json out.json]

Defaults: tiny Wan (`attnctl.tiny`), 61 frames at 512x512 -> 16 x 32 x 32 = 16,384 video tokens,
2 steps with CFG, latent output (the VAE decode is the same in both runs and not under test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a cat and a frog"
MIB = 1 << 20
# glibc: allocations above this size are mmapped and unmapped on free. A fixed threshold turns off
# glibc's adaptive one, under which freed tensors may stay resident in malloc's heap: without it the
# peak RSS of the same run varies by ~80 MiB between repeats here; with it, by < 1 MiB.
MMAP_THRESHOLD = 64 << 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--size", type=int, default=512, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=512, help="max_sequence_length (Wan's default: 512)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, record=args.child == "on")))
        return

    results = {mode: _in_subprocess(mode) for mode in ("off", "on")}
    off, on = results["off"], results["on"]
    ratio = on["peak_mib"] / off["peak_mib"]
    growth_ratio = on["growth_mib"] / off["growth_mib"]
    print(f"Wan (tiny), {off['video_tokens']:,} video tokens, {args.steps} steps, CFG, {args.device}")
    print(f"{'':<22}{'peak MiB':>10}{'growth MiB':>12}{'time s':>9}")
    for name, r in (("without maps", off), ("with AttentionMaps", on)):
        print(f"{name:<22}{r['peak_mib']:>10.1f}{r['growth_mib']:>12.1f}{r['seconds']:>9.1f}")
    print(f"ratio (with / without): peak {ratio:.3f}, growth during the call {growth_ratio:.3f}")
    print(f"requirement peak ratio <= 1.2: {'PASS' if ratio <= 1.2 else 'FAIL'}")
    if args.json:
        report = {
            "benchmark": "maps_memory",
            "family": "wan",
            "frames": args.frames,
            "height": args.size,
            "width": args.size,
            "steps": args.steps,
            "device": args.device,
            "without_maps": off,
            "with_maps": on,
            "peak_ratio": ratio,
            "growth_ratio": growth_ratio,
            "requirement": "peak_ratio <= 1.2",
            "passed": ratio <= 1.2,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def _in_subprocess(mode: str) -> dict:
    argv = list(sys.argv[1:])
    if "--json" in argv:  # only the parent writes the report
        i = argv.index("--json")
        del argv[i : i + 2]
    return run_child(__file__, [*argv, "--child", mode], mode)


def run_child(script: str, argv: list[str], label: str) -> dict:
    """Run a benchmark script in its own Python process (the repository root on its path, so it runs
    from a checkout without installing; glibc's mmap threshold fixed) and return the JSON of its last
    output line; exit with its error output if it fails."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    done = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        sys.exit(f"the '{label}' run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, record: bool) -> dict:
    """Build the tiny Wan pipeline, run it once small (warm-up), then measure one full-size run."""
    import torch

    import attnctl
    from attnctl.tiny import tiny_call_kwargs, tiny_pipeline, video_tokens

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pipe = tiny_pipeline("wan").to(args.device)
    sizes = {"num_frames": args.frames, "height": args.size, "width": args.size}
    kwargs = tiny_call_kwargs(
        "wan",
        num_inference_steps=args.steps,
        max_sequence_length=args.text_len,
        output_type="latent",
        **sizes,
    )
    controls = [attnctl.AttentionMaps()] if record else []

    def generate(**overrides: int) -> tuple[attnctl.Session, torch.Tensor]:
        with attnctl.control(pipe, *controls) as ctl:
            out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**kwargs, **overrides}).frames
        return ctl, out

    # Warm-up: first-call allocations of the libraries (kernels, thread pools) are not the run's.
    generate(num_frames=5, height=64, width=64, num_inference_steps=1)
    gc.collect()

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_bytes()
    start = time.perf_counter()
    ctl, out = generate()
    seconds = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    result = {
        "record": record,
        "video_tokens": video_tokens("wan", **sizes),
        "peak_mib": peak / MIB,
        "before_mib": before / MIB,
        "growth_mib": (peak - before) / MIB,
        "seconds": seconds,
        "latent_shape": list(out.shape),
        "memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) after reset",
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if record:
        result["maps"] = {w: list(ctl.maps[w].shape) for w in ctl.maps.words()}
    return result


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak resident set size to the current one
    except OSError:
        pass  # then the peak below is the process-lifetime peak (ru_maxrss), still an upper bound


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


if __name__ == "__main__":
    main()
