"""Block-sparse attention backends for DraftAttention (arXiv 2505.14708; specs/draft-attention.md).

All backends take q, k, v in the kernel layout of `layout.DraftLayout` ([batch, heads, length, d],
blocks of `layout.block` tokens, padding slots zero) and a block mask [batch, heads, G, G] (True =
query block attends to key block); padding keys are always masked out. A query row with no key
left outputs zeros, as SDPA and FlexAttention do for fully masked rows.

- "flex": compiled FlexAttention, BlockMask from `BlockMask.from_kv_blocks` (a few ms) plus a
  `mask_mod` that encodes the same blocks, so the result is right even where flex runs eagerly.
- "flex_eager": the same BlockMask, uncompiled: eager flex ignores the block indices and applies
  only `mask_mod` over the full L x L scores (exact but slow and memory hungry; a check, not a path).
- "gather": pure PyTorch. Query blocks are grouped by how many key blocks they keep; per group
  (in chunks of bounded memory) the kept key/value blocks are gathered with `index_select` into
  reused scratch buffers and one batched SDPA call runs, so no work is padded. A key-validity mask is
  passed only for rows whose kept blocks hold padding. On CPU (no gradients) query blocks of the
  same (batch, head) are first paired by the key blocks they share: each pair attends to its
  shared blocks in one call with both query blocks stacked (256 rows use the CPU flash kernel's
  faster 64-row tile, and the shared keys are gathered once), then each block to the rest of its
  own blocks; the two partial results are merged exactly through their log-sum-exps.
- "dense": reference, SDPA with the equivalent token-level boolean mask, one (batch, head) at a time.
- "auto": on CPU gather (measured faster than compiled flex here); elsewhere compiled flex where
  torch.compile works (found by trying it once per device type and block size, cached), else gather.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layout import DraftLayout
from .memory import scratch, take, threads

# Elements (rows x keys x head_dim) gathered per SDPA call on the gather path (4 MB each of keys and
# values in fp32, per worker). Small enough that the gathered blocks are still near the core when
# SDPA reads them, large enough to keep per-call overhead low: at 32k tokens, 8 heads, 90% sparsity
# the call took 2.18 s at 2^20, 2.25-2.29 s at 2^19 and 2^18, 2.38 s at 2^21 and 2.59 s at 2^23.
GATHER_BUDGET = 1 << 20

# Query blocks are paired only when they share at least this many kept key blocks (see _pair_blocks).
PAIR_MIN_SHARED = 2

# Rounds of mutual-best matching in _pair_blocks: later rounds pair few more blocks.
PAIR_ROUNDS = 8

# Where compiled flex works, is it the faster choice? Not on CPU: with 128-token blocks its kernel
# tiles keys by 128 while SDPA tiles by 512; `attnctl.bench.draft` on the 2-core CPU, 32k tokens,
# 8 heads, 10% of blocks kept: gather 6.4x over dense SDPA, compiled flex 3.0x (and slower than
# dense at 50%). Other devices: flex (its GPU kernels are the block-sparse path; not measured here).
FLEX_PREFERRED: dict[str, bool] = {"cpu": False}

# Per (device type, block size): does compiled flex work here? Filled by the first "auto" call.
_FLEX_WORKS: dict[tuple[str, int], bool] = {}


class SparsePlan:
    """A block mask prepared for one backend; reusable across calls with the same mask."""

    def __init__(self, backend: str, keep: torch.Tensor, layout: DraftLayout) -> None:
        key = (keep.device.type, layout.block)
        if backend == "auto":
            prefer = FLEX_PREFERRED.get(keep.device.type, True)
            backend = "flex" if prefer and _FLEX_WORKS.get(key, True) else "gather"
            self.auto = backend == "flex" and key not in _FLEX_WORKS
        else:
            self.auto = False
        self.backend, self.keep, self.layout = backend, keep, layout

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Block-sparse attention in the kernel layout: [batch, heads, length, dv]."""
        if self.backend == "gather":
            return self._gather(q, k, v, scale)
        if self.backend == "dense":
            return _dense_attention(q, k, v, self.keep, self.layout, scale)
        if self.backend == "flex_eager":
            with warnings.catch_warnings():
                # Eager flex on purpose (a correctness check): silence its "use torch.compile" advice.
                warnings.simplefilter("ignore", UserWarning)
                return _flex_eager()(q, k, v, block_mask=self._flex_mask, scale=scale)
        if not self.auto:
            return _flex_compiled()(q, k, v, block_mask=self._flex_mask, scale=scale)
        # First "auto" use on this device type and block size: try compiled flex, fall back to
        # gather if torch.compile fails (no C++ compiler, unsupported block size, ...).
        key = (q.device.type, self.layout.block)
        try:
            out = _flex_compiled()(q, k, v, block_mask=self._flex_mask, scale=scale)
            _FLEX_WORKS[key] = True
        except Exception as error:  # noqa: BLE001 - any compile failure means "use gather"
            warnings.warn(
                f"compiled FlexAttention failed ({type(error).__name__}); using gather", stacklevel=2
            )
            _FLEX_WORKS[key] = False
            self.backend = "gather"
            out = self._gather(q, k, v, scale)
        self.auto = False
        return out

    def _gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        groups = self._groups if _pairing_works(q, k, v) else self._plain_groups
        return _gather_attention(q, k, v, groups, self.layout, scale)

    @functools.cached_property
    def _flex_mask(self):  # -> BlockMask
        with threads(1):  # many tiny ops: see memory.threads
            return flex_block_mask(self.keep, self.layout)

    @functools.cached_property
    def _groups(self) -> GatherWork:
        with threads(1):  # many tiny ops: see memory.threads
            return _gather_groups(self.keep, self.layout, pair=True)

    @functools.cached_property
    def _plain_groups(self) -> GatherWork:
        """Without pairing: where the log-sum-exp op is missing or gradients are needed."""
        with threads(1):
            return _gather_groups(self.keep, self.layout, pair=False)


