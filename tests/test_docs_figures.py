"""docs/figures.py draws the committed figures: two of them, regenerated, equal the PNGs in docs/img."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _figures():
    """docs/figures.py as a module (docs/ is no package)."""
    if "docs_figures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("docs_figures", DOCS / "figures.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["docs_figures"]


# "maps": three testbed generations with maps (a few seconds); "draft": the benchmark JSON alone.
@pytest.mark.parametrize("name", ["maps", "draft"])
def test_regenerated_figure_equals_the_committed_one(name, tmp_path):
    """On the machine and torch build that drew them the bytes are the same (one thread, fixed
    seeds). Elsewhere torch's CPU kernels (AVX2 or AVX-512 code paths) may round differently and
    FreeType may draw the text a little differently, so the pixels are compared with a small
    tolerance: at most 1% of the channel values differ, by 0.5 levels of 255 on average."""
    path = _figures().build(name, tmp_path)
    ours = np.asarray(Image.open(path).convert("RGB")).astype(int)
    committed = np.asarray(Image.open(DOCS / "img" / f"{name}.png").convert("RGB")).astype(int)
    hint = f"docs/img/{name}.png is out of date: python docs/figures.py --only {name}"
    assert ours.shape == committed.shape, hint
    diff = np.abs(ours - committed)
    assert (diff > 0).mean() <= 0.01 and diff.mean() <= 0.5, hint
