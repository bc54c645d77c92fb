"""Layout on the bundled shapes model: a red circle top left, a blue square bottom right.

The default Layout (crop_merge: in its box a region's text replaces the prompt's, its words of the
prompt and its prompt's words; each region's words of the prompt hidden outside its box; the first
30% of the steps), and mode="mask_and_sum" (each region's stream added under its box to the
prompt's: the weaker scheme AnyMS compares with). Writes out/layout*/.

python examples/layout.py
"""

from pathlib import Path

from _common import compare, setup
from PIL import Image

import attnctl
from attnctl.processors.layout import render_layout

setup(__doc__)

prompt = "a red circle and a blue square"
regions = [
    attnctl.Region((0.0, 0.0, 0.5, 0.5), "a red circle"),
    attnctl.Region((0.5, 0.5, 1.0, 1.0), "a blue square"),
]
words = ["circle", "square"]
for name, layout in {
    "layout": attnctl.Layout(regions),
    "layout_mask_and_sum": attnctl.Layout(regions, mode="mask_and_sum"),
}.items():
    out = Path("out") / name
    compare(layout, prompt, words, out)
    print(f"wrote {render_layout(out / 'boxes.png', Image.open(out / 'controlled.png'), layout)}")
