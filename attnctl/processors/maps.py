"""Attention maps: recorded per word, reduced as they are produced, rendered as heatmaps.

Each recorded attention call adds, per word, one map averaged over heads, over the word's
sub-tokens and over the conditional images, to a running sum kept per token grid. Memory is one
[frames, h, w] sum per word and grid, whatever the number of layers and steps.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.attention import AttentionCall, AttentionEdit
from ..core.controls import Control, check, param
from ..core.session import PerGeneration, in_steps


@dataclasses.dataclass
class AttentionMaps(Control):
    """Record per-word cross-attention maps (joint models: image queries → text keys)."""

    tokens: list[str] | None = param(
        None, kind="words", optional=True, help="Words or phrases of the prompt to record (None: every word)."
    )
    layers: list[str | int] | None = param(
        None,
        kind="layers",
        optional=True,
        help="Layer paths or block indices (None: every layer attending to text).",
    )
    steps: list[int] | None = param(
        None, kind="steps", optional=True, help="Denoising step indices to record (None: every step)."
    )
    occurrence: int = param(0, help="Which occurrence of a repeated word (0: the first, -1: the last).")

    def install(self, session: Any) -> None:
        layers = session.select(self.layers, kinds=("cross", "joint"))
        store = session.maps if isinstance(session.maps, MapStore) else MapStore()
        session.maps = store
        session.add_edit(layers, _Recorder(self, store))

    def words(self, prompt: str) -> list[str]:
        """The words recorded for `prompt`: `tokens`, else every word of the prompt in order."""
        if self.tokens is not None:
            return list(self.tokens)
        return list(dict.fromkeys(re.findall(r"[\w'-]+", prompt)))


class _Recorder(AttentionEdit):
    def __init__(self, spec: AttentionMaps, store: MapStore):
        self.spec = spec
        self.store = store
        self.positions = PerGeneration(self._positions)

    def active(self, session: Any, layer: Any) -> bool:
        # the maps are those the denoising forwards attend with, not a latent guidance's own forwards
        recording = bool(session.cond_rows) and not session.guiding
        return recording and in_steps(session.step, session.num_steps, steps=self.spec.steps)

    def _positions(self, session: Any) -> dict[str, list[list[int]]]:
        """Per word, its text positions in each conditional row."""
        prompt = session.prompts()[0]
        words = self.spec.words(prompt)
        if not words:
            raise ValueError(
                f"AttentionMaps(tokens=None) records every word of the prompt, but the prompt {prompt!r} "
                "has no words; give a prompt with words, or the words to record as tokens=[...]"
            )
        return {w: session.text_positions(w, self.spec.occurrence) for w in words}

    def observe(self, call: AttentionCall) -> None:
        if not call.cond_rows:  # a kernel call of other rows only (a processor that runs row by row)
            return
        positions = self.positions.get(call.session)
        columns = sorted({c for rows in positions.values() for pos in rows for c in pos})
        probs = call.text_probs(columns)  # [cond rows, N, C] head-averaged
        index = {c: i for i, c in enumerate(columns)}
        layout = call.layout
        grid = (layout.frames, layout.height, layout.width)
        for word, rows in positions.items():
            maps = [probs[i, :, [index[c] for c in pos]].mean(-1) for i, pos in enumerate(rows)]
            self.store.add(word, torch.stack(maps).mean(0).reshape(grid))


class MapStore:
    """Per-word running sums of maps, one per token grid. `store[word]` gives the mean map."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[tuple[int, int, int], torch.Tensor]] = {}
        self._counts: dict[str, dict[tuple[int, int, int], int]] = {}

    def add(self, word: str, grid_map: torch.Tensor) -> None:
        key = tuple(grid_map.shape)
        sums = self._sums.setdefault(word, {})
        counts = self._counts.setdefault(word, {})
        grid_map = grid_map.detach().float().cpu()
        sums[key] = sums[key] + grid_map if key in sums else grid_map.clone()
        counts[key] = counts.get(key, 0) + 1

    def words(self) -> list[str]:
        return list(self._sums)

    def grids(self, word: str) -> list[tuple[int, int, int]]:
        return list(self._sums[self._check(word)])

    def at(self, word: str, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """The mean map of `word` on one recorded grid (None: averaged over grids, at the finest)."""
        word = self._check(word)
        sums, counts = self._sums[word], self._counts[word]
        if grid is not None:
            grid = tuple(grid) if len(grid) == 3 else (1, *grid)
            check(grid in sums, "grid", grid, f"one of the recorded grids {list(sums)}")
            return _squeeze(sums[grid] / counts[grid])
        finest = max(sums, key=lambda g: g[0] * g[1] * g[2])
        total = torch.zeros(finest)
        for s in sums.values():
            # each recorded call weighs the same, whatever its resolution
            total += F.interpolate(s[None], size=finest[1:], mode="bilinear", align_corners=False)[0]
        return _squeeze(total / sum(counts.values()))

    def __getitem__(self, word: str) -> torch.Tensor:
        return self.at(word)

    def __contains__(self, word: str) -> bool:
        return word in self._sums

    def __len__(self) -> int:
        return len(self._sums)

    def _check(self, word: str) -> str:
        if word not in self._sums:
            raise KeyError(f"no map recorded for {word!r}; recorded words: {self.words()}")
        return word

    def grid(self, image: Any = None, words: list[str] | None = None) -> Any:
        """A PIL image: the image (if given) followed by one heatmap per word over it."""
        return grid_image({w: self.at(w) for w in (words or self.words())}, image)

    def save_grid(self, path: str | Path, image: Any = None, words: list[str] | None = None) -> Path:
        """Write `grid(image, words)` as a PNG."""
        return save_image(self.grid(image, words), path)


def _squeeze(m: torch.Tensor) -> torch.Tensor:
    return m[0] if m.shape[0] == 1 else m


def heatmap(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [h, w] map → an RGB heatmap [3, H, W] in [0, 1] (normalised to its own max)."""
    m = grid_map.float()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    # a compact 'inferno'-like ramp: black → purple → orange → yellow
    stops = torch.tensor([[0, 0, 0.02], [0.34, 0.06, 0.43], [0.87, 0.32, 0.23], [0.99, 0.85, 0.25]])
    pos = m.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * stops[lo] + frac * stops[lo + 1]).permute(2, 0, 1)


def grid_image(maps: dict[str, torch.Tensor], image: Any = None, size: int = 256) -> Any:
    """Heatmaps of `maps` side by side (blended over `image` if given) with word labels (PIL)."""
    from PIL import Image, ImageDraw

    base = None
    if image is not None:
        base = to_pil(image).convert("RGB")
        w0, h0 = base.size
        width, height = size, max(1, round(size * h0 / w0))
        base = base.resize((width, height))
    else:
        first = next(iter(maps.values()))
        h, w = first.shape[-2:]
        width, height = size, max(1, round(size * h / w))
    tiles = [("image", base)] if base is not None else []
    for word, m in maps.items():
        m = m.mean(0) if m.dim() == 3 else m  # video: average over frames
        rgb = (heatmap(m, (height, width)) * 255).byte().permute(1, 2, 0).numpy()
        tile = Image.fromarray(rgb)
        if base is not None:
            tile = Image.blend(base, tile, 0.6)
        tiles.append((word, tile))
    label = 18
    sheet = Image.new("RGB", (width * len(tiles), height + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        sheet.paste(tile, (i * width, label))
        draw.text((i * width + 4, 3), name, fill="black")
    return sheet


def save_image(image: Any, path: str | Path) -> Path:
    """Save a PIL image, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def to_pil(image: Any) -> Any:
    """A PIL image from a PIL image, or an image tensor / array (CHW or HWC, [0, 1] or [0, 255])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    t = torch.as_tensor(image).detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    if t.shape[0] in (1, 3):  # CHW → HWC
        t = t.permute(1, 2, 0)
    if t.max() <= 1.0:
        t = t * 255
    return Image.fromarray(t.clamp(0, 255).byte().numpy().squeeze())
