"""Sana specifics the generic family tests cannot see: the complex human instruction (CHI) in front of
the prompt and the keys the pipeline keeps of it, the lower-cased prompt, the padding mask Layout
must keep honouring, and the linear self-attention attnctl leaves alone."""

from __future__ import annotations

import pytest
import torch
from recording import encoder_ids

import attnctl
from attnctl.families import adapter_for
from attnctl.families.support import status
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "A Cat and a frog next to a hippopotamus and a cat"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sana")


def _encoded_keys(pipe, prompt, **overrides):
    """The token ids of the text keys the transformer sees for the conditional prompt, and the
    conditional row's key mask: what the text encoder really received, cut as the pipeline cuts it."""
    masks = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["encoder_attention_mask"]), with_kwargs=True
    )
    try:
        with encoder_ids(pipe.text_encoder) as seen:
            kwargs = tiny_call_kwargs("sana", num_inference_steps=1, **overrides)
            pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        hook.remove()
    length = kwargs["max_sequence_length"]
    ids = seen[0]  # the prompt is encoded first, then the negative prompt
    keys = [ids[0]] + ids[-length + 1 :]  # SanaPipeline.encode_prompt's select_index
    return keys, masks[0][-1].tolist()  # CFG rows are [uncond, cond]


@pytest.mark.parametrize("chi", [True, False])
def test_text_positions_land_on_the_words_tokens_among_the_keys(pipe, chi):
    """With the CHI (the default) or without it (a call passing complex_human_instruction=[]): the
    prompt starts at key 1 either way, so the default's positions fit both."""
    keys, _ = _encoded_keys(pipe, PROMPT, **({} if chi else {"complex_human_instruction": []}))
    adapter = adapter_for(pipe.transformer)
    for word, occurrence in [("cat", 0), ("frog", 0), ("hippopotamus", 0), ("cat", 1), ("next to", 0)]:
        positions = adapter.text_positions(pipe, PROMPT, word, occurrence)
        decoded = pipe.tokenizer.decode([keys[p] for p in positions]).strip()
        assert decoded == word, (word, positions, decoded)
    assert len(adapter.text_positions(pipe, PROMPT, "hippopotamus")) > 1  # split into sub-words


def test_prompt_span_is_every_unmasked_key(pipe):
    keys, mask = _encoded_keys(pipe, PROMPT)
    words, ends = adapter_for(pipe.transformer).prompt_span(pipe, PROMPT)
    assert ends == [0] and keys[0] == pipe.tokenizer.bos_token_id
    assert sorted(words + ends) == [i for i, m in enumerate(mask) if m]
    assert pipe.tokenizer.decode([keys[p] for p in words]).strip() == PROMPT.lower()


def test_a_word_cut_off_by_max_sequence_length_raises(pipe):
    with attnctl.control(pipe, attnctl.AttentionMaps(["hippopotamus"])):
        with pytest.raises(ValueError, match="past the 4 text tokens"):
            pipe(PROMPT, **tiny_call_kwargs("sana", num_inference_steps=1, max_sequence_length=4))


def test_linear_self_attention_is_listed_but_never_perturbed(pipe):
    with attnctl.control(pipe) as ctl:
        kinds = {x.name: x.kind for x in ctl.layers}
    assert kinds["transformer_blocks.0.attn1"] == "self" and kinds["transformer_blocks.0.attn2"] == "cross"
    for method in ("SoftPAG", "PAG"):
        assert "linear" in status(adapter_for(pipe.transformer), method)[1]


def test_a_renamed_transformer_is_recognised_by_its_processors(pipe):
    model = torch.nn.Module()
    model.transformer_blocks = pipe.transformer.transformer_blocks
    assert adapter_for(model).name == "sana"


def test_layout_keeps_the_padding_mask_where_it_does_not_act(pipe):
    """Region prompts are appended (the key mask extended with ones) from the first call on; a step
    the layout does not act on must give the model's own output: its padding keys stay masked and the
    region tokens unseen."""
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    kwargs = tiny_call_kwargs("sana")
    try:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        regions = [attnctl.Region([0, 0, 0.5, 1], "a cat"), attnctl.Region([0.5, 0, 1, 1], "a frog")]
        with attnctl.control(pipe, attnctl.Layout(regions, steps=[1], prompt_fraction=1.0)):
            pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        hook.remove()
    base, layout = outputs[:2], outputs[2:]
    torch.testing.assert_close(layout[0], base[0], rtol=1e-5, atol=1e-6)  # step 0: not acting
    assert not torch.allclose(layout[1], base[1])  # step 1: acting


def test_append_text_extends_the_key_mask(pipe):
    adapter = adapter_for(pipe.transformer)
    text, mask = torch.zeros(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = adapter.append_text(
        {"encoder_hidden_states": text, "encoder_attention_mask": mask}, torch.ones(2, 3, 8)
    )
    assert out["encoder_hidden_states"].shape == (2, 8, 8)
    assert out["encoder_attention_mask"].tolist() == [[1, 1, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1, 1]]
