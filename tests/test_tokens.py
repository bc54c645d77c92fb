"""Prompt words -> token positions, for the CLIP, T5 and Llama-style tokenizers built offline."""

from __future__ import annotations

import pytest

from attnctl.core.tokens import TokenNotFoundError, TokenTruncatedError, prompt_tokens, token_positions
from attnctl.tiny import (
    build_clip_tokenizer,
    build_llama_tokenizer,
    build_t5_tokenizer,
    default_corpus,
    hunyuan_prompt_template,
)

KINDS = ("clip", "t5", "llama")
# Special tokens before the prompt's first token: CLIP and Llama add BOS, T5 does not.
LEAD = {"clip": 1, "t5": 0, "llama": 1}
BUILDERS = {"clip": build_clip_tokenizer, "t5": build_t5_tokenizer, "llama": build_llama_tokenizer}


@pytest.fixture(scope="module", params=KINDS)
def tok(request):
    return request.param, BUILDERS[request.param](default_corpus())


def _pieces(tokenizer, prompt, positions):
    ids = tokenizer(prompt)["input_ids"]
    return tokenizer.decode([ids[p] for p in positions]).strip()


def test_single_token_words(tok):
    kind, tokenizer = tok
    prompt = "a cat and a frog"
    lead = LEAD[kind]
    assert token_positions(tokenizer, prompt, "cat") == [lead + 1]
    assert token_positions(tokenizer, prompt, "frog") == [lead + 4]
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) == lead + 5 + (0 if kind == "llama" else 1)  # CLIP and T5 end with an EOS token
    if kind == "clip":
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    if kind == "t5":
        assert ids[-1] == tokenizer.eos_token_id
    if kind == "llama":
        assert ids[0] == tokenizer.bos_token_id


def test_rare_word_covers_all_of_its_sub_tokens(tok):
    kind, tokenizer = tok
    prompt = "a xylophone and a hippopotamus"
    for word in ("xylophone", "hippopotamus"):
        positions = token_positions(tokenizer, prompt, word)
        assert len(positions) > 1  # the split really happens
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert _pieces(tokenizer, prompt, positions) == word
    assert token_positions(tokenizer, prompt, "and") == [
        token_positions(tokenizer, prompt, "xylophone")[-1] + 1
    ]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "clip"])  # CLIP marks word ends (</w>) instead
def test_lone_word_start_mark_belongs_to_the_word(kind):
    tokenizer = BUILDERS[kind](default_corpus())
    prompt = "a xylophone"
    positions = token_positions(tokenizer, prompt, "xylophone")
    assert tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"][positions[0]]) == "▁"
    assert positions[0] == LEAD[kind] + 1


def test_phrase(tok):
    kind, tokenizer = tok
    prompt = "a red circle next to a blue square"
    lead = LEAD[kind]
    assert token_positions(tokenizer, prompt, "red circle") == [lead + 1, lead + 2]
    assert token_positions(tokenizer, prompt, "blue  square") == [lead + 6, lead + 7]  # any spacing
    tabbed = token_positions(tokenizer, "a red\tcircle", "red circle")
    assert tabbed[0] == lead + 1 and _pieces(tokenizer, "a red\tcircle", tabbed).split() == ["red", "circle"]
    with pytest.raises(TokenNotFoundError):
        token_positions(tokenizer, prompt, "red square")


def test_repeated_word_occurrences(tok):
    kind, tokenizer = tok
    prompt = "a cat and a cat and another cat"
    lead = LEAD[kind]
    assert token_positions(tokenizer, prompt, "cat") == [lead + 1]
    assert token_positions(tokenizer, prompt, "cat", occurrence=1) == [lead + 4]
    assert token_positions(tokenizer, prompt, "cat", occurrence=-1) == token_positions(
        tokenizer, prompt, "cat", 2
    )
    assert token_positions(tokenizer, prompt, "cat", occurrence=-3) == [lead + 1]
    for bad in (3, -4):
        with pytest.raises(
            TokenNotFoundError, match=r"occurrence=-?\d of 'cat' is out of range: the prompt has 3"
        ):
            token_positions(tokenizer, prompt, "cat", occurrence=bad)


def test_case_insensitive(tok):
    kind, tokenizer = tok
    prompt = "A Cat and a FROG"
    for word in ("cat", "CAT", "Cat"):
        positions = token_positions(tokenizer, prompt, word)
        assert _pieces(tokenizer, prompt, positions).lower() == "cat"
    assert token_positions(tokenizer, prompt, "a cat")[0] == LEAD[kind]
    assert _pieces(tokenizer, prompt, token_positions(tokenizer, prompt, "frog")).lower() == "frog"


def test_whole_words_only(tok):
    kind, tokenizer = tok
    prompt = "a catalog and a bobcat near a cat, cats"
    positions = token_positions(tokenizer, prompt, "cat")
    assert _pieces(tokenizer, prompt, positions) == "cat"
    assert positions[0] > token_positions(tokenizer, prompt, "bobcat")[-1]
    assert len(token_positions(tokenizer, prompt, "cat", occurrence=-1)) == len(positions)  # only one "cat"
    with pytest.raises(TokenNotFoundError, match="'cat' is not in the prompt"):
        token_positions(tokenizer, "a catalog of bobcats", "cat")
    # punctuation next to a word is not part of it
    assert _pieces(tokenizer, "a frog.", token_positions(tokenizer, "a frog.", "frog")) == "frog"


