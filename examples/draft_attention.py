"""DraftAttention on a tiny Wan video model (untrained, offline): block-sparse attention, same call.

python examples/draft_attention.py
"""

import time

import torch

import attnctl
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline, video_tokens

pipe = tiny_pipeline("wan", num_layers=4, attention_head_dim=64)
kwargs = tiny_call_kwargs("wan", num_frames=21, height=256, width=256, num_inference_steps=8)
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
