"""Sparse attention kernels: DraftAttention (arXiv 2505.14708) with flex, gather and dense backends.

Tensors in, tensors out: nothing here imports attnctl outside this package."""

from .draft import BACKENDS, draft_attention, draft_block_mask, patch_permutation
from .layout import DraftLayout
from .sparse import SparsePlan, flex_block_mask

__all__ = [
    "BACKENDS",
    "DraftLayout",
    "SparsePlan",
    "draft_attention",
    "draft_block_mask",
    "flex_block_mask",
    "patch_permutation",
]