def test_missing_word_error_shows_the_tokens(tok):
    kind, tokenizer = tok
    with pytest.raises(TokenNotFoundError) as info:
        token_positions(tokenizer, "a cat", "dog")
    assert isinstance(info.value, ValueError)
    expected = {
        "clip": "'dog' is not in the prompt; its tokens are: [0] <|startoftext|> [1] a [2] cat [3] <|endoftext|>",
        "t5": "'dog' is not in the prompt; its tokens are: [0] a [1] cat [2] </s>",
        "llama": "'dog' is not in the prompt; its tokens are: [0] <|begin_of_text|> [1] a [2] cat",
    }
    assert str(info.value) == expected[kind]
    with pytest.raises(ValueError, match="non-space"):
        token_positions(tokenizer, "a cat", "  ")


def test_prompt_tokens_are_readable(tok):
    kind, tokenizer = tok
    tokens = prompt_tokens(tokenizer, "a frog and a xylophone")
    words = [t for t in tokens if t not in (tokenizer.bos_token, tokenizer.eos_token)]
    assert words[:4] == ["a", "frog", "and", "a"]
    assert "".join(w for w in words[4:] if w != "▁") == "xylophone"


def test_truncated_word(tok):
    kind, tokenizer = tok
    if kind == "clip":
        prompt = "a cat " + "and a dog " * 30 + "and a frog"  # far past CLIP's 77 tokens
        assert token_positions(tokenizer, prompt, "cat") == [2]
        with pytest.raises(TokenTruncatedError, match="'frog' .* truncated away.*first 77 tokens") as info:
            token_positions(tokenizer, prompt, "frog")
        assert "[0] <|startoftext|> [1] a [2] cat" in str(info.value)
        return
    # T5 and Llama pipelines truncate at their max_sequence_length, passed as max_length
    prompt = "a cat and a frog"
    frog = token_positions(tokenizer, prompt, "frog")
    keeps_eos = kind == "t5"  # truncation keeps the closing </s>, dropping one more prompt token
    assert token_positions(tokenizer, prompt, "frog", max_length=frog[-1] + 1 + keeps_eos) == frog
    with pytest.raises(TokenTruncatedError, match="truncated away"):
        token_positions(tokenizer, prompt, "frog", max_length=frog[-1] + keeps_eos)
    assert issubclass(TokenTruncatedError, TokenNotFoundError)


def test_round_trip_save_load(tok, tmp_path):
    kind, tokenizer = tok
    tokenizer.save_pretrained(tmp_path)
    loaded = type(tokenizer).from_pretrained(tmp_path)
    for prompt in ("a cat and a frog", "A Xylophone, a hippopotamus!", "<|endoftext|> 3 red\ncircles"):
        assert loaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
        assert token_positions(loaded, "a red circle", "circle") == token_positions(
            tokenizer, "a red circle", "circle"
        )
    padded = dict(padding="max_length", max_length=40, truncation=True)
    assert loaded("a cat", **padded)["input_ids"] == tokenizer("a cat", **padded)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    assert len(loaded) == len(tokenizer) and loaded.model_max_length == tokenizer.model_max_length
    assert loaded.padding_side == tokenizer.padding_side == "right"


def test_tokenizer_layouts():
    clip = build_clip_tokenizer(default_corpus())
    assert clip.model_max_length == 77
    assert clip.convert_ids_to_tokens(len(clip) - 2 + 0) == "<|startoftext|>"
    t5 = build_t5_tokenizer(["a cat"])
    assert t5.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert not any("extra_id" in t for t in t5.get_vocab())
    llama = build_llama_tokenizer(["a cat"])
    ids = llama("<|start_header_id|>user<|end_header_id|>\n\na cat<|eot_id|>")["input_ids"]
    assert {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(llama.convert_ids_to_tokens(ids))


def test_hunyuan_template_positions():
    tokenizer = build_llama_tokenizer(default_corpus())
    template = hunyuan_prompt_template()
    crop = template["crop_start"]
    prompt = "a cat in the video"
    # "video" is also a template word: only the prompt's own occurrence counts
    video = token_positions(tokenizer, prompt, "video", template=template["template"])
    cat = token_positions(tokenizer, prompt, "cat", template=template["template"])
    ids = tokenizer(template["template"].format(prompt))["input_ids"]
    assert min(cat) >= crop and tokenizer.decode([ids[p] for p in video]).strip() == "video"
    # text key = position - crop_start in the cropped sequence the transformer sees
    assert tokenizer.decode(ids[crop:][cat[0] - crop]).strip() == "cat"
    with pytest.raises(TokenNotFoundError, match="'light' is not in the prompt"):
        token_positions(tokenizer, prompt, "light", template=template["template"])
    with pytest.raises(ValueError, match="placeholder"):
        token_positions(tokenizer, prompt, "cat", template="no placeholder")
    # the pipeline truncates the templated prompt at max_sequence_length + crop_start
    with pytest.raises(TokenTruncatedError):
        token_positions(tokenizer, prompt, "video", template=template["template"], max_length=crop + 3)


def test_slow_tokenizer_without_converter_is_a_clear_error():
    class PlainTokenizer:  # no offsets, and no converter in transformers
        is_fast = False
        model_max_length = 77

        def __call__(self, text, **kwargs):
            return {"input_ids": [0, 1]}

        def convert_ids_to_tokens(self, ids):
            return ["a" for _ in ids]

        def decode(self, ids):
            return "a"

    with pytest.raises(TypeError, match="needs a fast tokenizer.*PlainTokenizer"):
        token_positions(PlainTokenizer(), "a cat", "cat")
