"""Layout math: boxes on token grids, which region owns each image token, and attention by query
groups that each see their own keys (AnyMS, Yu et al., arXiv 2512.23537; regional prompting).

A box covers the cells of a token grid whose centres lie inside it (nearest-neighbour sampling of
the box mask: hard masks at every resolution and aspect ratio). Each image token belongs to at most
one region, the highest-priority one whose box covers it (AnyMS resolves overlaps by priority, not
by summing). A `Plan` splits the queries of one attention call into groups, each with one set of
keys; `grouped_attention` runs the model's own kernel once per group on the gathered queries and
keys, so no N x N mask or logits tensor is ever built and unmasked flash kernels stay usable.
Splitting the queries adds no attention work: every query still meets each of its keys once.
`Plan.bias` gives the same visibility as an additive bias for a block of queries (explicit logits,
attention maps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

Box = tuple[float, float, float, float]


def box_cells(box: Box, height: int, width: int) -> torch.Tensor:
    """[height * width] bool: the cells of a row-major grid whose centres lie in the normalised box.

    A box smaller than a cell keeps the cell under its centre, so that no region vanishes at the
    coarse levels of a UNet."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not inside.any():
        cy = min(height - 1, int((y0 + y1) / 2 * height))
        cx = min(width - 1, int((x0 + x1) / 2 * width))
        inside[cy, cx] = True
    return inside.flatten()


def owners(boxes: Sequence[Box], priorities: Sequence[int], height: int, width: int) -> torch.Tensor:
    """[height * width] long: per cell the index of the highest-priority box covering it, -1 where
    none does. Of equal priorities the later box wins (it lies on top, as when painting)."""
    owner = torch.full((height * width,), -1, dtype=torch.long)
    best = torch.full((height * width,), float("-inf"))
    for i, (box, priority) in enumerate(zip(boxes, priorities, strict=True)):
        cells = box_cells(box, height, width) & (priority >= best)
        owner[cells] = i
        best[cells] = float(priority)
    return owner


