"""HeadHunter: greedy selection of the attention heads whose perturbation guides best.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (NeurIPS 2025;
reference code cvlab-kaist/HeadHunter). S = ∅; each round, every remaining (layer, head) candidate c
is scored by generating the same M prompt/seed samples with SoftPAG on the heads S ∪ {c} and taking
the mean of an objective's per-image scores; the top k of the round join S. After R rounds S, in
order, is the selection: `SoftPAG(heads=RESULT, top=N)` reads its first N heads.

The result is plain JSON, rewritten atomically after every scored candidate, so an interrupted search
resumes where it stopped. Under `accelerate launch` the candidates of each round are shared out
among the processes a few at a time (one per process), the scores gathered after each such wave and
written by the main process: the same selection and scores as one process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.controls import _in_range, _range_rule, check, check_number, shown
from ..core.session import Session, control
from ..processors.softpag import PERTURBABLE, SoftPAG
from .distributed import Processes
from .objectives import Objective, objective_name

FORMAT = "attnctl.headhunter/1"
# Seeds of the search's samples (the compose benchmark's start at 424,242 and end below 460,000).
SEARCH_SEED = 900_000

# heads, as "layer:head" in selection order -> one score per sample (higher is better)
Scorer = Callable[[list[str]], Sequence[float]]


def search(
    pipe: Any,
    prompts: Sequence[str],
    objective: Objective,
    *,
    candidates: Sequence[str] | None = None,
    samples: int = 20,
    rounds: int = 1,
    top_k: int = 24,
    u: float = 1.0,
    scale: float = 3.0,
    guidance_scale: float | None = None,
    steps: int | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    call_kwargs: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Greedy head search on `pipe`; returns the result (also written to `out` after every candidate).

    candidates: "layer:head" strings (default: every head of every self/joint attention layer).
    samples: M generations per candidate; sample i is prompts[i % len(prompts)] with seeds[i]
        (default seeds SEARCH_SEED + i), generated `batch_size` at a time.
    rounds, top_k: R rounds, each adding its k best candidates to the selection.
    u, scale: SoftPAG's interpolation toward the identity map and its guidance scale.
    guidance_scale, steps: the pipeline's CFG scale and denoising steps (None: the pipeline's own);
        call_kwargs: further pipeline arguments (e.g. height, width).
    out, resume: the result JSON; with resume, candidates already scored in it are skipped, and a
        file from other settings is refused.
    """
    check(
        isinstance(prompts, (list, tuple))
        and bool(prompts)
        and all(isinstance(p, str) and p.strip() for p in prompts),
        "prompts",
        list(prompts[:3]) if isinstance(prompts, (list, tuple)) else prompts,
        "a non-empty list of non-empty prompts",
    )
    prompts = list(prompts)
    check(
        callable(objective),
        "objective",
        objective,
        "a function (images, prompts) -> one score per image, e.g. attnctl.headhunter.testbed",
    )
    check_number("samples", samples, low=1, integer=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    if steps is not None:
        check_number("steps", steps, low=1, integer=True)
    if guidance_scale is not None:
        check_number("guidance_scale", guidance_scale, low=0)
    check(isinstance(seeds, (list, tuple)) or seeds is None, "seeds", seeds, "a list of integer seeds")
    seeds = [SEARCH_SEED + i for i in range(samples)] if seeds is None else list(seeds)
    check(
        len(seeds) == samples and all(_in_range(s, True, 0, None) for s in seeds),
        "seeds",
        seeds[:3],
        f"{samples} seeds, one per sample: {_range_rule(True, 0, None)}",
    )
    every_head = candidate_heads(pipe)
    candidates = every_head if candidates is None else list(candidates)
    unknown = [c for c in candidates if c not in every_head]
    check(
        not unknown,
        "candidates",
        unknown[:3],
        f'self/joint attention heads of this model as "layer:head" (e.g. {every_head[0]!r})',
    )
    SoftPAG(every_head[:1], u=u, scale=scale)  # u and scale: SoftPAG's own checks, before any work

    call = dict(call_kwargs or {})
    if steps is not None:
        call["num_inference_steps"] = steps
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    call["output_type"] = "pil"
    sample_prompts = [prompts[i % len(prompts)] for i in range(samples)]
    settings = {
        "pipeline": type(pipe).__name__,
        "weights": weights_checksum(pipe),
        "samples": samples,
        "prompts": sample_prompts,
        "seeds": seeds,
        "u": u,
        "scale": scale,
        "batch_size": batch_size,
        "call": {k: v for k, v in sorted(call.items()) if isinstance(v, (bool, int, float, str))},
    }
    pipe.set_progress_bar_config(disable=True)
    score = _generation_scorer(pipe, sample_prompts, seeds, objective, u, scale, call, batch_size)
    return greedy(
        candidates,
        score,
        rounds=rounds,
        top_k=top_k,
        settings=settings,
        objective=objective_name(objective),
        out=out,
        resume=resume,
        progress=progress,
    )


def greedy(
    candidates: Sequence[str],
    score: Scorer,
    *,
    rounds: int,
    top_k: int,
    settings: dict[str, Any],
    objective: str,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """The greedy rounds over any scorer (`search` scores by generating; tests inject their own).

    Ties keep the candidates' order. `settings` (JSON data) and `objective` (a name) identify the
    search in the result file: a file from another search is refused instead of being mixed in."""
    candidates = list(candidates)
    check(
        bool(candidates) and len(set(candidates)) == len(candidates),
        "candidates",
        candidates[:3],
        "a non-empty list without repeats",
    )
    check_number("rounds", rounds, low=1, integer=True)
    check_number("top_k", top_k, low=1, integer=True)
    check(
        rounds <= len(candidates),
        "rounds",
        rounds,
        f"at most {len(candidates)}: each round picks at least one of the {len(candidates)} candidates",
    )
    check(
        rounds * top_k <= len(candidates),
        "top_k",
        top_k,
        f"at most {len(candidates) // rounds} for {rounds} round(s) over {len(candidates)} candidates",
    )
    procs = Processes()
    settings = json.loads(
        json.dumps({"candidates": candidates, "rounds": rounds, "top_k": top_k, **settings})
    )
    path = None if out is None else Path(out)
    if path is not None and path.exists() and not path.is_file():
        # the result is written by renaming a new file over it: that would replace a device or folder
        raise ValueError(f"out={str(path)!r} is not a regular file: give a file name")
    result = _resumed(path, settings, objective) if path is not None and resume else None
    if result is None:
        result = {
            "format": FORMAT,
            "objective": objective,
            "settings": settings,
            "selected": [],
            "finished": False,
            "rounds": [],
            "timing": {"wall_seconds": 0.0, "rounds": []},
        }
    started, earlier = time.perf_counter(), result["timing"]["wall_seconds"]

    def save() -> None:
        _add_timing(result, earlier + time.perf_counter() - started, procs.count)
        if path is not None and procs.is_main:
            _write_atomically(path, result)

    if path is not None and procs.is_main:
        try:  # written once before any scoring: an output that cannot be written is found at once
            save()
        except OSError as e:
            raise ValueError(f"out={str(path)!r} cannot be written: {e.strerror or e}") from None

    selected: list[str] = result["selected"]
    total = sum(len(candidates) - r * top_k for r in range(rounds))
    done = sum(len(entry["scores"]) for entry in result["rounds"])
    with tqdm(total=total, initial=done, unit="cand", disable=not (progress and procs.is_main)) as bar:
        for r in range(rounds):
            if r == len(result["rounds"]):
                result["rounds"].append(
                    {"base": list(selected), "scores": {}, "sample_scores": {}, "picked": None}
                )
                result["timing"]["rounds"].append({})
            entry, seconds = result["rounds"][r], result["timing"]["rounds"][r]
            if entry["picked"] is not None:
                continue
            bar.set_description(f"round {r + 1}/{rounds}")
            remaining = [c for c in candidates if c not in selected]
            todo = [c for c in remaining if c not in entry["scores"]]
            # One candidate per process at a time, gathered and saved before the next: an interruption
            # loses at most the wave in flight, and the scores stay in candidate order.
            for start in range(0, len(todo), procs.count):
                rows = []
                for candidate in procs.shard(todo[start : start + procs.count]):
                    begin = time.perf_counter()
                    values = [float(v) for v in score([*selected, candidate])]
                    rows.append((candidate, values, time.perf_counter() - begin))
                for candidate, values, spent in procs.gather(rows):
                    entry["sample_scores"][candidate] = values
                    entry["scores"][candidate] = sum(values) / len(values)
                    seconds[candidate] = spent
                save()
                best = max(entry["scores"], key=entry["scores"].get)
                bar.set_postfix_str(f"best {best} {entry['scores'][best]:.4g}")
                bar.update(len(todo[start : start + procs.count]))
            entry["picked"] = sorted(remaining, key=lambda c: -entry["scores"][c])[:top_k]
            selected.extend(entry["picked"])
            save()
    result["finished"] = True
    save()
    return result


def candidate_heads(pipe: Any, layers: Sequence[str | int] | None = None) -> list[str]:
    """Every head of the pipeline's self/joint attention layers (those matching `layers`, anchored
    patterns or block indices, if given) as "layer:head", in model order."""
    try:
        chosen = Session(pipe).select(None if layers is None else list(layers), kinds=PERTURBABLE)
    except ValueError as e:
        raise ValueError(
            f"layers={list(layers or [])!r} is not allowed: patterns or block indices naming self/joint "
            "attention layers of this model (`attnctl layers MODEL` lists them)"
        ) from e
    return [f"{layer.name}:{head}" for layer in chosen for head in range(layer.heads)]


def weights_checksum(pipe: Any) -> str:
    """Σ|w| over every model of the pipeline (float64): another or a retrained model gives another."""
    total = 0.0
    for _, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            for p in component.parameters():
                total += float(p.detach().abs().sum(dtype=torch.float64))
    return f"{total:.10e}"


def _generation_scorer(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    objective: Objective,
    u: float,
    scale: float,
    call: dict[str, Any],
    batch_size: int,
) -> Scorer:
    """Scores of the samples generated with SoftPAG on the given heads (one generator per sample, so
    a sample's image does not depend on which candidate or process generates it)."""

    def score(heads: list[str]) -> list[float]:
        values: list[float] = []
        with control(pipe, SoftPAG(heads, u=u, scale=scale)):
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
                images = pipe(batch, generator=generators, **call).images
                values.extend(_checked(objective(images, batch), len(batch), objective))
        return values

    return score


def _checked(scores: Sequence[float], n: int, objective: Objective) -> list[float]:
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        values = []
    if len(values) != n or not all(_finite(v) for v in values):
        raise ValueError(
            f"objective {objective_name(objective)!r} gave {shown(scores)} for {n} images: one finite "
            "score per image"
        )
    return values


def _resumed(path: Path, settings: dict, objective: str) -> dict | None:
    """The result saved at `path` when it is this search's; None when there is none yet."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        ok = saved["format"] == FORMAT and isinstance(saved.get("settings"), dict)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise ValueError(f"out={str(path)!r} is not a head-search result: give another file or remove it")
    theirs = saved["settings"]
    differ = ["objective"] if saved.get("objective") != objective else []
    differ += [k for k in dict.fromkeys([*settings, *theirs]) if settings.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(
            f"out={str(path)!r} holds a head search with other settings ({', '.join(differ)} differ): "
            "give another file, or start over without resuming (--no-resume, resume=False)"
        )
    problem = _shape_problem(saved, settings)
    if problem:
        raise ValueError(
            f"out={str(path)!r} is a damaged head-search result ({problem}): give another file, or start "
            "over without resuming (--no-resume, resume=False); the file is left as it is"
        )
    return saved


def _shape_problem(saved: dict, settings: dict) -> str | None:
    """What is wrong with a saved result's shape (None: nothing): its rounds, scores, picks and
    timing as `greedy` writes them: finite scores of candidates, top_k new candidates picked per
    round (a round unpicked only as the last), each round's base the picks before it, the selection
    the picks in order, one timing entry of finite seconds per round."""
    candidates, top_k = settings["candidates"], settings["top_k"]
    rounds, timing, selected = saved.get("rounds"), saved.get("timing"), saved.get("selected")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        return "'rounds' is not a list of rounds"
    if len(rounds) > settings["rounds"]:
        return f"{len(rounds)} rounds of a {settings['rounds']}-round search"
    if not isinstance(selected, list) or not isinstance(timing, dict):
        return "'selected' is not a list or 'timing' is not a mapping"
    spent = timing.get("rounds")
    if not isinstance(spent, list) or len(spent) != len(rounds):
        return "'timing' does not have one entry per round"
    if not all(isinstance(t, dict) and all(_finite(v) for v in t.values()) for t in spent):
        return "'timing' has a round that is not a mapping of seconds"
    if not _finite(timing.get("wall_seconds")):
        return "'timing' has no wall_seconds"
    picks: list[str] = []
    for i, entry in enumerate(rounds):
        scores, samples, picked = entry.get("scores"), entry.get("sample_scores"), entry.get("picked", ())
        if entry.get("base") != picks:
            return f"round {i}'s base is not the heads picked before it"
        if not isinstance(scores, dict) or not isinstance(samples, dict):
            return f"round {i} has no scores"
        if any(c not in candidates or c in picks or not _finite(v) for c, v in scores.items()):
            return f"round {i} scores a head that is no candidate left, or a score that is no finite number"
        if samples.keys() != scores.keys() or not all(
            isinstance(v, list) and v and all(_finite(x) for x in v) for v in samples.values()
        ):
            return f"round {i}'s sample scores are not finite numbers of the scored heads"
        if picked is None and i == len(rounds) - 1:
            continue
        if (
            not isinstance(picked, list)
            or len(picked) != top_k
            or len(set(picked)) != top_k
            or any(c not in candidates or c in picks for c in picked)
        ):
            return f"round {i} did not pick {top_k} new candidate head(s): {shown(picked)}"
        picks += picked
    if selected != picks:
        return "'selected' is not the heads the rounds picked"
    return None


def _finite(value: Any) -> bool:
    return _in_range(value, False, None, None)


def _add_timing(result: dict, wall_seconds: float, processes: int) -> None:
    timing = result["timing"]
    spent = [s for r in timing["rounds"] for s in r.values()]
    generations = sum(len(v) for entry in result["rounds"] for v in entry["sample_scores"].values())
    timing["wall_seconds"] = wall_seconds
    timing["processes"] = processes
    timing["generations"] = generations
    # per process: the time of one generation and its scoring
    timing["seconds_per_generation"] = sum(spent) / generations if generations else None


def _write_atomically(path: Path, result: dict) -> None:
    """Write then rename: a reader (or a resumed run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
