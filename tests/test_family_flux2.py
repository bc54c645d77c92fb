"""FLUX.2: what the generic family tests cannot check — text positions in the chat-templated sequence
the pipeline really encodes ([dev]: Mistral's system + user turn; [klein]: a Qwen3 user turn), the
prompt span, and reference-image tokens after the generated ones kept out of the image queries."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from recording import encoder_ids

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline
from attnctl.tiny.tokenizers import build_qwen_tokenizer

PROMPT = "a cat and a hippopotamus next to a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("flux2")


def _run(pipe, **overrides):
    kwargs = tiny_call_kwargs("flux2", **overrides)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


def _check_words_and_span(pipe, ids, tokenizer, start, end):
    adapter = adapter_for(pipe.transformer)
    for word in ("cat", "hippopotamus", "frog"):
        positions = adapter.text_positions(pipe, PROMPT, word)
        assert tokenizer.decode([ids[p] for p in positions]).strip() == word
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words
    words, ends = adapter.prompt_span(pipe, PROMPT)
    assert tokenizer.decode([ids[p] for p in words]) == PROMPT
    assert words == list(range(words[0], words[-1] + 1))
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in ends]) == [start, end]


def test_dev_positions_land_on_the_word_after_the_system_turn(pipe):
    with encoder_ids(pipe.text_encoder) as seen:
        _run(pipe, num_inference_steps=1)
    (ids,) = seen
    assert len(ids) == tiny_call_kwargs("flux2")["max_sequence_length"]  # every key, padding too
    _check_words_and_span(pipe, ids, pipe.tokenizer, "<s>", "[/INST]")
    words, _ = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert pipe.tokenizer.convert_ids_to_tokens(ids[words[0] - 1]) == "[INST]"


def test_klein_positions_land_on_the_word_in_its_qwen3_turn(pipe):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    klein = Flux2KleinPipeline(
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=Qwen3ForCausalLM(config).eval(),
        tokenizer=tokenizer,
        transformer=pipe.transformer,
    )
    with encoder_ids(klein.text_encoder) as seen:
        klein.encode_prompt(PROMPT, max_sequence_length=64, text_encoder_out_layers=(1,))
    (ids,) = seen
    _check_words_and_span(klein, ids, tokenizer, "<|im_start|>", "<|im_end|>")


class _Layouts(AttentionEdit):
    def __init__(self):
        self.seen = []

    def observe(self, call):
        self.seen.append((call.query.shape[2], call.key.shape[2], call.layout))


def test_reference_image_tokens_are_keys_not_image_queries(pipe):
    """A 64 px reference image: 16 x 16 tokens appended after the 8 x 8 generated ones (t = 10)."""
    reference = Image.new("RGB", (64, 64), (200, 30, 30))
    layouts = _Layouts()
    text = tiny_call_kwargs("flux2")["max_sequence_length"]
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])) as session:
        session.add_edit(session.layers, layouts)
        _run(pipe, image=[reference], num_inference_steps=1)
        maps = session.maps["frog"]
    assert maps.shape == (8, 8) and session.grid == (1, 8, 8)
    assert len(layouts.seen) == 2  # a double- and a single-stream block
    for queries, keys, layout in layouts.seen:
        assert queries == keys == text + 64 + 256
        assert layout.text_k == slice(0, text)
        assert layout.image_q == slice(text, text + 64)  # the generated image only
        assert layout.image_k == slice(text, keys)  # the reference is seen


def test_layout_region_tokens_continue_the_text_positions(pipe):
    adapter = adapter_for(pipe.transformer)
    text = torch.zeros(2, 5, 48)
    ids = torch.stack([torch.tensor([[0, 0, 0, i] for i in range(5)])] * 2)
    out = adapter.append_text({"encoder_hidden_states": text, "txt_ids": ids}, torch.ones(2, 3, 48))
    assert out["encoder_hidden_states"].shape == (2, 8, 48)
    assert out["txt_ids"][1].tolist() == [[0, 0, 0, i] for i in range(8)]