def pixel_masks(boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """[1, n, height, width] float 0/1 box masks at pixel resolution: the form of one entry of
    diffusers' `ip_adapter_masks` (what `IPAdapterMaskProcessor.preprocess` returns, per adapter)."""
    masks = torch.zeros(1, len(boxes), height, width)
    for i, box in enumerate(boxes):
        masks[0, i] = box_cells(box, height, width).view(height, width).float()
    return masks


Positions = slice | torch.Tensor  # sequence positions: a contiguous run, or indices


class Plan:
    """Query groups of one attention call and the keys each group sees (sequence positions)."""

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor]], queries: int, keys: int):
        self.group_of = torch.full((queries,), -1, dtype=torch.long)
        self.visible = torch.zeros(len(groups), keys, dtype=torch.bool)
        for g, (q, k) in enumerate(groups):
            self.group_of[q] = g
            self.visible[g, k] = True
        if (self.group_of < 0).any() or sum(len(q) for q, _ in groups) != queries:
            raise ValueError("a layout plan must put every query in exactly one group")  # a bug
        # in sequence order: contiguous runs become views, and keys keep the model's order
        self.groups = [(_compact(q.sort().values), _compact(k.sort().values)) for q, k in groups]
        self._on: dict[torch.device, list[tuple[Positions, Positions]]] = {}

    def on(self, device: torch.device) -> list[tuple[Positions, Positions]]:
        """The groups with index tensors on `device` (moved once per device)."""
        if device not in self._on:
            self._on[device] = [(_to(q, device), _to(k, device)) for q, k in self.groups]
        return self._on[device]

    def bias(self, queries: slice, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[n, Sk] additive bias for the query positions `queries`: 0 seen, -inf hidden."""
        seen = self.visible[self.group_of[queries]].to(device)
        return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


@dataclasses.dataclass
class TextLayout:
    """Where the prompt and the region prompts sit in one call (key positions; queries of joint
    attention use the same positions) and where the generated image's queries and keys are."""

    queries: int  # Sq
    keys: int  # Sk
    image_q: slice  # generated image queries, one per grid cell
    image_k: slice  # image keys (empty for cross-attention)
    base: slice  # the prompt's own text keys
    regions: list[slice]  # each region prompt's text keys

    @property
    def other_keys(self) -> torch.Tensor:
        """Keys that are neither image nor text keys (AuraFlow's register tokens): every query sees
        them, as in the model."""
        return _others(self.keys, [_range(self.image_k), _range(self.base), *map(_range, self.regions)])

    @property
    def joint(self) -> bool:
        """Text tokens are queries too (SD3 / FLUX joint attention)."""
        return self.queries == self.keys and self.image_k.stop > self.image_k.start


def plain_plan(lay: TextLayout) -> Plan:
    """The model's own attention over the prompt: region prompts unseen; in joint attention each
    region prompt's tokens attend among themselves only."""
    base_keys = _cat(_range(lay.image_k), lay.other_keys, _range(lay.base))
    if not lay.joint:
        return Plan([(torch.arange(lay.queries), base_keys)], lay.queries, lay.keys)
    region_queries = [_range(r) for r in lay.regions]
    groups = [(_others(lay.queries, region_queries), base_keys)]
    groups += [(q, q) for q in region_queries]
    return Plan(groups, lay.queries, lay.keys)


def regional_plan(
    lay: TextLayout,
    owner: torch.Tensor,
    cells: list[torch.Tensor],
    words: list[list[int]] | None,
    hide: bool,
    crop_merge: bool,
) -> Plan:
    """Who sees what where the layout acts.

    crop_merge: the text a query in region j's box sees is region j's alone (AnyMS's local
    decoupling: the region's stream replaces the prompt's there, one box per query by priority): its
    own words in the prompt (`words[j]`, positions relative to the prompt's start) and its prompt's
    tokens. A region without prompt tokens (sub_prompts=False) sees the prompt instead, less the other
    regions' words when `hide`. Queries outside every box see the prompt, less every region's words
    when `hide` (base_outside="other_regions").
    Without crop_merge (mask-and-sum) every image query sees the image keys and the prompt; region
    streams are added afterwards. Image queries always see every image key (and the other keys:
    registers).
    Joint attention: prompt tokens see the image and the prompt; region j's tokens see themselves
    and the image tokens `cells[j]` (their box, as owned under crop_merge).
    """
    image = _range(lay.image_q)
    base = _range(lay.base)
    image_keys = _cat(_range(lay.image_k), lay.other_keys)
    groups = []
    for o in sorted(set(owner.tolist())) if crop_merge else [-1]:
        queries = image[owner == o] if crop_merge else image
        own = _range(lay.regions[o]) if o >= 0 else image.new_zeros(0)
        if crop_merge and len(own):
            mine = [p for p in words[o] if p < len(base)] if words else []  # a truncated prompt
            text = _cat(base[mine], own)
        elif crop_merge and hide and words:
            drop = {p for j, pos in enumerate(words) if j != o for p in pos}
            text = base[[p for p in range(len(base)) if p not in drop]]
        else:
            text = base
        groups.append((queries, _cat(image_keys, text)))
    if lay.joint:
        region_queries = [_range(r) for r in lay.regions]
        groups.append((_others(lay.queries, [image, *region_queries]), _cat(image_keys, base)))
        for j, q in enumerate(region_queries):
            groups.append((q, _cat(q, image[cells[j]])))
    return Plan([(q, k) for q, k in groups if len(q)], lay.queries, lay.keys)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    kernel: Callable[..., torch.Tensor],
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention [B, H, Sq, Dv] in which each group's queries see only their keys: the kernel
    (q, k, v [B, H, S, D] -> [B, H, Sq, Dv]) once per group on gathered tensors. `key_mask`, the
    model's own mask of keys for every query ([B or 1, H or 1, 1, Sk], e.g. text padding), goes to
    the kernel as a fourth argument, restricted to each group's keys."""
    out = v.new_empty(*q.shape[:3], v.shape[-1])
    for queries, keys in plan.on(q.device):
        args = (take(q, queries), take(k, keys), take(v, keys))
        put(out, queries, kernel(*args) if key_mask is None else kernel(*args, key_columns(key_mask, keys)))
    return out


def key_columns(mask: torch.Tensor, keys: Positions) -> torch.Tensor:
    """mask[..., keys] of a mask whose last dimension is the keys."""
    return mask[..., keys] if isinstance(keys, slice) else mask.index_select(-1, keys.to(mask.device))


def take(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """x[:, :, positions] of a [B, H, S, D] tensor (a view for a contiguous run)."""
    return x[:, :, positions] if isinstance(positions, slice) else x.index_select(2, positions)


def put(out: torch.Tensor, positions: Positions, part: torch.Tensor) -> None:
    """out[:, :, positions] = part, in place."""
    if isinstance(positions, slice):
        out[:, :, positions] = part
    else:
        out.index_copy_(2, positions, part.to(out.dtype))


def _compact(positions: torch.Tensor) -> Positions:
    """A contiguous run of positions as a slice (so that gathering it is a view)."""
    n = len(positions)
    if n and int(positions[-1]) - int(positions[0]) == n - 1 and bool((positions.diff() == 1).all()):
        return slice(int(positions[0]), int(positions[0]) + n)
    return positions


def _to(positions: Positions, device: torch.device) -> Positions:
    return positions if isinstance(positions, slice) else positions.to(device)


def _range(s: slice) -> torch.Tensor:
    return torch.arange(s.start, s.stop)


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.long() for p in parts])


def _others(total: int, taken: list[torch.Tensor]) -> torch.Tensor:
    """Positions in [0, total) not in any of `taken`."""
    free = torch.ones(total, dtype=torch.bool)
    for t in taken:
        free[t] = False
    return free.nonzero().flatten()
