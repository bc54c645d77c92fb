"""Layout on the bundled shapes model: a red circle top left, a blue square bottom right.

The default Layout (crop_merge: queries in a box see the prompt and their region prompt's own
tokens; each region's words of the prompt hidden outside its box), and the scheme without
sub-prompt tokens (sub_prompts=False: confining by hiding words only). Writes out/layout*/.

python examples/layout.py
"""

from pathlib import Path

from _common import compare
from PIL import Image

import attnctl
from attnctl.processors.layout import render_layout

prompt = "a red circle and a blue square"
regions = [
    attnctl.Region((0.0, 0.0, 0.5, 0.5), "a red circle"),
    attnctl.Region((0.5, 0.5, 1.0, 1.0), "a blue square"),
]
words = ["circle", "square"]
for name, layout in {
    "layout": attnctl.Layout(regions),
    "layout_hide_words": attnctl.Layout(regions, sub_prompts=False),
}.items():
    out = Path("out") / name
    compare(layout, prompt, words, out)
    print(f"wrote {render_layout(out / 'boxes.png', Image.open(out / 'controlled.png'), layout)}")
