"""DraftAttention kernels (arXiv 2505.14708): the checks of specs/draft-attention.md, small sizes."""

from __future__ import annotations

import concurrent.futures
import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnctl.bench.draft import run_kernel_bench
from attnctl.cli.bench import draft as bench_draft
from attnctl.kernels import DraftLayout, draft_attention, draft_block_mask, patch_permutation
from attnctl.kernels import draft as draft_mod
from attnctl.kernels import sparse as sparse_mod

FAST_BACKENDS = ["dense", "gather", "flex_eager"]

# (text, text_first, frames, height, width, pool): divisible frames, edge regions, text either side.
LAYOUTS = [
    (0, False, 2, 8, 16, (4, 8)),
    (5, True, 2, 6, 10, (4, 4)),
    (7, False, 3, 5, 9, (2, 4)),
    (3, True, 1, 7, 7, (8, 16)),  # one region, smaller than the pool in both directions
]


def _qkv(batch: int, heads: int, seq: int, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3)]


def _region_of(frames: int, height: int, width: int, pool: tuple[int, int]) -> torch.Tensor:
    """Draft block of each visual token in natural order, computed from coordinates."""
    ph, pw = pool
    rows, cols = math.ceil(height / ph), math.ceil(width / pw)
    f, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return (f * rows * cols + (y // ph) * cols + x // pw).reshape(-1)


def _token_mask(keep: torch.Tensor, text: int, text_first: bool, frames, height, width, pool) -> torch.Tensor:
    """The token-level boolean mask equivalent to a visual block mask [b, h, g, g], text dense."""
    region = _region_of(frames, height, width, pool)
    b, h = keep.shape[:2]
    n = region.numel()
    mask = torch.ones(b, h, text + n, text + n, dtype=torch.bool)
    vis = slice(text, text + n) if text_first else slice(0, n)
    mask[:, :, vis, vis] = keep[:, :, region[:, None], region[None, :]]
    return mask


def _visual(x: torch.Tensor, text: int, text_first: bool) -> torch.Tensor:
    return x[:, :, text:] if text_first else x[:, :, : x.shape[2] - text]


def _reference(q, k, v, *, text, text_first, frames, height, width, pool, sparsity):
    """Per batch element: the draft mask from its own visual q/k, then masked SDPA."""
    keeps = [
        draft_block_mask(
            _visual(q, text, text_first)[i].transpose(0, 1),
            _visual(k, text, text_first)[i].transpose(0, 1),
            frames=frames,
            height=height,
            width=width,
            pool=pool,
            sparsity=sparsity,
        )
        for i in range(q.shape[0])
    ]
    keep = torch.stack(keeps)
    mask = _token_mask(keep, text, text_first, frames, height, width, pool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), keep


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparsity_zero_is_dense(backend, layout):
    text, text_first, frames, height, width, pool = layout
    q, k, v = _qkv(2, 2, text + frames * height * width)
    out = draft_attention(
        q, k, v, text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool,
        sparsity=0.0, backend=backend,
    )  # fmt: skip
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_output_equals_masked_sdpa(backend, layout, sparsity):
    text, text_first, frames, height, width, pool = layout
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    q, k, v = _qkv(2, 3, text + frames * height * width, seed=1)
    ref, _ = _reference(q, k, v, sparsity=sparsity, **shape)
    out = draft_attention(q, k, v, sparsity=sparsity, backend=backend, **shape)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_compiled_flex_equals_masked_sdpa(layout):
    text, text_first, frames, height, width, pool = layout
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    q, k, v = _qkv(2, 2, text + frames * height * width, seed=2)
    ref, _ = _reference(q, k, v, sparsity=0.7, **shape)
    out = draft_attention(q, k, v, sparsity=0.7, backend="flex", **shape)
    assert (out - ref).abs().max() <= 1e-5


def test_gather_with_parallel_workers_equals_masked_sdpa(monkeypatch):
    # conftest pins one thread; with two, gather runs its chunks on two worker threads.
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(sparse_mod, "GATHER_BUDGET", 1 << 12)  # many small chunks
    try:
        shape = dict(text=5, text_first=True, frames=2, height=6, width=10, pool=(4, 4))
        q, k, v = _qkv(2, 3, 5 + 120, seed=9)
        ref, _ = _reference(q, k, v, sparsity=0.6, **shape)
        out = draft_attention(q, k, v, sparsity=0.6, backend="gather", **shape)
        assert torch.get_num_threads() == 2  # restored after the single-threaded phases
    finally:
        torch.set_num_threads(saved)
    assert (out - ref).abs().max() <= 1e-5


def test_text_rows_and_columns_stay_dense():
    shape = dict(text=6, text_first=False, frames=2, height=8, width=8, pool=(4, 4))
    q, k, v = _qkv(1, 2, 6 + 128, seed=3)
    out = draft_attention(q, k, v, sparsity=0.9, backend="gather", **shape)
    dense = F.scaled_dot_product_attention(q, k, v)
    # Text query rows attend to every token.
    assert (out[:, :, -6:] - dense[:, :, -6:]).abs().max() <= 1e-5
    # Text key columns are kept for every visual row: with value zero on all visual tokens, each
    # visual row still returns a (non-zero) mix of text values.
    v_text = v.clone()
    v_text[:, :, :-6] = 0
    out_text = draft_attention(q, k, v_text, sparsity=0.9, backend="gather", **shape)
    assert out_text[:, :, :-6].abs().sum(-1).min() > 0


def test_permutation_round_trips_and_follows_spec_order():
    frames, height, width, pool = 2, 5, 9, (2, 4)
    order, inverse = patch_permutation(frames, height, width, pool)
    n = frames * height * width
    assert torch.equal(order[inverse], torch.arange(n))
    assert sorted(order[order >= 0].tolist()) == list(range(n))
    # Frame-major, then region rows, region columns, then in-region rows and columns.
    f, rem = order[order >= 0] // (height * width), order[order >= 0] % (height * width)
    y, x = rem // width, rem % width
    key = torch.stack([f, y // 2, x // 4, y % 2, x % 4], 1).tolist()
    assert key == sorted(key)
    assert order.numel() == frames * 3 * 3 * 8  # edge regions padded to full blocks


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_layout_round_trips_exactly(layout):
    text, text_first, frames, height, width, pool = layout
    lay = DraftLayout.of(
        text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool
    )
    x = torch.randn(2, 3, lay.seq, 5)
    y = lay.to_kernel(x)
    assert y.shape[2] == lay.length and lay.length % lay.block == 0
    assert torch.equal(lay.from_kernel(y), x)
    # Padding slots are zero and every real token appears once.
    assert (y[:, :, ~lay.indices(x.device).key_valid] == 0).all()


@pytest.mark.parametrize(
    "layout",
    [(0, False, 2, 8, 16, (4, 8)), (16, True, 2, 4, 8, (2, 4)), (8, False, 1, 8, 8, (4, 2))],
)
def test_unpadded_layout_copies_match_the_token_index(layout):
    # Without padding, to_kernel/from_kernel copy whole regions (strided copies): the same as
    # gathering token by token through the layout's index, also into a scratch buffer and for
    # non-contiguous inputs.
    text, text_first, frames, height, width, pool = layout
    lay = DraftLayout.of(
        text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool
    )
    assert not lay.padded
    idx = lay.indices(torch.device("cpu"))
    x = torch.randn(3, lay.seq, 2, 5).transpose(1, 2)
    y = lay.to_kernel(x)
    assert torch.equal(y, x.index_select(2, idx.source))
    assert torch.equal(lay.to_kernel(x, "test_layout"), y)
    assert torch.equal(lay.from_kernel(y), y.index_select(2, idx.scatter))
    assert torch.equal(lay.from_kernel(y), x)
    x.requires_grad_(True)
    lay.from_kernel(lay.to_kernel(x, "test_layout")).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9, 0.95])
def test_kept_fraction_per_head(sparsity):
    frames, height, width, pool = 3, 10, 12, (4, 8)  # g = 3 * 3 * 2 = 18 blocks per side
    g = 18
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(frames * height * width, 4, 16, generator=gen)
    k = torch.randn(frames * height * width, 4, 16, generator=gen)
    keep = draft_block_mask(q, k, frames=frames, height=height, width=width, pool=pool, sparsity=sparsity)
    assert keep.shape == (4, g, g) and keep.dtype == torch.bool
    kept = keep.flatten(1).sum(1)
    assert (kept == round((1 - sparsity) * g * g)).all()
    assert ((kept - (1 - sparsity) * g * g).abs() <= 1).all()


def test_block_mask_keeps_the_global_top_of_the_average_pooled_draft():
    frames, height, width, pool = 2, 7, 11, (4, 4)  # partial edge regions in both directions
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(frames * height * width, 3, 8, generator=gen)
    k = torch.randn(frames * height * width, 3, 8, generator=gen)
    keep = draft_block_mask(q, k, frames=frames, height=height, width=width, pool=pool, sparsity=0.7)
    region = _region_of(frames, height, width, pool)
    g = int(region.max()) + 1
    count = torch.bincount(region, minlength=g).float()
    # Average over each region's real tokens (paper: average pooling, Sec. 3.2).
    q_draft = torch.zeros(g, 3, 8).index_add_(0, region, q) / count[:, None, None]
    k_draft = torch.zeros(g, 3, 8).index_add_(0, region, k) / count[:, None, None]
    draft = torch.softmax(torch.einsum("ihd,jhd->hij", q_draft, k_draft) / math.sqrt(8), dim=-1)
    for h in range(3):
        assert draft[h][keep[h]].min() >= draft[h][~keep[h]].max() - 1e-7


def test_ties_are_broken_deterministically():
    q = torch.zeros(2 * 8 * 8, 2, 4)  # every draft entry equal
    keep = draft_block_mask(q, q, frames=2, height=8, width=8, pool=(4, 4), sparsity=0.75)
    again = draft_block_mask(q, q, frames=2, height=8, width=8, pool=(4, 4), sparsity=0.75)
    assert torch.equal(keep, again) and keep.flatten(1).sum(1).tolist() == [16, 16]
    assert keep.flatten(1)[:, :16].all()  # lowest flat indices first


def test_block_mask_is_per_batch_element_and_reusable():
    shape = dict(text=4, text_first=True, frames=2, height=8, width=8, pool=(4, 4))
    q, k, v = _qkv(2, 2, 4 + 128, seed=6)
    q[1], k[1] = q[1].flip(2), k[1].roll(17, 2)  # a different draft for the second element
    ref, keep = _reference(q, k, v, sparsity=0.6, **shape)
    assert not torch.equal(keep[0], keep[1])
    out = draft_attention(q, k, v, sparsity=0.6, backend="gather", **shape)
    assert (out - ref).abs().max() <= 1e-5
    # A supplied block mask is used as is, and its prepared plan is cached until it changes.
    draft_mod._PLANS.clear()
    again = draft_attention(q, k, v, sparsity=0.6, backend="gather", block_mask=keep, **shape)
    assert (again - ref).abs().max() <= 1e-5
    draft_attention(q, k, v, sparsity=0.6, backend="gather", block_mask=keep, **shape)
    assert len(draft_mod._PLANS) == 1
    keep[:, :, 0] = False  # in-place edit bumps the version: a new plan
    draft_attention(q, k, v, sparsity=0.6, backend="gather", block_mask=keep, **shape)
    assert len(draft_mod._PLANS) == 2


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_query_block_with_nothing_kept_outputs_zeros(backend):
    shape = dict(text=0, text_first=False, frames=1, height=8, width=8, pool=(4, 4))
    q, k, v = _qkv(1, 1, 64, seed=7)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, 2] = False  # region 2 = rows 4..7, columns 0..3
    out = draft_attention(q, k, v, sparsity=0.5, backend=backend, block_mask=keep, **shape)
    region = _region_of(1, 8, 8, (4, 4))
    assert out[0, 0, region == 2].abs().max() == 0
    mask = _token_mask(keep, 0, False, 1, 8, 8, (4, 4))
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() <= 1e-5


def test_auto_falls_back_to_gather_when_compile_fails(monkeypatch):
    def broken():
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler")

        return fail

    monkeypatch.setattr(sparse_mod, "_flex_compiled", broken)
    monkeypatch.setattr(sparse_mod, "_FLEX_WORKS", {})
    monkeypatch.setattr(sparse_mod, "FLEX_PREFERRED", {"cpu": True})  # as on a GPU
    shape = dict(text=2, text_first=False, frames=2, height=4, width=8, pool=(4, 4))
    q, k, v = _qkv(1, 2, 2 + 64, seed=8)
    ref, _ = _reference(q, k, v, sparsity=0.5, **shape)
    with pytest.warns(UserWarning, match="using gather"):
        out = draft_attention(q, k, v, sparsity=0.5, backend="auto", **shape)
    assert (out - ref).abs().max() <= 1e-5
    assert sparse_mod._FLEX_WORKS == {("cpu", 16): False}
    layout = DraftLayout.of(**shape)
    assert sparse_mod.SparsePlan("auto", torch.ones(1, 1, 5, 5, dtype=torch.bool), layout).backend == "gather"


def test_auto_uses_gather_on_cpu():
    layout = DraftLayout.of(text=0, text_first=False, frames=1, height=8, width=8, pool=(4, 4))
    assert sparse_mod.SparsePlan("auto", torch.ones(1, 1, 4, 4, dtype=torch.bool), layout).backend == "gather"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"sparsity": "0.5"}, "sparsity='0.5'"),
        ({"pool": (0, 4)}, r"pool=\(0, 4\)"),
        ({"pool": (4,)}, r"pool=\(4,\)"),
        ({"frames": 0}, "frames=0"),
        ({"height": 2.5}, "height=2.5"),
        ({"text": -1}, "text=-1"),
        ({"text_first": 1}, "text_first=1"),
        ({"width": 9}, r"query=\(1, 2, 68, 8\)"),  # seq no longer text + frames*height*width
        ({"backend": "triton"}, "backend='triton'"),
        ({"scale": 0.0}, "scale=0.0"),
        ({"block_mask": torch.ones(2, 3, 3, dtype=torch.bool)}, "block_mask"),
    ],
)
def test_argument_validation(kwargs, match):
    args = dict(text=4, text_first=True, frames=2, height=4, width=8, pool=(4, 4), sparsity=0.5)
    args.update(kwargs)
    q, k, v = _qkv(1, 2, 4 + 64, dim=8)
    with pytest.raises(ValueError, match=match):
        draft_attention(q, k, v, **args)


