"""Offline tokenizers learned from a small caption corpus: CLIP BPE, T5 sentencepiece, Llama BPE,
Gemma BPE (Sana, Lumina 2), and byte-level BPE: GLM-4 (CogView4), and Qwen and Mistral with their
chat templates (Qwen-Image, Z-Image, FLUX.2).

Common words ("cat", "frog", "red") become single tokens and rare ones ("hippopotamus") split into
sub-words, as with real tokenizers; no file is read and nothing is downloaded.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Iterable
from typing import Any

from transformers import CLIPTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, T5Tokenizer


def build_clip_tokenizer(corpus: Iterable[str], max_merges: int = 2000) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges are learned from `corpus` (no files, no network).

    Same layout as OpenAI's CLIP vocabulary: 256 byte symbols, the same with the end-of-word marker
    `</w>`, the learned merges, then `<|startoftext|>` and `<|endoftext|>`; lower-cased, 77 tokens.
    Words seen at least twice in the corpus become single tokens; rarer words split into sub-words.
    """
    vocab_list, merges = _clip_vocab(tuple(corpus), max_merges)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def build_t5_tokenizer(
    corpus: Iterable[str], max_merges: int = 2000, model_max_length: int = 512
) -> T5Tokenizer:
    """A T5 sentencepiece-style (unigram) tokenizer with scored pieces learned from `corpus`.

    `<pad>`=0, `</s>`=1, `<unk>`=2, then `▁`-prefixed pieces by score; no sentinel extra_ids. Pieces
    come from BPE merges on the corpus; a piece's score is its log frequency once the corpus is
    segmented, so frequent words are one piece and rare words split. Case is kept, as in T5.
    """
    pieces = _t5_pieces(tuple(corpus), max_merges)
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return T5Tokenizer(vocab=specials + list(pieces), extra_ids=0, model_max_length=model_max_length)


def build_llama_tokenizer(corpus: Iterable[str], max_merges: int = 3000) -> LlamaTokenizer:
    """A Llama-style BPE tokenizer (`▁` word prefix, byte fallback) learned from `corpus`.

    Adds HunyuanVideo's template words to the corpus and its header/turn special tokens
    (`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`); BOS `<|begin_of_text|>` is prepended,
    padding is on the right (the HunyuanVideo pipeline crops the template from the left).
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    # The template's words, twice so each becomes one token as in Llama's vocabulary.
    template_words = re.sub(r"<\|[a-z_]+\|>|\{\}", " ", DEFAULT_PROMPT_TEMPLATE["template"])
    vocab_list, merges = _llama_vocab(tuple(corpus) + (template_words,) * 2, max_merges)
    tokenizer = LlamaTokenizer(
        vocab={token: i for i, token in enumerate(vocab_list)},
        merges=list(merges),
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_LLAMA_SPECIAL)})
    return tokenizer


def build_byte_bpe_tokenizer(
    specials: Iterable[str],
    *,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    corpus: Iterable[str] | None = None,
    max_merges: int = 2000,
) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (Qwen2, Mistral Tekken, GLM-4) learned from `corpus`
    (default: the default corpus and the chat pipelines' system turns).

    No BOS is added (chat templates write their own); `specials` become special tokens after the
    learned vocabulary, and `chat_template` is the Jinja template `apply_chat_template` renders.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    corpus = tuple(default_corpus()) + _chat_system_texts() * 2 if corpus is None else tuple(corpus)
    vocab_list, merges = _byte_bpe_vocab(corpus, max_merges)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    specials = list(specials)
    for token in specials:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=pad, unk_token=unk, model_max_length=131072
    )
    named = {eos, pad, unk}
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in named]})
    tokenizer.chat_template = chat_template
    return tokenizer


def _chat_system_texts() -> tuple[str, ...]:
    """The system turns of the chat-encoder pipelines (FLUX.2, Qwen-Image), learned (twice) so that
    their words are single tokens as in the real vocabularies: Qwen-Image drops its template's
    first 34 tokens, which the tiny Qwen tokenizer then also spells in 34."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    qwen = "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    qwen += "relationships of the objects and background:\nuser\nassistant\n"
    return (SYSTEM_MESSAGE, qwen)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2 / Qwen2.5 / Qwen3 style tokenizer: byte-level BPE, no BOS, `<|endoftext|>` as pad and
    end, and a chat template with the real one's token layout for text (and image) messages,
    `enable_thinking=False` writing Qwen3's empty think block."""
    return build_byte_bpe_tokenizer(
        _QWEN_SPECIAL, eos="<|endoftext|>", pad="<|endoftext|>", chat_template=_QWEN_CHAT_TEMPLATE
    )