def flex_block_mask(keep: torch.Tensor, layout: DraftLayout):  # -> BlockMask
    """FlexAttention BlockMask for a kernel block mask [b, h, G, G], exact in eager mode too.

    Kept blocks without padding keys are "full" (compiled flex skips mask_mod there); kept blocks
    with padding keys are "partial" (mask_mod drops the padding). The mask_mod encodes all blocks,
    because eager flex ignores the block indices and applies only mask_mod.
    """
    from torch.nn.attention.flex_attention import BlockMask

    idx = layout.indices(keep.device)
    block, valid = layout.block, idx.key_valid
    partial = keep & idx.block_padded
    full = keep & ~idx.block_padded

    def kept(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // block, kv_idx // block] & valid[kv_idx]

    # Separate tensors for partial and full indices: aliasing them broke inductor's CPU codegen
    # ("kv_indices was not declared") with torch 2.13.
    return BlockMask.from_kv_blocks(
        *_block_lists(partial),
        *_block_lists(full),
        BLOCK_SIZE=block,
        mask_mod=kept,
        seq_lengths=(layout.length, layout.length),
    )


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) per query block, kept indices first: FlexAttention's kv_num/kv_indices."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.sort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return count, order.to(torch.int32)


@functools.cache
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process (5-14 s on a 2-core CPU); new shapes recompile, new masks do not.
    # Past dynamo's recompile limit flex would run eagerly: still exact (mask_mod), but slow.
    return torch.compile(flex_attention, dynamic=False)


def _flex_eager():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

# The gather path's work: phases run in order, each a list of (kind, group) with group = (rows,
# cols [n, c], slots) as made by _by_count. Within a phase every query block is in at most one
# group, so its chunks are independent. kind "plain": rows [n], whole kept sets, plain SDPA, output
# written. "write": rows [n, 2], the key blocks a pair shares, both blocks' queries in one call,
# output and log-sum-exp written. "merge": rows [n], the rest of the rows' key blocks, merged into
# the stored output and log-sum-exp.
Phases = list[list[tuple[str, Group]]]


