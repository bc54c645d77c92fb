"""Real sizes: each control's peak memory and time against the plain pipeline, at the width users run.

Cost does not depend on the weights, so the denoiser has a real model's attention width and token
count with random weights; a few blocks stand for the full depth (every block costs the same).
Each variant runs in its own process (peak resident set after a reset, as `maps_memory.py`), after a
warm-up call (the first call's peak is in the JSON too); plain runs before and after the variants, and every ratio is against their mean.

    python benchmarks/realscale.py --model flux --json out.json [--variants maps,regulation]
    python benchmarks/realscale.py --model wan --frames 33 --json out.json

flux: FLUX.1's attention width (24 heads x 128) with 2 double- and 2 single-stream blocks, 4,096
image tokens (1024 px) and 512 text tokens, bf16, one denoising step, latent output. The text
encoders are attnctl's tiny ones (their cost is not under test), so the context embedding is 32 wide.
sd15: SD 1.5's UNet (the whole of it) at 512 px (a 64x64 latent), fp32, CFG, one step; tiny text encoder
(77 tokens, 32 wide) and VAE.
sdxl: SDXL's UNet (the whole of it) at 1024 px (a 128x128 latent), bf16, CFG, one step; tiny text
encoders (77 tokens, 32 + 32 wide) and VAE.
wan: Wan 2.1 1.3B's width (12 heads x 128, feed-forward 8,960) with 2 of its 30 blocks, 480x832 px
and 81 frames (32,760 video tokens; `--frames 33`: 14,040), 512 text tokens, CFG, bf16, one step;
tiny text encoder and VAE.
DraftAttention is measured on a sparse step (dense_steps=0; the first block dense, as the paper).
Each model's "depth" is the real model's (`benchmarks/gpu.py` builds it on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from maps_memory import MIB, _peak_rss_bytes, _reset_peak_rss, _rss_bytes, run_child  # noqa: E402

PROMPT = "a cat and a frog"
MODELS = {
    "flux": {
        "family": "flux",
        "config": {
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "axes_dims_rope": (16, 56, 56),
        },
        "depth": {"num_layers": 19, "num_single_layers": 38},
        "call": {"height": 256, "width": 256, "max_sequence_length": 512},  # tiny VAE: 4 px a token side
        "dtype": "bfloat16",
        "variants": ("plain", "maps", "regulation", "excite", "astar", "softpag", "layout"),
    },
    "sd15": {
        "family": "sd",
        "config": {  # SD 1.5's UNet; cross-attention from the tiny text encoder's 32-wide states
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "sample_size": 64,
        },
        "depth": {},
        "call": {"height": 128, "width": 128, "guidance_scale": 7.5},  # tiny VAE: 2 px a latent side
        "dtype": "float32",
        "variants": ("plain", "maps", "regulation", "excite", "astar", "softpag", "layout"),
    },
    "sdxl": {
        "family": "sdxl",
        "config": {  # SDXL's UNet; cross-attention from the tiny text encoders' 32 + 32-wide states
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 6 * 256 + 32,
            "norm_num_groups": 32,
            "sample_size": 128,
        },
        "depth": {},
        "call": {"height": 256, "width": 256, "guidance_scale": 5.0},  # tiny VAE: 2 px a latent side
        "dtype": "bfloat16",
        "variants": ("plain", "maps", "regulation", "softpag", "layout"),
    },
    "wan": {
        "family": "wan",
        "config": {"num_layers": 2, "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960},
        "depth": {"num_layers": 30},
        "call": {"num_frames": 81, "height": 480, "width": 832, "max_sequence_length": 512},
        "dtype": "bfloat16",
        "variants": ("plain", "maps", "softpag", "draft"),  # what attnctl supports on Wan
    },
}
VARIANTS = ("plain", "maps", "regulation", "excite", "astar", "softpag", "layout", "draft")


def controls(variant: str, layers: list) -> list:
    import attnctl

    words = ["cat", "frog"]
    first = layers[0].name
    return {
        "plain": [],
        "maps": [attnctl.AttentionMaps(words)],
        "regulation": [attnctl.AttentionRegulation(words)],
        "excite": [attnctl.AttendAndExcite(words, max_refinement=3)],
        "astar": [attnctl.AStar(words)],
        "softpag": [attnctl.SoftPAG({first: list(range(layers[0].heads // 2 or 1))}, u=1.0, scale=3.0)],
        "layout": [
            attnctl.Layout(
                [attnctl.Region([0, 0, 0.5, 1], "a cat"), attnctl.Region([0.5, 0, 1, 1], "a frog")]
            )
        ],
        "draft": [attnctl.DraftAttention(sparsity=0.9, dense_steps=0.0)],
    }[variant]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="flux")
    parser.add_argument(
        "--variants", help="comma-separated, from " + ", ".join(VARIANTS) + " (default: the model's)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames", type=int, help="video models: this many frames instead of the model's")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frames is not None and "num_frames" not in MODELS[args.model]["call"]:
        parser.error(f"--frames {args.frames}: only for the video models (wan)")
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.threads, args.frames)))
        return
    known = MODELS[args.model]["variants"]
    variants = [v for v in (args.variants or ",".join(known)).split(",") if v and v != "plain"]
    bad = [v for v in variants if v not in known]
    if bad:
        parser.error(f"--variants {','.join(bad)}: not one of {', '.join(known)}")
    runs = {"plain_before": _in_subprocess(args, "plain")}
    for v in variants:
        runs[v] = _in_subprocess(args, v)
        print(f"{v}: {runs[v]['peak_mib']:.0f} MiB, {runs[v]['seconds']:.1f} s", flush=True)
    runs["plain_after"] = _in_subprocess(args, "plain")
    plain_peak = (runs["plain_before"]["peak_mib"] + runs["plain_after"]["peak_mib"]) / 2
    plain_time = (runs["plain_before"]["seconds"] + runs["plain_after"]["seconds"]) / 2
    rows = {
        v: {"memory_ratio": runs[v]["peak_mib"] / plain_peak, "time_ratio": runs[v]["seconds"] / plain_time}
        for v in variants
    }
    print(f"{args.model}: plain {plain_peak:.0f} MiB, {plain_time:.1f} s per step ({args.threads} thread(s))")
    print(f"{'variant':<12}{'memory / plain':>16}{'time / plain':>14}")
    for v, r in rows.items():
        print(f"{v:<12}{r['memory_ratio']:>16.2f}{r['time_ratio']:>14.2f}")
    if args.json:
        report = {
            "benchmark": "realscale",
            "model": args.model,
            **MODELS[args.model],
            **(
                {}
                if args.frames is None
                else {"call": {**MODELS[args.model]["call"], "num_frames": args.frames}}
            ),
            "runs": runs,
            "ratios": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def _in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    frames = [] if args.frames is None else ["--frames", str(args.frames)]
    return run_child(
        __file__,
        ["--model", args.model, "--threads", str(args.threads), *frames, "--child", variant],
        variant,
    )


def measure(model: str, variant: str, threads: int, frames: int | None = None) -> dict:
    """Build the model, run one warm-up step, then measure one step."""
    import torch

    import attnctl
    from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

    torch.set_num_threads(threads)
    spec = MODELS[model]
    pipe = tiny_pipeline(spec["family"], dtype=getattr(torch, spec["dtype"]), **spec["config"])
    call = spec["call"] if frames is None else {**spec["call"], "num_frames": frames}
    kwargs = tiny_call_kwargs(spec["family"], num_inference_steps=1, output_type="latent", **call)
    with attnctl.control(pipe) as probe:
        layers = [x for x in probe.layers if x.kind in ("self", "joint")]
    chosen = controls(variant, layers)

    def generate() -> attnctl.Session:
        with attnctl.control(pipe, *chosen) as ctl:
            pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        return ctl

    _reset_peak_rss()
    generate()  # warm-up: the process's first call
    first_peak = _peak_rss_bytes()
    gc.collect()
    _reset_peak_rss()
    before = _rss_bytes()
    start = time.process_time()
    ctl = generate()
    seconds = time.process_time() - start
    peak = _peak_rss_bytes()
    return {
        "variant": variant,
        "controls": [c.to_dict() for c in chosen],
        "peak_mib": peak / MIB,
        "before_mib": before / MIB,
        "first_call_peak_mib": first_peak / MIB,
        "seconds": seconds,
        "time": "CPU time of the measured call (process_time)",
        "threads": threads,
        "log": {k: len(v) for k, v in ctl.log.items()},
    }


if __name__ == "__main__":
    main()
