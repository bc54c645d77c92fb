"""Attention maps: where the bundled model attends for each word, as heatmaps over the image.

python examples/attention_maps.py
"""

from pathlib import Path

import torch
from _common import bundled_pipeline, setup

import attnctl

setup(__doc__)

pipe = bundled_pipeline()
prompt = "a yellow triangle and a blue circle"
with attnctl.control(pipe, attnctl.AttentionMaps()) as ctl:  # every word of the prompt
    image = pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]
out = Path("out/maps")
out.mkdir(parents=True, exist_ok=True)
image.save(out / "image.png")
print("recorded:", ctl.maps.words(), "grids:", ctl.maps.grids("triangle"))
print("wrote", ctl.maps.save_grid(out / "maps.png", image))
