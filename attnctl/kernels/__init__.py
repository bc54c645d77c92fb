"""Sparse attention kernels: DraftAttention (arXiv 2505.14708) with flex, gather and dense backends."""

from attnctl.kernels.draft import BACKENDS, DraftLayout, draft_attention, draft_block_mask, patch_permutation
from attnctl.kernels.sparse import SparsePlan, flex_block_mask

__all__ = [
    "BACKENDS",
    "DraftLayout",
    "SparsePlan",
    "draft_attention",
    "draft_block_mask",
    "flex_block_mask",
    "patch_permutation",
]
