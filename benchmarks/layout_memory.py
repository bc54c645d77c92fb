"""Peak memory of a FLUX run with and without a two-region `Layout`, at >= 16k image tokens.

The layout attends per query group on the model's own kernel, so it must not build anything of
N x N size: a dense float mask over the joint sequence alone would be (N + text)^2 * 4 bytes.
Measured as in `maps_memory.py` (one process per variant, peak resident set during the call).

    python benchmarks/layout_memory.py [--size 512 --steps 1] [--json out.json]

Defaults: tiny FLUX (`attnctl.tiny`) at 512x512 -> 128 x 128 = 16,384 image tokens, one step,
latent output; region prompts at FLUX's default 512 T5 tokens each.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from maps_memory import MIB, _peak_rss_bytes, _reset_peak_rss, _rss_bytes, run_child

PROMPT = "a cat and a frog"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, layout=args.child == "on")))
        return
    off, on = (_in_subprocess(args, mode) for mode in ("off", "on"))
    tokens = on["image_tokens"] + on["text_tokens"]
    dense_mask_mib = tokens * tokens * 4 / MIB
    print(f"FLUX (tiny), {off['image_tokens']:,} image tokens, {args.steps} step(s)")
    print(f"{'':<20}{'peak MiB':>10}{'growth MiB':>12}{'time s':>9}{'text tokens':>13}")
    for name, r in (("plain", off), ("with Layout", on)):
        print(
            f"{name:<20}{r['peak_mib']:>10.1f}{r['growth_mib']:>12.1f}{r['seconds']:>9.1f}{r['text_tokens']:>13}"
        )
    print(
        f"peak ratio {on['peak_mib'] / off['peak_mib']:.3f}; a dense float mask alone: {dense_mask_mib:,.0f} MiB"
    )
    if args.json:
        report = {
            "benchmark": "layout_memory",
            "family": "flux",
            "size": args.size,
            "steps": args.steps,
            "plain": off,
            "layout": on,
            "peak_ratio": on["peak_mib"] / off["peak_mib"],
            "dense_float_mask_mib": dense_mask_mib,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def _in_subprocess(args: argparse.Namespace, mode: str) -> dict:
    return run_child(__file__, ["--size", str(args.size), "--steps", str(args.steps), "--child", mode], mode)


def measure(args: argparse.Namespace, layout: bool) -> dict:
    import torch

    import attnctl
    from attnctl.tiny import tiny_call_kwargs, tiny_pipeline, video_tokens

    torch.set_num_threads(1)
    pipe = tiny_pipeline("flux")
    regions = [attnctl.Region((0, 0, 0.5, 1), "a cat"), attnctl.Region((0.5, 0, 1, 1), "a frog")]
    controls = [attnctl.Layout(regions, region_tokens="all")] if layout else []
    kwargs = tiny_call_kwargs("flux", num_inference_steps=args.steps, output_type="latent")

    def generate(size: int) -> attnctl.Session:
        with attnctl.control(pipe, *controls) as ctl:
            pipe(
                PROMPT,
                generator=torch.Generator().manual_seed(0),
                **{**kwargs, "height": size, "width": size},
            )
        return ctl

    generate(64)  # warm-up: first-call allocations of the libraries are not the run's
    gc.collect()
    _reset_peak_rss()
    before = _rss_bytes()
    start = time.perf_counter()
    ctl = generate(args.size)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    return {
        "layout": layout,
        "image_tokens": video_tokens("flux", height=args.size, width=args.size),
        "text_tokens": ctl.text_len,
        "peak_mib": peak / MIB,
        "before_mib": before / MIB,
        "growth_mib": (peak - before) / MIB,
        "seconds": seconds,
        "memory": "peak RSS (VmHWM) after reset",
    }


if __name__ == "__main__":
    main()
