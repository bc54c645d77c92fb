"""Kernel benchmark of DraftAttention (arXiv 2505.14708): dense SDPA vs the block-sparse backends.

`run_kernel_bench` times, in one run and on the same inputs, dense SDPA and `draft_attention`
with each sparse backend at each sparsity (batch 1, fp32 on the CPU by default; per case a warm-up
run that also absorbs torch.compile, then `repeats` dense and sparse runs back to back: medians, and
the median of the per-pair speedups). Sparse times are end to end: draft, block
selection, mask/plan building, permutation, attention, inverse permutation. The mask-building
part (draft + block mask + backend plan) and the attention alone (the backend's kernel on the built
plan: every backend gets the same block mask) are also timed on their own. On CUDA every timed call
ends with a synchronize. Accuracy is the relative L2 error of each sparse output against dense
attention.

Inputs are synthetic but structured like video attention: queries and keys share a smooth
(low-frequency) function of the token's (frame, row, column) position plus noise, so attention is
local-ish and the draft has something to find; purely random q/k would make every block equally
important and the error meaningless.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.controls import INT_MAX, _in_range, shown
from ..kernels import BACKENDS, DraftLayout, SparsePlan, draft_attention
from ..kernels.draft import check_sparsity, select_blocks
from ..kernels.sparse import _pairing_works

FRAME = (32, 64)  # tokens per frame (rows, columns) in the benchmark video: 2,048 tokens


def run_kernel_bench(
    tokens: Sequence[int] = (16384, 32768),
    sparsities: Sequence[float] = (0.5, 0.75, 0.9),
    heads: int = 8,
    head_dim: int = 64,
    repeats: int = 3,
    backends: Sequence[str] = ("flex", "gather"),
    pool: tuple[int, int] = (8, 16),
    seed: int = 0,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time dense SDPA against DraftAttention backends; print a table, return a JSON-able dict.

    tokens must be multiples of 2,048 (frames of 32 x 64 tokens). `threads` sets torch's intra-op
    threads for the run (restored after); the load average is recorded because on a shared CPU the
    many small parallel regions of the sparse paths suffer more from contention than one dense call.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed: an integer >= 1")
    _check_cases(tokens, sparsities, backends)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            results = _run(
                tokens, sparsities, heads, head_dim, repeats, backends, pool, seed, device, dtype, echo
            )
    finally:
        torch.set_num_threads(saved_threads)
    echo(format_table(results))
    return results


def _run(
    tokens: Sequence[int],
    sparsities: Sequence[float],
    heads: int,
    head_dim: int,
    repeats: int,
    backends: Sequence[str],
    pool: tuple[int, int],
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    rows, cols = FRAME
    device = torch.device(device)
    results: dict[str, Any] = {
        "config": {
            "heads": heads,
            "head_dim": head_dim,
            "batch": 1,
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "frame": [rows, cols],
            "pool": list(pool),
            "repeats": repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": [],
    }
    echo(f"progress (final table at the end):\n{_HEADER}")
    for n in tokens:
        frames = n // (rows * cols)
        shape = {"frames": frames, "height": rows, "width": cols, "pool": tuple(pool)}
        q, k, v = (x.to(device, dtype) for x in _video_qkv(frames, rows, cols, heads, head_dim, seed))
        dense = _synced(functools.partial(F.scaled_dot_product_attention, q, k, v))
        dense_out = dense()
        for sparsity in sparsities:
            for backend in backends:
                run = _time_sparse(q, k, v, dense, dense_out, shape, backend, sparsity, repeats)
                run.update(tokens=n, sparsity=sparsity, backend=backend)
                results["runs"].append(run)
                echo(_row(run))
    results["config"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _check_cases(tokens: Sequence[int], sparsities: Sequence[float], backends: Sequence[str]) -> None:
    """Every case is valid, before anything is timed or printed."""
    rows, cols = FRAME
    for n in tokens:
        if not _in_range(n, True, 1, None) or n % (rows * cols):
            raise ValueError(
                f"tokens={shown(n)} is not allowed: a positive multiple of {rows * cols} (frames of "
                f"{rows}x{cols}) of at most {INT_MAX}"
            )
    for sparsity in sparsities:
        check_sparsity(sparsity)
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not allowed: one of {', '.join(BACKENDS)}")


def run_pipeline_bench(
    frames: int = 61,
    size: int = 512,
    steps: int = 8,
    sparsity: float = 0.9,
    dense_steps: float = 0.25,
    num_layers: int = 8,
    head_dim: int = 64,
    backend: str = "auto",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A tiny Wan pipeline (untrained, `num_layers` blocks, heads of `head_dim`) end to end: dense
    against DraftAttention(sparsity, dense_steps, the first block dense), same seed and prompt.

    Times the denoising (pipeline call with latent output) and the VAE decode separately; end to
    end is their sum. Dense is timed before and after the sparse run (mean of both) so that a load
    change on a shared machine does not favour either side. PSNR compares the decoded videos."""
    from ..core.session import control
    from ..processors.draft import DraftAttention
    from ..tiny import tiny_call_kwargs, tiny_pipeline, video_tokens

    pipe = tiny_pipeline("wan", num_layers=num_layers, attention_head_dim=head_dim)
    kwargs = tiny_call_kwargs(
        "wan", num_frames=frames, height=size, width=size, num_inference_steps=steps, output_type="latent"
    )
    n_tokens = video_tokens("wan", **kwargs)
    draft = DraftAttention(sparsity=sparsity, dense_steps=dense_steps, backend=backend)
    load_before = [round(x, 2) for x in os.getloadavg()]

    def run(*controls: Any) -> tuple[torch.Tensor, float, float]:
        start = time.perf_counter()
        with control(pipe, *controls):
            latents = pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).frames
        denoise = time.perf_counter() - start
        start = time.perf_counter()
        video = _decode_wan(pipe, latents)
        return video, denoise, time.perf_counter() - start

    echo(f"end to end: tiny Wan, {num_layers} blocks, {n_tokens} video tokens, {steps} steps ...")
    dense, dense_t1, decode_t1 = run()
    sparse, sparse_t, decode_t2 = run(draft)
    _, dense_t2, decode_t3 = run()
    dense_t = (dense_t1 + dense_t2) / 2
    decode_t = statistics.median([decode_t1, decode_t2, decode_t3])
    mse = float(((dense - sparse) ** 2).mean())
    result = {
        "config": {
            "family": "wan (attnctl.tiny)",
            "num_layers": num_layers,
            "heads": pipe.transformer.config.num_attention_heads,
            "head_dim": head_dim,
            "video_tokens": n_tokens,
            "frames": frames,
            "size": size,
            "steps": steps,
            "control": draft.to_dict(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "dense_denoise_s": [round(dense_t1, 2), round(dense_t2, 2)],
        "sparse_denoise_s": round(sparse_t, 2),
        "decode_s": round(decode_t, 2),
        "denoise_speedup": round(dense_t / sparse_t, 3),
        "end_to_end_speedup": round((dense_t + decode_t) / (sparse_t + decode_t), 3),
        "psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf"),
    }
    echo(
        f"dense {dense_t:.1f} s, DraftAttention({sparsity}) {sparse_t:.1f} s, decode {decode_t:.1f} s: "
        f"denoising {result['denoise_speedup']}x, end to end {result['end_to_end_speedup']}x, "
        f"PSNR {result['psnr_db']} dB"
    )
    return result


def _decode_wan(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Wan latents → video in [0, 1], as WanPipeline's own output step does."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return (video / 2 + 0.5).clamp(0, 1)


def format_table(results: dict[str, Any]) -> str:
    """The benchmark's runs as a fixed-width text table."""
    cfg = results["config"]
    head = f"DraftAttention kernels: B=1 H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}, "
    head += f"{cfg.get('device', 'cpu')}, pool {cfg['pool']}, "
    head += f"median of {cfg['repeats']}, {cfg['threads']} threads, torch {cfg['torch']}, "
    head += f"load average {cfg['load_average_before'][0]} -> {cfg['load_average_after'][0]}"
    return "\n".join([head, _HEADER, *map(_row, results["runs"])])


_HEADER = (
    f"{'tokens':>7} {'sparsity':>8} {'backend':>8} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} "
    f"{'mask ms':>8} {'attn ms':>8} {'1st ms':>8} {'rel L2':>8}"
)


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['tokens']:>7} {r['sparsity']:>8} {r['backend']:>8} {r['dense_ms']:>9.1f} {r['sparse_ms']:>9.1f} "
        f"{r['speedup']:>6.2f}x {r['mask_ms']:>8.1f} {r['attend_ms']:>8.1f} {r['first_call_ms']:>8.0f} "
        f"{r['rel_l2']:>8.4f}"
    )


