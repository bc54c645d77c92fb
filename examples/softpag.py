"""SoftPAG: guide away from a perturbed branch in which chosen self-attention heads see only
themselves (Ahn et al., NeurIPS 2025), next to layer-level PAG, on the bundled model.

python examples/softpag.py
"""

from pathlib import Path

from _common import compare, setup

import attnctl

setup(__doc__)

prompt = "a red circle and a blue square"
words = ["circle", "square"]
# Half the heads of every self-attention layer at 8x8, halfway toward the identity map (u = 0.5).
heads = {"down_blocks.1": [0, 1], "mid_block": [0, 1], "up_blocks.0": [0, 1]}
compare(attnctl.SoftPAG(heads, u=0.5, scale=3.0), prompt, words, Path("out/softpag"))
compare(attnctl.PAG(["mid_block"], scale=3.0), prompt, words, Path("out/pag"))
