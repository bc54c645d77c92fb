"""Tiny offline models of every supported family (`models`) and the offline tokenizers they use
(`tokenizers`): `tiny_pipeline("flux")` builds a standard diffusers pipeline in well under a second."""

from .models import (
    FAMILIES,
    VIDEO_FAMILIES,
    hunyuan_prompt_template,
    tiny_call_kwargs,
    tiny_pipeline,
    video_tokens,
)
from .tokenizers import build_clip_tokenizer, build_llama_tokenizer, build_t5_tokenizer, default_corpus

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "build_clip_tokenizer",
    "build_llama_tokenizer",
    "build_t5_tokenizer",
    "default_corpus",
    "hunyuan_prompt_template",
    "tiny_call_kwargs",
    "tiny_pipeline",
    "video_tokens",
]