def _time_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense: Callable[[], torch.Tensor],
    dense_out: torch.Tensor,
    shape: dict[str, Any],
    backend: str,
    sparsity: float,
    repeats: int,
) -> dict[str, Any]:
    """One case: after a warm-up, `repeats` (dense, sparse) pairs timed back to back; the speedup
    is the median of the per-pair ratios, so that a load change on a shared machine during the run
    moves both sides of a ratio alike."""
    call = _synced(
        functools.partial(
            draft_attention, q, k, v, text=0, text_first=False, sparsity=sparsity, backend=backend, **shape
        )
    )
    start = time.perf_counter()
    out = call()  # warm-up; includes compiling flex for this shape
    first_ms = 1e3 * (time.perf_counter() - start)
    pairs = [(_times_ms(dense, 1, warmup=0)[0], _times_ms(call, 1, warmup=0)[0]) for _ in range(repeats)]
    build = _synced(functools.partial(_build_plan, q, k, v, backend, sparsity, shape))
    mask_ms = _median_ms(build, repeats)
    plan = build()
    qk, kk, vk = (plan.layout.to_kernel(x) for x in (q, k, v))
    attend_ms = _median_ms(
        _synced(functools.partial(plan.attend, qk, kk, vk, 1.0 / math.sqrt(q.shape[-1]))), repeats
    )
    out, dense_out = out.float(), dense_out.float()
    error = torch.linalg.vector_norm(out - dense_out) / torch.linalg.vector_norm(dense_out)
    return {
        "dense_ms": round(statistics.median(d for d, _ in pairs), 2),
        "sparse_ms": round(statistics.median(s for _, s in pairs), 2),
        "speedup": round(statistics.median(d / s for d, s in pairs), 2),
        "pairs_ms": [[round(d, 3), round(s, 3)] for d, s in pairs],
        "mask_ms": round(mask_ms, 2),
        "attend_ms": round(attend_ms, 2),
        "first_call_ms": round(first_ms, 1),
        "rel_l2": round(error.item(), 5),
    }


