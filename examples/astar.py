"""A-STAR on the bundled shapes model: segregate the concepts' attention and retain it across steps.

python examples/astar.py
"""

from pathlib import Path

from _common import compare, setup

import attnctl

setup(__doc__)

words = ["circle", "square", "triangle"]
compare(attnctl.AStar(words), "a red circle and a blue square and a green triangle", words, Path("out/astar"))
