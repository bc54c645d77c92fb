"""Layout on the bundled shapes model: a red circle top left, a blue square bottom right.

Regional prompts with the issue's scheme (crop_merge: queries in a box see the prompt and their
region's prompt), and the scheme that suits this model, whose conditioning runs through the
end-of-text tokens: each region's own words of the prompt hidden outside its box, no sub-prompt
tokens (base_outside="other_regions", sub_prompts=False). Writes out/layout*/.

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
    "layout_hide_words": attnctl.Layout(regions, base_outside="other_regions", sub_prompts=False),
}.items():
    out = Path("out") / name
    compare(layout, prompt, words, out)
    print(f"wrote {render_layout(out / 'boxes.png', Image.open(out / 'controlled.png'), layout)}")
