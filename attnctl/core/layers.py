"""Layer selection: one type, resolved once to concrete module names.

A selection names blocks or modules by path ("up_blocks.1", "transformer_blocks.3.attn",
"*.attn2"), by block index (3 = the fourth block holding attention, in model order), by kind
(self / cross / joint) and optionally by heads. Patterns are anchored at dot boundaries, so
"blocks.1" matches "blocks.1.attn1" but never "blocks.10.attn1". Resolving gives each layer with
the heads chosen in it (`SelectedLayer`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

from ..families.base import KINDS, LayerInfo
from .controls import check, shown

MAX_LISTED = 40  # layers named in a "no layer matches" error; `attnctl layers` lists every one


@dataclasses.dataclass(frozen=True)
class SelectedLayer(LayerInfo):
    """A resolved layer: its `LayerInfo` and the head indices chosen in it (None: every head)."""

    selected_heads: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    patterns: tuple[str | int, ...] | None = None  # None: every layer of the allowed kinds
    kinds: tuple[str, ...] | None = None  # None: every kind
    heads: tuple[int, ...] | None = None  # None: every head

    def __post_init__(self) -> None:
        if self.patterns is not None:
            ok = len(self.patterns) > 0 and all(
                (isinstance(p, str) and p.strip())
                or (isinstance(p, int) and not isinstance(p, bool) and p >= 0)
                for p in self.patterns
            )
            check(
                ok, "layers", list(self.patterns), "module/block paths (strings) or block indices (ints >= 0)"
            )
        if self.kinds is not None:
            check(
                len(self.kinds) > 0 and all(k in KINDS for k in self.kinds),
                "kinds",
                list(self.kinds),
                f"any of {KINDS}",
            )
        if self.heads is not None:
            ok = len(self.heads) > 0 and all(isinstance(h, int) and h >= 0 for h in self.heads)
            check(ok, "heads", list(self.heads), "a non-empty list of head indices >= 0")

    def resolve(self, layers: Sequence[LayerInfo]) -> list[SelectedLayer]:
        """The layers selected, in model order, with their selected heads; an error listing what
        exists when nothing matches."""
        pool = [layer for layer in layers if self.kinds is None or layer.kind in self.kinds]
        if self.patterns is not None:
            blocks = list(dict.fromkeys(layer.block for layer in layers))
            chosen = set()
            for p in self.patterns:
                if isinstance(p, int):
                    check(p < len(blocks), "layers", p, f"a block index below {len(blocks)}")
                    chosen |= {layer.name for layer in pool if layer.block == blocks[p]}
                else:
                    chosen |= {layer.name for layer in pool if _matches(layer.name, p)}
            pool = [layer for layer in pool if layer.name in chosen]
        if not pool:
            raise ValueError(self._nothing_matches(layers))
        if self.heads is not None:
            too_many = [layer.name for layer in pool if max(self.heads) >= layer.heads]
            check(not too_many, "heads", list(self.heads), f"head indices below the heads of {too_many[:3]}")
        fields = [f.name for f in dataclasses.fields(LayerInfo)]
        return [
            SelectedLayer(**{f: getattr(layer, f) for f in fields}, selected_heads=self.heads)
            for layer in pool
        ]

    def _nothing_matches(self, layers: Sequence[LayerInfo]) -> str:
        """One line: what was asked, and the layers of the asked kinds there are (the first ones)."""
        kinds = " or ".join(self.kinds) if self.kinds is not None else ""
        asked = "every layer" if self.patterns is None else f"layers={shown(list(self.patterns))}"
        there = [layer for layer in layers if self.kinds is None or layer.kind in self.kinds]
        if not there:
            return f"{asked} is not allowed: this model has no {kinds} attention layer"
        names = ", ".join(layer.name for layer in there[:MAX_LISTED])
        more = f" and {len(there) - MAX_LISTED} more" if len(there) > MAX_LISTED else ""
        return (
            f"{asked} is not allowed: no {kinds + ' ' if kinds else ''}attention layer matches; this model's "
            f"{kinds + ' ' if kinds else ''}layers: {names}{more} (`attnctl layers MODEL` lists them)"
        )

    def __str__(self) -> str:
        parts = []
        if self.patterns is not None:
            parts.append(f"layers={list(self.patterns)}")
        if self.kinds is not None:
            parts.append(f"kinds={list(self.kinds)}")
        if self.heads is not None:
            parts.append(f"heads={list(self.heads)}")
        return "LayerSelection(" + ", ".join(parts) + ")"


def _matches(name: str, pattern: str) -> bool:
    """Whether `pattern` names the module `name` or one of its ancestors (whole dot segments only)."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)


