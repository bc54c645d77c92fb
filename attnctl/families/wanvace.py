"""Wan VACE (2.1 / 2.2): `WanVACETransformer3DModel`, Wan's blocks (`WanAttention`, `WanAttnProcessor`)
plus a VACE control branch.

Layers are the main `blocks.N.attn1` (self-attention over the video tokens) and `blocks.N.attn2`
(cross-attention to the UMT5 text), placed exactly as in Wan (`wan.py`). The control branch,
`vace_blocks.N.attn1/attn2`, runs the same processor on the control tokens (the control video's
latents and mask, plus the video's hidden states at its first block): its queries are not the generated
video's tokens, so it is no layer; its attention runs as the model made it (maps do not read it,
SoftPAG/PAG do not perturb it, DraftAttention keeps it dense), and its hints reach the main blocks as
the model adds them.

Reference images (`reference_images=`) are latent frames the pipeline puts in front of the video and
drops after denoising: the transformer attends over them as frames of its sequence, and nothing in its
call tells them apart from the video's (their count is a local of the pipeline call), so they are the
first frames of attnctl's grid too. Wan 2.2's VACE pipelines hold two experts (`transformer`,
`transformer_2`); both are controlled, as in Wan.
"""

from __future__ import annotations

from .wan import WanAdapter


class WanVACEAdapter(WanAdapter):
    name = "wanvace"
    title = "Wan VACE"
    denoisers = ("WanVACETransformer3DModel",)
    # A re-wrapped VACE transformer matched by its processors gets the Wan adapter (registered first),
    # which lists the same layers; this declaration adds the family's name and its tiny model.
    processors = ("WanAttnProcessor",)
