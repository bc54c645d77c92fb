"""DraftAttention on a tiny Wan video model (untrained, offline): block-sparse video attention, same call.

At 16,384 video tokens (61 frames of 512x512) attention is most of the work, and skipping 90% of
its blocks shows. On 2 shared CPU cores it printed "dense 307.4 s, DraftAttention(0.9) 191.2 s:
1.61x, PSNR 42.2 dB" (the first of the 4 steps and the first block stay dense, as in the paper; a
few minutes in all). At a few thousand tokens the draft, block selection and permutations cost
about what they save, and there is no speedup (the docs' DraftAttention page charts both).

python examples/draft_attention.py
"""

import time

import torch
from _common import setup

import attnctl
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline, video_tokens

setup(__doc__)

pipe = tiny_pipeline("wan", num_layers=4, attention_head_dim=64)
pipe.set_progress_bar_config(disable=True)
kwargs = tiny_call_kwargs("wan", num_frames=61, height=512, width=512, num_inference_steps=4)
print("video tokens:", video_tokens("wan", **kwargs))


def run(*controls):
    start = time.perf_counter()
    with attnctl.control(pipe, *controls):
        frames = pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).frames
    return frames, time.perf_counter() - start


dense, t_dense = run()
sparse, t_sparse = run(attnctl.DraftAttention(sparsity=0.9))
psnr = 10 * torch.log10(1 / ((dense - sparse) ** 2).mean())
print(
    f"dense {t_dense:.1f} s, DraftAttention(0.9) {t_sparse:.1f} s: {t_dense / t_sparse:.2f}x, PSNR {psnr:.1f} dB"
)