def build_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for the Mistral-Small-3.1 (Tekken) tokenizer FLUX.2 uses: byte-level BPE with its
    special tokens and its chat layout `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`."""
    return build_byte_bpe_tokenizer(
        _MISTRAL_SPECIAL, eos="</s>", pad="<pad>", unk="<unk>", chat_template=_MISTRAL_CHAT_TEMPLATE
    )


def build_gemma_tokenizer(corpus: Iterable[str], max_merges: int = 3000) -> Any:
    """A Gemma / Gemma-2 style BPE tokenizer (`▁` word prefix, byte fallback) learned from `corpus`.

    `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 as in Gemma's vocabulary; `<bos>` is prepended, padding
    on the right. Learns Lumina 2's default system prompt and Sana's complex human instruction too
    (their words become single tokens, as in Gemma's vocabulary), so those templates stay short.
    """
    from diffusers import SanaPipeline
    from transformers import GemmaTokenizer

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    templates = (_LUMINA2_SYSTEM_PROMPT + " <Prompt Start>", *chi)
    base, merges = _llama_vocab(tuple(corpus) + templates * 2, max_merges)
    specials = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>")
    vocab_list = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(t for t in base if t not in specials)]
    tokenizer = GemmaTokenizer(vocab={t: i for i, t in enumerate(_unique(vocab_list))}, merges=list(merges))
    tokenizer.add_bos_token = True  # Gemma prepends <bos>; built from a vocabulary it is off
    tokenizer.padding_side = "right"
    return tokenizer


def build_glm_tokenizer(corpus: Iterable[str], max_merges: int = 2000) -> PreTrainedTokenizerFast:
    """A GLM-4 style byte-level BPE tokenizer (what CogView4 loads from `THUDM/CogView4-6B`).

    Every encoding starts with GLM's prefix `[gMASK]<sop>`; padding is on the LEFT with
    `<|endoftext|>`, as GLM-4's tokenizer does; no end token.
    """
    from tokenizers import processors

    specials = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
    tokenizer = build_byte_bpe_tokenizer(
        specials, eos="<|endoftext|>", pad="<|endoftext|>", corpus=corpus, max_merges=max_merges
    )
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in ("[gMASK]", "<sop>")],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def default_corpus() -> list[str]:
    """The caption corpus the default tiny tokenizers are learned from (deterministic)."""
    captions = []
    for i, a in enumerate(_SUBJECTS):
        b = _SUBJECTS[(i * 7 + 3) % len(_SUBJECTS)]
        for j, scene in enumerate(_SCENES):
            c, d = _COLORS[(i + j) % len(_COLORS)], _COLORS[(i + 2 * j + 1) % len(_COLORS)]
            r = _RELATIONS[(i + j) % len(_RELATIONS)]
            caption = scene.format(a=a, b=b, c=c, d=d, r=r)
            # Some captions capitalised, so case-keeping tokenizers learn "A" and "The" too.
            captions.append(caption[0].upper() + caption[1:] if j % 2 else caption)
    return captions + [_BACKGROUND_WORDS]


@functools.lru_cache(maxsize=8)
def _clip_vocab(
    corpus: tuple[str, ...], max_merges: int
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    # Pre-tokenise exactly as the CLIP tokenizer will (lower-case, its regex, byte-level symbols).
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges = _learn_merges(words, max_merges)
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += _unique(a + b for a, b in merges)
    return (*vocab, "<|startoftext|>", "<|endoftext|>"), tuple(merges)


@functools.lru_cache(maxsize=8)
def _t5_pieces(corpus: tuple[str, ...], max_merges: int) -> tuple[tuple[str, float], ...]:
    words = _sentencepiece_words(corpus)
    merges = _learn_merges(words, max_merges)
    counts: Counter[str] = Counter()
    for word, n in words.items():
        for token in _apply_merges(word, merges):
            counts[token] += n
    total = sum(counts.values())
    # Pieces only used inside longer ones, and single characters, stay available but unlikely.
    floor = math.log(0.5 / total)
    base = _unique(
        ["▁", *string.ascii_letters, *string.digits, *string.punctuation, *(c for w in words for c in w)]
    )
    scores = {c: floor - 2.0 for c in base}
    scores.update({a + b: floor for a, b in merges})
    scores.update({t: math.log(n / total) for t, n in counts.items()})
    return tuple(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))


@functools.lru_cache(maxsize=8)
def _llama_vocab(
    corpus: tuple[str, ...], max_merges: int
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    words = _sentencepiece_words(corpus)
    merges = _learn_merges(words, max_merges)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = _unique(
        ["▁", *string.ascii_letters, *string.digits, *string.punctuation, *(c for w in words for c in w)]
    )
    vocab = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", *byte_tokens, *chars]
    return tuple(_unique(vocab + [a + b for a, b in merges])), tuple(merges)


@functools.lru_cache(maxsize=8)
def _byte_bpe_vocab(
    corpus: tuple[str, ...], max_merges: int
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """GPT-2 style byte-level BPE: the 256 byte symbols, then the merges learned on `corpus`."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] += 1
    merges = _learn_merges(words, max_merges)
    vocab = list(_bytes_to_unicode().values()) + _unique(a + b for a, b in merges)
    return tuple(vocab), tuple(merges)


def _sentencepiece_words(corpus: tuple[str, ...]) -> Counter[tuple[str, ...]]:
    """Corpus words as symbol tuples, "▁" marking a word start; letters, digits and punctuation apart.

    Keeping punctuation and digits out of letter runs stops merges such as "color," that real
    sentencepiece vocabularies do not have.
    """
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word in text.split():
            for k, piece in enumerate(re.findall(r"[^\W\d_]+|\S", word)):
                words[tuple("▁" + piece if k == 0 else piece)] += 1
    return words


def _learn_merges(
    words: Counter[tuple[str, ...]], max_merges: int, min_count: int = 2
) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair."""
    merges: list[tuple[str, str]] = []
    words = Counter(words)
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        # Most frequent first; ties broken by the pair itself so the result is deterministic.
        pair, n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_count:
            break
        merges.append(pair)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            merged[_merge_pair(symbols, pair)] += count
        words = merged
    return merges


def _apply_merges(symbols: tuple[str, ...], merges: list[tuple[str, str]]) -> tuple[str, ...]:
    for pair in merges:
        symbols = _merge_pair(symbols, pair)
    return symbols


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to unused code points."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# --------------------------------------------------------------------------------------------------
# The default corpus

# Captions the default tokenizers learn from. Each listed word occurs several times, so it ends up a
# single token; words outside the corpus ("hippopotamus", "catalog") split into sub-words.
_SUBJECTS = (
    "cat", "frog", "dog", "bird", "horse", "rabbit", "bear", "fish", "car", "tree", "house",
    "circle", "square", "triangle", "star", "ball", "cup", "boat", "flower", "man", "woman",
)  # fmt: skip
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
_RELATIONS = ("and", "next to", "on top of", "under", "behind", "in front of", "with", "left of", "right of")
_SCENES = (
    "a photo of a {a}",
    "a painting of a {c} {a}",
    "a {c} {a} {r} a {d} {b}",
    "the {a} is {c} and the {b} is {d}",
    "two {a}s and a {c} {b} in the garden",
    "a small {c} {a} sitting on the grass, high quality",
)


# Words seen once each: their frequent letter pairs become sub-word pieces, so words outside the
# corpus split into a few pieces rather than into single letters.
_BACKGROUND_WORDS = (
    "beautiful landscape mountain river sunset portrait detailed realistic lighting cinematic forest "
    "city street night morning drawing picture animal elephant giraffe monkey squirrel burger eating "
    "dancing running jumping flying standing walking playing holding wearing table chair window "
    "mirror kitchen bedroom ocean beach desert castle bridge robot astronaut dragon wizard knight "
    "princess guitar piano violin umbrella bicycle motorcycle airplane train rocket planet galaxy "
    "rainbow cloud snow rain storm fire water stone wood metal glass golden silver wooden tiny giant "
    "happy sad old young ancient modern futuristic colorful bright dark shadow reflection texture "
    "pattern surface photograph illustration watercolor sketch sculpture statue temple village "
    "island lake waterfall valley meadow flowers leaves branches sky moon sun stars light "
    "smiling looking sleeping reading writing singing cooking swimming climbing riding driving "
    "person people children family friends together alone crowded empty quiet peaceful magical"
)

# Lumina2Pipeline's default system prompt (set in its __init__), which its prompt template prepends.
_LUMINA2_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
_LLAMA_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

_QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<think>", "</think>",
)  # fmt: skip
# Qwen2 / Qwen3's chat layout for text and image messages (the real templates also handle tools).
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
_MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "<pad>",
)
_MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'] | selectattr('type', 'equalto', "
    "'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}</s>{% endif %}{% endfor %}"
)