def test_block_mask_validation():
    q = torch.randn(64, 2, 8)
    with pytest.raises(ValueError, match=r"query=\(64, 2, 8\).*tokens=128"):
        draft_block_mask(q, q, frames=2, height=8, width=8, pool=(4, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="key="):
        draft_block_mask(q, q[:, :1], frames=1, height=8, width=8, pool=(4, 4), sparsity=0.5)


def test_kernel_bench_smoke(tmp_path, capsys):
    result = run_kernel_bench(
        tokens=(2048,), sparsities=(0.5,), heads=1, head_dim=16, repeats=1, backends=("gather",)
    )
    (run,) = result["runs"]
    assert {"dense_ms", "sparse_ms", "speedup", "mask_ms", "rel_l2"} <= set(run)
    ((dense_ms, sparse_ms),) = run["pairs_ms"]  # one back-to-back (dense, sparse) pair per repeat
    assert run["speedup"] == pytest.approx(dense_ms / sparse_ms, rel=0.01)
    assert json.loads(json.dumps(result)) == result
    out = tmp_path / "bench.json"
    bench_draft(
        json_out=out,
        tokens=[2048],
        sparsity=[0.9],
        heads=1,
        head_dim=16,
        repeats=1,
        backend=["gather"],
        threads=1,
        kernel=True,
        e2e=True,
        e2e_layers=2,
        e2e_frames=5,
        e2e_size=64,
        e2e_steps=4,
    )
    written = json.loads(out.read_text())
    assert written["kernel"]["runs"][0]["sparsity"] == 0.9
    e2e = written["end_to_end"]
    assert e2e["config"]["video_tokens"] == 2 * 4 * 4  # (5 frames -> 2) x (64 px / 16)^2
    assert e2e["config"]["num_layers"] == 2
    assert e2e["end_to_end_speedup"] > 0
    assert e2e["psnr_db"] > 0 and len(e2e["dense_denoise_s"]) == 2
    assert "speedup" in capsys.readouterr().out


def _gather_plan(keep: torch.Tensor, shape: dict) -> sparse_mod.SparsePlan:
    layout = DraftLayout.of(**shape)
    return sparse_mod.SparsePlan("gather", layout.kernel_block_mask(keep), layout)


def _kinds(phases: list) -> set[str]:
    return {kind for phase in phases for kind, _ in phase}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("min_shared", [0, 1, 2])
def test_gather_pairs_equal_masked_sdpa(monkeypatch, layout, min_shared):
    # Random block masks: pairs of every overlap (with 0, also pairs sharing nothing), subsets
    # (no rest), padded blocks in the shared and the rest parts, a query block with no key block.
    monkeypatch.setattr(sparse_mod, "PAIR_MIN_SHARED", min_shared)
    text, text_first, frames, height, width, pool = layout
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    g = DraftLayout.of(**shape).visual_blocks
    keep = torch.rand(2, 3, g, g, generator=torch.Generator().manual_seed(11)) < 0.5
    keep[0, 0, g - 1] = False
    keep[1, 2, 0] = keep[1, 2, g - 1] & (torch.rand(g, generator=torch.Generator().manual_seed(4)) < 0.7)
    q, k, v = _qkv(2, 3, text + frames * height * width, seed=12)
    out = draft_attention(q, k, v, sparsity=0.5, backend="gather", block_mask=keep, **shape)
    mask = _token_mask(keep, text, text_first, frames, height, width, pool)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() <= 1e-5
    work = _gather_plan(keep, shape)._groups
    phases = work.phases
    if g > 1:
        assert {"write", "merge"} <= _kinds(phases)  # the paired path really ran
    # The output buffer is not zero-filled: each query block is written by the first phase or zeroed.
    written = torch.cat([group[0].flatten() for _, group in phases[0]])
    blocks = keep.shape[0] * keep.shape[1] * DraftLayout.of(**shape).blocks
    assert sorted(written.tolist() + work.unwritten.tolist()) == list(range(blocks))
    if text:  # the (dense, padded) text block is shared by every pair: masked pair calls
        assert any(group[2] is not None for phase in phases for kind, group in phase if kind == "write")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
def test_gather_pairs_in_other_dtypes(dtype, tol):
    # Pairs, merges and padded blocks in float64 (merged in float64) and bfloat16 (merged in float32).
    text, text_first, frames, height, width, pool = LAYOUTS[1]
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    g = DraftLayout.of(**shape).visual_blocks
    keep = torch.rand(1, 2, g, g, generator=torch.Generator().manual_seed(5)) < 0.6
    q, k, v = _qkv(1, 2, text + frames * height * width, seed=6)
    mask = _token_mask(keep, text, text_first, frames, height, width, pool)
    ref = F.scaled_dot_product_attention(*(x.double() for x in (q, k, v)), attn_mask=mask)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    out = draft_attention(qd, kd, vd, sparsity=0.4, backend="gather", block_mask=keep, **shape)
    assert out.dtype == dtype
    assert {"write", "merge"} <= _kinds(_gather_plan(keep, shape)._groups.phases)
    assert (out.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("layout", LAYOUTS[:2])
def test_gather_gradients_equal_masked_sdpa(layout):
    # Under autograd the gather path runs unpaired, on fresh tensors instead of scratch buffers.
    text, text_first, frames, height, width, pool = layout
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    g = DraftLayout.of(**shape).visual_blocks
    keep = torch.rand(2, 2, g, g, generator=torch.Generator().manual_seed(8)) < 0.5
    q, k, v = (x.requires_grad_() for x in _qkv(2, 2, text + frames * height * width, seed=9))
    out = draft_attention(q, k, v, sparsity=0.5, backend="gather", block_mask=keep, **shape)
    mask = _token_mask(keep, text, text_first, frames, height, width, pool)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (out - ref).abs().max() <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert (grad - ref_grad).abs().max() <= 1e-5


def test_gather_scratch_buffers_are_not_shared_with_results_or_threads():
    # Kernel-layout copies, tables and gathers reuse per-thread scratch buffers on CPU: a result
    # must survive later calls, and calls from concurrent threads must not see each other's data.
    text, text_first, frames, height, width, pool = LAYOUTS[2]
    shape = dict(text=text, text_first=text_first, frames=frames, height=height, width=width, pool=pool)
    inputs = [_qkv(1, 2, text + frames * height * width, seed=s) for s in range(4)]

    def run(qkv):
        return draft_attention(*qkv, sparsity=0.6, backend="gather", **shape)

    first = run(inputs[0])
    kept = first.clone()
    expected = [run(qkv) for qkv in inputs]
    assert torch.equal(first, kept)
    with concurrent.futures.ThreadPoolExecutor(4) as pool_:
        for _ in range(3):
            for out, ref in zip(pool_.map(run, inputs), expected, strict=True):
                assert torch.equal(out, ref)


def test_gather_pairs_sharing_nothing_merge_exactly(monkeypatch):
    # Every query block keeps only its own key block: pairs share nothing, so each output comes
    # from its rest alone, merged with the "no keys" log-sum-exp (-inf) of the pair.
    monkeypatch.setattr(sparse_mod, "PAIR_MIN_SHARED", 0)
    shape = dict(text=0, text_first=False, frames=1, height=6, width=10, pool=(4, 4))
    keep = torch.eye(6, dtype=torch.bool)[None, None].repeat(1, 2, 1, 1)
    keep[0, 1, 3, 3] = False  # and a query block with nothing kept
    assert _kinds(_gather_plan(keep, shape)._groups.phases) == {"merge"}
    q, k, v = _qkv(1, 2, 60, seed=13)
    out = draft_attention(q, k, v, sparsity=0.5, backend="gather", block_mask=keep, **shape)
    mask = _token_mask(keep, 0, False, 1, 6, 10, (4, 4))
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() <= 1e-5
    assert out[0, 1, _region_of(1, 6, 10, (4, 4)) == 3].abs().max() == 0


def test_pair_blocks_is_greedy_on_shared_key_blocks(monkeypatch):
    sets = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    sets = torch.stack([sets, sets.flip(0)])  # second head: same blocks, reversed order
    monkeypatch.setattr(sparse_mod, "PAIR_MIN_SHARED", 1)
    # 0 and 1 share 3 blocks; then 2 and 3 share 1. Indices are flat over (head, block).
    assert sparse_mod._pair_blocks(sets).tolist() == [[1, 0, 3, 2], [5, 4, 7, 6]]
    monkeypatch.setattr(sparse_mod, "PAIR_MIN_SHARED", 2)
    assert sparse_mod._pair_blocks(sets).tolist() == [[1, 0, -1, -1], [-1, -1, 7, 6]]


def test_gather_without_pairing_where_the_lse_op_cannot_run(monkeypatch):
    # Gradients (and non-CPU devices, different value size) take the unpaired plan: same result.
    shape = dict(text=5, text_first=True, frames=2, height=6, width=10, pool=(4, 4))
    g = DraftLayout.of(**shape).visual_blocks
    keep = torch.rand(1, 2, g, g, generator=torch.Generator().manual_seed(14)) < 0.6
    q, k, v = _qkv(1, 2, 5 + 120, seed=15)
    assert sparse_mod._pairing_works(q, k, v)
    assert not sparse_mod._pairing_works(q, k, v.clone().requires_grad_())
    assert not sparse_mod._pairing_works(q, k, v[..., :8])
    paired = draft_attention(q, k, v, sparsity=0.5, backend="gather", block_mask=keep, **shape)
    monkeypatch.setattr(sparse_mod, "_pairing_works", lambda *args: False)
    plain = draft_attention(q, k, v, sparsity=0.5, backend="gather", block_mask=keep.clone(), **shape)
    assert _kinds(_gather_plan(keep, shape)._plain_groups.phases) == {"plain"}
    assert (plain - paired).abs().max() <= 1e-5


def test_release_free_memory_hands_freed_heap_back():
    """Tensors of a few MB come from glibc's heap once a larger one was freed; freed between kept ones
    they stay resident until the heap is trimmed."""
    import os
    import sys

    from attnctl.kernels.memory import release_free_memory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not sys.platform.startswith("linux"):
        assert release_free_memory() is None  # nothing to do elsewhere
        return
    big = torch.ones(4 << 20)  # 16 MB, mapped on its own; freeing it raises glibc's mmap threshold
    del big
    keep, free = [], []
    for i in range(40):
        (keep if i % 2 else free).append(torch.ones(2 << 18))  # 2 MB each, from the heap now
    free.clear()
    before = rss()
    release_free_memory()
    assert before - rss() >= 30 << 20  # the 20 freed tensors' 40 MB, less what glibc keeps
    assert all(t.eq(1).all() for t in keep)  # what is in use stays