class GatherWork(NamedTuple):
    phases: Phases
    unwritten: torch.Tensor  # query blocks the first phase does not write: zeroed before it runs


def _gather_groups(keep: torch.Tensor, layout: DraftLayout, pair: bool) -> GatherWork:
    """The gather path's work for a block mask [b, h, G, G] (see Phases); unpaired unless `pair`.

    With pairing, the first phase runs unpaired blocks whole ("plain") and each pair's shared key
    blocks ("write"); the second merges each paired block's remainder ("merge"). (Pairing the
    remainders again was measured 5% slower at 32k tokens and 90% sparsity: small shared parts and
    one more merge per block.) Key blocks holding no real key are dropped first: they add nothing,
    and a partial result with every key masked would carry a meaningless log-sum-exp into the merge.
    """
    b, h, G, _ = keep.shape
    valid = layout.indices(keep.device).key_valid.view(G, layout.block)
    todo = (keep & valid.any(1)).reshape(b * h * G, G)  # key blocks each query block still lacks
    rows = torch.arange(b * h * G, device=keep.device)
    if not pair:
        plain = [("plain", group) for group in _by_count(rows, todo, valid)]
        return GatherWork([plain] if plain else [], (~todo.any(1)).nonzero().squeeze(1))
    partner = _pair_blocks(todo.view(b * h, G, G)).flatten()
    paired = partner >= 0
    mate = todo[partner.clamp(min=0)] & paired[:, None]  # the partner's blocks (none if unpaired)
    first = (paired & (rows < partner)).nonzero().squeeze(1)
    shared = _by_count(torch.stack([first, partner[first]], 1), todo[first] & mate[first], valid)
    phases = [
        [("plain", group) for group in _by_count(rows[~paired], todo[~paired], valid)]
        + [("write", group) for group in shared]
    ]
    unwritten = ~(todo & (mate | ~paired[:, None])).any(1)
    todo = todo & ~mate & paired[:, None]  # what each paired block still lacks: its remainder
    phases.append([("merge", group) for group in _by_count(rows, todo, valid)])
    return GatherWork([phase for phase in phases if phase], unwritten.nonzero().squeeze(1))


