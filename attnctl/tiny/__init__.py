"""Tiny offline models of every supported family (`models`) and the offline tokenizers they use
(`tokenizers`): `tiny_pipeline("flux")` builds a standard diffusers pipeline in well under a second."""

from .models import (
    FAMILIES,
    VIDEO_FAMILIES,
    add_tiny_ip_adapter,
    hunyuan_prompt_template,
    tiny_call_kwargs,
    tiny_pipeline,
    video_tokens,
)
from .tokenizers import build_clip_tokenizer, build_llama_tokenizer, build_t5_tokenizer, default_corpus

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "add_tiny_ip_adapter",
    "build_clip_tokenizer",
    "build_llama_tokenizer",
    "build_t5_tokenizer",
    "default_corpus",
    "hunyuan_prompt_template",
    "tiny_call_kwargs",
    "tiny_pipeline",
    "video_tokens",
]