def _build_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, sparsity: float, shape: dict[str, Any]
) -> SparsePlan:
    """Draft + block selection + the backend's plan (what `draft_attention` builds per call)."""
    layout = DraftLayout.of(text=0, text_first=False, **shape)
    qk, kk = layout.to_kernel(q), layout.to_kernel(k)
    keep = select_blocks(layout, qk, kk, sparsity, 1.0 / math.sqrt(q.shape[-1]))
    plan = SparsePlan(backend, layout.kernel_block_mask(keep), layout)
    # Force the lazily built per-backend structures (those `attend` will use).
    if plan.backend == "gather":
        _ = plan._groups if _pairing_works(q, k, v) else plan._plain_groups
    elif plan.backend != "dense":
        _ = plan._flex_mask
    return plan


def _synced(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn, and on CUDA a synchronize after it: a timed call then ends when its kernels do."""
    if not torch.cuda.is_available():
        return fn

    def call() -> torch.Tensor:
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return statistics.median(_times_ms(fn, repeats, warmup))


def _times_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _video_qkv(
    frames: int, rows: int, cols: int, heads: int, dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, heads, frames*rows*cols, dim]: a shared smooth positional field plus noise."""
    gen = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(
        torch.arange(frames, dtype=torch.float32) / max(frames, 1),
        torch.arange(rows, dtype=torch.float32) / rows,
        torch.arange(cols, dtype=torch.float32) / cols,
        indexing="ij",
    )
    pos = torch.stack([t, y, x], -1).reshape(-1, 3)  # [tokens, 3]
    # Random Fourier features of the position, about one cycle per frame (or per clip in time):
    # nearby tokens align, and the structure survives pooling over 8 x 16 regions.
    freqs = torch.randn(heads, 3, dim, generator=gen) * torch.tensor([1.0, 2.0, 2.0])[:, None]
    phase = 2 * math.pi * torch.rand(heads, 1, dim, generator=gen)
    field = torch.cos(2 * math.pi * pos @ freqs + phase) * 1.5  # [heads, tokens, dim]
    q = field + 0.5 * torch.randn(field.shape, generator=gen)
    k = field + 0.5 * torch.randn(field.shape, generator=gen)
    v = torch.randn(field.shape, generator=gen)
    return q[None], k[None], v[None]
