"""SkyReels-V2: `SkyReelsV2Transformer3DModel`, Wan's architecture with its own `SkyReelsV2Attention` /
`SkyReelsV2AttnProcessor` (kernel calls through `dispatch_attention_fn` of `transformer_skyreels_v2`).

Placed exactly as Wan (`wan.py`): `blocks.N.attn1` self-attention over the video tokens (frame-major,
then row-major), `blocks.N.attn2` cross-attention to the UMT5 text padded with zero embeddings to
`max_sequence_length` (512 by default); I2V's image-embedding attention in attn2 is a separate kernel
call that runs as the model made it.

Covered and tested: the text-to-video pipeline (`SkyReelsV2Pipeline`). The image-to-video pipeline and
the diffusion-forcing ones (`SkyReelsV2DiffusionForcing*Pipeline`) run the same denoiser, layers and
token grid, with these differences: diffusion forcing passes a timestep per latent frame [B, F] (attnctl
counts steps from the first frame's), and with causal blocks (`causal_block_size` > 1) every
self-attention call takes a mask per pair of tokens [1, 1, S, S], which maps and SoftPAG/PAG read as
the model applies it, while DraftAttention keeps such calls dense (its blocks take masks of keys only).
"""

from __future__ import annotations

from .wan import WanAdapter


class SkyReelsV2Adapter(WanAdapter):
    name = "skyreelsv2"
    title = "SkyReels-V2"
    denoisers = ("SkyReelsV2Transformer3DModel",)
    processors = ("SkyReelsV2AttnProcessor",)
