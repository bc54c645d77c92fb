"""Attention Regulation on the bundled shapes model: no word dominates cross-attention.

python examples/attention_regulation.py
"""

from pathlib import Path

from _common import compare, setup

import attnctl

setup(__doc__)

words = ["circle", "square", "triangle"]
compare(
    attnctl.AttentionRegulation(words),
    "a red circle and a blue square and a green triangle",
    words,
    Path("out/regulation"),
)