def one_grid(layers: Sequence[LayerInfo]) -> bool:
    """Whether every attention layer attends at the denoiser's own token grid: a DiT (a UNet's levels
    downsample)."""
    return all(layer.downsample == 1 for layer in layers)


def working_layers(
    layers: Sequence[LayerInfo], height: int, width: int, min_side: int = 1, depth: float = 1.0
) -> list[LayerInfo]:
    """The text-attending layers the attention-guidance methods read by default.

    Rule: the text-attending level at latent/4, else the lowest one above it (else the finest);
    a method that needs maps of at least `min_side` per side (Attention Regulation: 8) takes the
    lowest level that has them instead of a smaller one (SD 1.5 at 128 px: 8x8, not 4x4). A DiT
    attends at one token grid in every layer, so the rule takes every text-attending layer there, or,
    with `depth` < 1, those of the first `depth` of its text-attending blocks (at least one block).
    The papers read the 16x16 maps of SD at 512 px, a 64x64 latent: latent/4, the coarsest level
    that still has spatial detail. The rule gives 16 there, 24 for SD 2 at 768 px, 32 for SDXL at
    1024 px (whose text-attending levels are latent/2 and latent/4) and 8 for the bundled testbed
    (a 16x16 latent that attends to text at 8x8 only), square or not (sides from the shorter one),
    without hard-coding a resolution. `height`, `width`: the latent's.
    """
    text = [layer for layer in layers if layer.kind in ("cross", "joint")]
    if not text:
        raise ValueError("the model has no layer attending to text")
    short = min(height, width)
    side = {layer.name: -(-short // layer.downsample) for layer in text}
    usable = [s for s in side.values() if s >= max(-(-short // 4), min_side)]
    chosen = min(usable) if usable else max(side.values())
    picked = [layer for layer in text if side[layer.name] == chosen]
    if depth < 1 and one_grid(layers):
        blocks = list(dict.fromkeys(layer.block for layer in picked))
        kept = set(blocks[: max(1, math.ceil(depth * len(blocks)))])
        picked = [layer for layer in picked if layer.block in kept]
    return picked


class WorkingLayers:
    """The text-attending layers a control acts on: those its `layers` field names, else
    `working_layers` of each call's token grid.

    The rule needs the latent size, known only when the denoiser runs, so the control installs on
    every `candidates` layer and asks `includes` per call; the rule runs once per grid."""

    def __init__(self, session: Any, layers: Any = None, min_side: int = 1, depth: float = 1.0):
        fixed = None if layers is None else session.select(layers, kinds=("cross", "joint"))
        self.min_side, self.depth = min_side, depth
        self.candidates = fixed or [layer for layer in session.layers if layer.kind in ("cross", "joint")]
        self._fixed = None if fixed is None else {layer.name for layer in fixed}
        self._by_grid: dict[tuple[int, int], set[str]] = {}

    def includes(self, session: Any, layer: LayerInfo) -> bool:
        return layer.name in self.names(session)

    def names(self, session: Any) -> set[str]:
        """The names of the layers acted on at the current call's token grid."""
        if self._fixed is not None:
            return self._fixed
        grid = session.grid[1:]
        if grid not in self._by_grid:
            self._by_grid[grid] = {
                x.name for x in working_layers(session.layers, *grid, self.min_side, self.depth)
            }
        return self._by_grid[grid]
