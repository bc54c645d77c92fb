"""Test-wide settings."""

import torch

# Tiny models are dominated by per-op overhead; with two threads on a 2-core machine that is also
# busy, the threads wait on each other and a tiny UNet run goes from 0.1 s to 10 s.
torch.set_num_threads(1)
