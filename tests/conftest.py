"""Test-wide settings and shared fixtures."""

import pytest
import torch

# Tiny models are dominated by per-op overhead; with two threads on a 2-core machine that is also
# busy, the threads wait on each other and a tiny UNet run goes from 0.1 s to 10 s.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny random CLIP (model, tokenizer and image processor) saved to a folder, as a user's
    CLIP or PickScore folder would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnctl.tiny import build_clip_tokenizer, default_corpus

    tokenizer = build_clip_tokenizer(default_corpus())
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **layers, **ids),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path
