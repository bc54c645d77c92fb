"""The support matrix: which method works on which family, from one registry.

`attnctl families` prints it, the README's table is generated from it, `control()` refuses a pair
that is not ✓ before installing anything, and the tests run every ✓ pair on the family's tiny model
and check the refusal of every other.
"""

from __future__ import annotations

from typing import Any

# Every control that acts on a model, by its kind (the control's class name).
METHODS = (
    "AttentionMaps",
    "AttentionRegulation",
    "AttendAndExcite",
    "AStar",
    "SoftPAG",
    "PAG",
    "Layout",
    "DraftAttention",
)
# Methods that read where a prompt's words and its start/end tokens sit among the text keys.
NEED_SPANS = ("AttentionRegulation", "AttendAndExcite", "AStar", "Layout")
# Methods that perturb attention of image queries to image keys.
NEED_SELF = ("SoftPAG", "PAG")

SUPPORTED, NOT_APPLICABLE, MISSING = "✓", "–", "✗"


def status(adapter: Any, method: str) -> tuple[str, str]:
    """(SUPPORTED, "") where `method` works on the adapter's family; (NOT_APPLICABLE, why) where it
    does not apply to such a model; (MISSING, why) where it would apply but attnctl cannot do it."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    if method == "DraftAttention" and not adapter.video:
        return NOT_APPLICABLE, "an image model: DraftAttention's blocks are regions of video frames"
    if method == "Layout" and adapter.video:
        return NOT_APPLICABLE, "a video model: Layout's boxes are regions of one image"
    if method in adapter.refuses:
        return MISSING, adapter.refuses[method]
    if method in NEED_SPANS and not adapter.gives_prompt_spans():
        return MISSING, "attnctl does not know where this family's prompt start/end tokens sit yet"
    return SUPPORTED, ""


def matrix(adapters: list[Any]) -> list[tuple[Any, dict[str, tuple[str, str]]]]:
    """(adapter, {method: status}) for each adapter, in registry order."""
    return [(a, {m: status(a, m) for m in METHODS}) for a in adapters]


def markdown(adapters: list[Any]) -> str:
    """The matrix as a Markdown table, ✗ and – cells followed by a numbered reason below it."""
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for adapter, row in matrix(adapters):
        cells = []
        for mark, why in row.values():
            if mark != SUPPORTED:
                if why not in reasons:
                    reasons.append(why)
                mark = f"{mark}{reasons.index(why) + 1}"
            cells.append(mark)
        lines.append(f"| {adapter.title} (`{adapter.name}`) | " + " | ".join(cells) + " |")
    lines += ["", *(f"{i}. {why}" for i, why in enumerate(reasons, 1))]
    return "\n".join(lines)


# diffusers' cache hooks, by the name the first (or only) hook of each registers under.
CACHES = {
    "fbc_leader_block_hook": "FirstBlockCache",
    "taylorseer_cache": "TaylorSeerCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache_denoiser": "FasterCache",
    "mag_cache_leader_block_hook": "MagCache",
}
_SKIPPED = "its gradient forward needs every block, which this cache skips or predicts from earlier steps"
_REUSED = (
    "the cache reuses attention outputs in place of the gradient forward's own: no map there, and no gradient "
    "through the reused layers"
)
_BATCH = "the cache reuses attention outputs across denoiser calls whose batch the perturbed branch changes"
_HALF = (
    "the cache runs some steps on the conditional half of the batch alone, which attnctl's rows do not follow"
)
# (method, cache) pairs that cannot work together, with why; every other pair works (tests/test_interop.py).
CACHE_REFUSALS = {
    **{
        (m, c): _SKIPPED
        for m in ("AttendAndExcite", "AStar")
        for c in ("FirstBlockCache", "TaylorSeerCache", "MagCache")
    },
    **{(m, "PyramidAttentionBroadcast"): _BATCH for m in ("SoftPAG", "PAG")},
    **{(m, "PyramidAttentionBroadcast"): _REUSED for m in ("AttendAndExcite", "AStar")},
    **{(m, "FasterCache"): _HALF for m in METHODS if m != "DraftAttention"},
}


def caches_of(denoiser: Any, modules: list[tuple[str, Any]] | None = None) -> list[str]:
    """The diffusers caches enabled on a denoiser, found by their hooks (`modules`: its
    `named_modules()`, where the caller has walked them already)."""
    found = []
    for module in denoiser.modules() if modules is None else (m for _, m in modules):
        # the HookRegistry is an instance attribute: vars(), no getattr miss through nn.Module
        registry = vars(module).get("_diffusers_hook")
        if registry is not None:
            found += [CACHES[name] for name in getattr(registry, "hooks", {}) if name in CACHES]
    return list(dict.fromkeys(found))


# What the methods run together with, as tests/test_interop.py checks it: a feature's refused
# methods with why (every other method works with it).
_FULLGRAPH = "attnctl's denoiser hook and processors break a fullgraph graph (torch.compile without it works)"
INTEROP: dict[str, dict[str, str]] = {
    "torch.compile": {},
    "torch.compile(fullgraph=True)": dict.fromkeys(METHODS, _FULLGRAPH),
    **{cache: {m: why for (m, c), why in CACHE_REFUSALS.items() if c == cache} for cache in CACHES.values()},
    "LoRA (peft)": {},
    "model CPU offload": {},
    "group offload": {},
    "bfloat16": {},
}


def interop_markdown() -> str:
    """The "works with" table (feature x method) as Markdown, reasons numbered below it."""
    reasons: list[str] = []
    lines = ["| works with | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for feature, refused in INTEROP.items():
        cells = []
        for method in METHODS:
            why = refused.get(method)
            if why is not None and why not in reasons:
                reasons.append(why)
            cells.append(SUPPORTED if why is None else f"{MISSING}{reasons.index(why) + 1}")
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    lines += ["", *(f"{i}. {why}" for i, why in enumerate(reasons, 1))]
    return "\n".join(lines)