def _by_count(rows: torch.Tensor, sets: torch.Tensor, valid: torch.Tensor) -> list[Group]:
    """Rows grouped by how many key blocks their `sets` ([n, G] bool) hold: (rows, cols [n, c], slots).

    cols are the key blocks in ascending order, as indices into all (batch * heads * G) blocks.
    `slots` ([n, c * block] bool, valid keys) is None when no block of the group holds padding, so
    SDPA runs unmasked. Rows with an empty set are left out (their output stays zero). (Rounding
    counts up to fewer, padded groups measured slower.)
    """
    counts, G = sets.sum(1), sets.shape[1]
    groups = []
    for c in torch.unique(counts).tolist():
        if c == 0:
            continue
        sel = (counts == c).nonzero().squeeze(1)
        # nonzero() is row-major, so each row's c columns come out together and ascending.
        cols = sets[sel].nonzero()[:, 1].view(-1, c)
        slots = valid[cols].flatten(1)
        padded = ~slots.all(1)
        head = rows[sel] if rows.dim() == 1 else rows[sel, 0]  # a pair shares its (batch, head)
        cols += (head // G * G)[:, None]  # key block index in (batch * heads * G)
        if not padded.all():
            groups.append((rows[sel[~padded]], cols[~padded], None))
        if padded.any():
            groups.append((rows[sel[padded]], cols[padded], slots[padded]))
    return groups


def _pair_blocks(sets: torch.Tensor) -> torch.Tensor:
    """Partner of each query block ([m, G] indices within its (batch, head); -1: unpaired).

    Greedy matching on the number of shared key blocks, vectorised: in each round every unpaired
    block picks the unpaired block it shares most with, and blocks that pick each other pair up
    (the best remaining pair always does, so each round makes progress). Blocks sharing fewer than
    PAIR_MIN_SHARED key blocks are never paired: the saving is proportional to the shared blocks,
    while every pair costs a merge.
    """
    m, G, _ = sets.shape
    f = sets.float()
    shared = f @ f.transpose(1, 2)  # [m, G, G]: exact integer counts
    shared.diagonal(dim1=1, dim2=2).fill_(-1)
    shared.masked_fill_(shared < PAIR_MIN_SHARED, -1)
    own = torch.arange(G, device=sets.device).expand(m, G)
    partner = torch.full((m, G), -1, dtype=torch.long, device=sets.device)
    free = torch.ones(m, G, dtype=torch.bool, device=sets.device)
    for _ in range(PAIR_ROUNDS):
        best_score, best = shared.max(2)
        mutual = (best.gather(1, best) == own) & (best_score >= 0) & free
        if not mutual.any():
            break
        partner = torch.where(mutual, best, partner)
        free &= ~mutual
        # Paired blocks leave the matching: their rows and columns of the scores drop to -1 in
        # place (cheaper than masking the whole [m, G, G] table each round).
        shared.masked_fill_(mutual[:, :, None], -1).masked_fill_(mutual[:, None, :], -1)
    return torch.where(partner >= 0, partner + (torch.arange(m, device=sets.device) * G)[:, None], partner)


def _pairing_works(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can the pairs/rests path run: CPU flash op (it returns the log-sum-exp), no gradients?

    The op needs equal head sizes; autograd through it and the merge is not set up (plain SDPA is).
    """
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return (
        q.device.type == "cpu"
        and not grad
        and q.shape[-1] == v.shape[-1]
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    work: GatherWork,
    layout: DraftLayout,
    scale: float,
) -> torch.Tensor:
    b, h, _, d = q.shape
    dv = v.shape[-1]
    G, block = layout.blocks, layout.block
    q_blocks = q.reshape(b * h * G, block, d)
    k_blocks = k.reshape(b * h * G, block * d)
    v_blocks = v.reshape(b * h * G, block * dv)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    # The tables are scratch buffers unless autograd records the writes into them.
    def table(shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return q.new_empty(shape, dtype=dtype) if grad else scratch(q, shape, name, dtype)

    # Not zero-filled: every query block is written by the first phase or zeroed here.
    out = table((b * h * G, block, dv), "out").index_fill_(0, work.unwritten, 0)
    dim = max(d, dv)
    phases = [
        [(kind, chunk) for kind, group in phase for chunk in _chunks([group], block, dim)]
        for phase in work.phases
    ]
    chunks = [chunk for phase in phases for _, chunk in phase]
    if not chunks:
        return out.view(b, h, G * block, dv)
    # Log-sum-exp of the output so far (-inf: no keys yet, so a merge keeps only the new part).
    lse = None
    if any(kind != "plain" for phase in phases for kind, _ in phase):
        # In the flash op's accumulation type (float32 for half types, else the query's).
        lse = table((b * h * G, block), "lse", dtype=torch.promote_types(q.dtype, torch.float32))
        lse.fill_(float("-inf"))
    tables = (q_blocks, k_blocks, v_blocks, out, lse)

    def attend_chunks(todo: queue.SimpleQueue, sdpa_threads: int) -> None:
        while True:
            try:
                kind, chunk = todo.get_nowait()
            except queue.Empty:
                return
            _attend_chunk(kind, chunk, tables, block, scale, sdpa_threads)

    for phase in phases:
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for item in phase:
            todo.put(item)
        workers = min(torch.get_num_threads(), len(phase))
        if workers <= 1 or grad:
            attend_chunks(todo, torch.get_num_threads())
        else:
            # Chunks of a phase are independent and write disjoint output rows: one single-threaded
            # worker per core pulling from a queue. 25% faster than one caller with multi-threaded
            # ops on this shared 2-core CPU (no per-op thread barrier; a descheduled worker just
            # takes fewer chunks).
            with threads(1):
                jobs = [_pool(workers).submit(attend_chunks, todo, 1) for _ in range(workers)]
                for job in jobs:
                    job.result()
    return out.view(b, h, G * block, dv)


def _attend_chunk(
    kind: str,
    chunk: Group,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    block: int,
    scale: float,
    sdpa_threads: int,
) -> None:
    """Attention of one chunk of query blocks over their gathered key/value blocks, into `out`.

    kind (see Phases) "plain": SDPA, output written. "write" and "merge": the CPU flash op, which
    also returns the log-sum-exp; rows [n, 2] stack both query blocks of a pair over their shared
    keys. A merge is exact softmax over the union of disjoint key sets: with l = logaddexp(l1, l2),
    out = o1 * exp(l1 - l) + o2 * exp(l2 - l) = lerp(o2, o1, sigmoid(l1 - l2)). Merges are the last
    phase, so their log-sum-exp is not stored.
    """
    (rows, cols, slots), (q_blocks, k_blocks, v_blocks, out, lse) = chunk, tables
    n, c = cols.shape
    d, dv = q_blocks.shape[-1], out.shape[-1]
    flat_rows, source = rows.flatten(), cols.flatten()
    with threads(1):
        # Into per-thread buffers reused by every chunk and call (see memory.scratch): with fresh
        # allocations the gather was ~4x slower than the copy.
        queries = take(q_blocks, 0, flat_rows, "gather_q").view(n, 1, -1, d)
        keys = take(k_blocks, 0, source, "gather_k").view(n, 1, c * block, d)
        values = take(v_blocks, 0, source, "gather_v").view(n, 1, c * block, dv)
    if kind == "plain":
        mask = None if slots is None else slots.view(n, 1, 1, c * block)
        with threads(sdpa_threads):
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        with threads(1):
            out.index_copy_(0, rows, o[:, 0])
        return
    with threads(1):
        # The flash op takes only additive masks of the query's dtype.
        mask = None
        if slots is not None:
            mask = queries.new_zeros(n, 1, 1, c * block).masked_fill_(~slots.view(n, 1, 1, -1), float("-inf"))
    with threads(sdpa_threads):
        o, l2 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, values, dropout_p=0.0, is_causal=False, attn_mask=mask, scale=scale
        )
    with threads(1):
        o, l2 = o.view(-1, block, dv), l2.view(-1, block)
        if kind == "write":
            out.index_copy_(0, flat_rows, o)
            lse.index_copy_(0, flat_rows, l2)
            return
        # l1 = -inf (no keys yet): weight 0, the new part alone.
        weight = torch.sigmoid_(lse.index_select(0, flat_rows).sub_(l2)).unsqueeze_(-1)
        merged = torch.lerp(o.to(lse.dtype), out.index_select(0, flat_rows).to(lse.dtype), weight)
        out.index_copy_(0, flat_rows, merged.to(out.dtype))


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attnctl-gather")


def _chunks(groups: list, block: int, dim: int):
    """Split groups into chunks of at most GATHER_BUDGET gathered elements (at least one row)."""
    for rows, cols, slots in groups:
        step = max(1, GATHER_BUDGET // (cols.shape[1] * block * dim))
        for i in range(0, rows.shape[0], step):
            part = slice(i, i + step)
            yield rows[part], cols[part], None if slots is None else slots[part]


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, layout: DraftLayout, scale: float
) -> torch.Tensor:
    b, h = q.shape[:2]
    block_of = torch.arange(layout.length, device=q.device) // layout.block
    valid = layout.indices(q.device).key_valid
    keep = keep.expand(b, h, -1, -1)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for i in range(b):
        for j in range(h):
            mask = keep[i, j][block_of[:, None], block_of[None, :]] & valid
            out[i, j] = F.scaled_dot_product_attention(q[i, j], k[i, j], v[i, j], attn_mask=mask, scale=scale)
    return out
