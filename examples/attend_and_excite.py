"""Attend-and-Excite on the bundled shapes model: every subject word gets a strongly attended region.

python examples/attend_and_excite.py
"""

from pathlib import Path

from _common import compare, setup

import attnctl

setup(__doc__)

words = ["circle", "square", "triangle"]
compare(
    attnctl.AttendAndExcite(words),
    "a red circle and a blue square and a green triangle",
    words,
    Path("out/excite"),
)
