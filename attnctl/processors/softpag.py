"""SoftPAG and PAG: perturb chosen attention heads in a perturbed branch and guide away from it.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (NeurIPS 2025,
reference code cvlab-kaist/HeadHunter) and "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance" (ECCV 2024; diffusers' PAG pipelines). Two levels, one module:

- the denoiser level (`PerturbedGuidance`): each denoiser call that has conditional rows gets a
  perturbed copy of them (`session.rows.perturbed`), and the perturbed prediction ε_p is folded into
  the conditional one, c' = ε_c + (s_t / w)·(ε_c - ε_p), so that the pipeline's own CFG formula
  yields ε_u + w·(ε_c - ε_u) + s_t·(ε_c - ε_p); without CFG, c' = ε_c + s_t·(ε_c - ε_p). No
  denoising loop is copied, the unconditional rows are never touched, and the same fold serves
  noise and flow (velocity) predictions;
- the attention level (`_PerturbHeads`): the perturbed rows' selected heads are perturbed inside
  attnctl's processor, so it works whatever the attention backend and composes with any kernel
  (DraftAttention) and observer (maps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..core.attention import AttentionCall, AttentionEdit, overrides
from ..core.controls import Control, check, param
from ..core.denoiser import DenoiserWrapper, append_rows, denoiser_output, row_index, take_rows
from .softpag_math import (
    TARGETS,
    cat_tokens_last,
    fold_into_cond,
    guidance_scale_at,
    image_scope_attention,
    perturbed_output,
)

SCOPES = ("joint", "image")
BATCH_MODES = ("auto", "split")
# Layers whose image queries attend to image keys: where a head can be perturbed.
PERTURBABLE = ("self", "joint")


# The fields SoftPAG and PAG share (one definition, one help text).
def _scale() -> Any:
    return param(3.0, low=0, help="Perturbation guidance scale s.")


def _adaptive_scale() -> Any:
    return param(0.0, low=0, help="s_t = max(0, s - adaptive_scale * (1000 - t)).")


def _scope() -> Any:
    return param(
        "joint",
        choices=SCOPES,
        help="Joint attention: perturb the whole sequence (joint) or only image queries (image).",
    )


def _batch() -> Any:
    return param(
        "auto",
        choices=BATCH_MODES,
        help="One batched forward with the perturbed rows (auto) or a second (split).",
    )


@dataclasses.dataclass
class SoftPAG(Control):
    """Soft perturbation of chosen attention heads, guided by ε_c - ε_p.

    heads: which heads, as a mapping {layer path: [head, ...]}, a list of "layer path:head" strings,
        or the path of a head-search result JSON (its "selected" list of "layer:head", in order).
    top: with a result JSON, use its first `top` heads (None: all).
    u: interpolation toward the target map, A' = (1 - u)·A + u·A_target (1: PAG's full perturbation).
    scale: perturbation guidance scale s. adaptive_scale: s_t = max(0, s - adaptive·(1000 - t)).
    target: "identity" (A_target = I: O' = (1 - u)·O + u·V) or "uniform" (O' = (1 - u)·O + u·mean(V)).
    scope: on joint-attention models, "joint" perturbs the whole joint sequence (the HeadHunter
        reference) and "image" only the image block: image queries attend to themselves and the
        text keys, text rows are intact (diffusers' SD3 PAG). Self-attention layers: the same.
    batch: "auto" (one batched forward of [uncond, cond, perturbed] where memory allows) or "split".
    """

    heads: dict[str, list[int]] | list[str] | str = param(
        kind="data",
        default_factory=list,
        help='Heads to perturb: {layer: [head, ...]}, ["layer:head", ...] or a head-search result JSON path.',
    )
    u: float = param(
        1.0, low=0, high=1, help="Interpolation toward the target map (1: PAG's full perturbation)."
    )
    scale: float = _scale()
    target: str = param(
        "identity", choices=TARGETS, help="Target map: identity (O' = V) or uniform (mean of V)."
    )
    adaptive_scale: float = _adaptive_scale()
    scope: str = _scope()
    batch: str = _batch()
    top: int | None = param(
        None,
        kind="integer",
        low=1,
        optional=True,
        help="With a result JSON: its first `top` heads (None: all).",
    )

    def validate(self) -> None:
        self._check_heads()
        if self.top is not None:
            check(isinstance(self.heads, str), "top", self.top, "None unless heads is a result JSON path")
            n = len(_selected(self.heads))
            check(self.top <= n, "top", self.top, f"at most the {n} heads selected in {self.heads}")

    def _check_heads(self) -> None:
        allowed = (
            'a non-empty {layer: [head, ...]} mapping, a list of "layer:head" strings, or a result JSON path'
        )
        h = self.heads
        if isinstance(h, str):
            path = Path(h)
            check(path.is_file(), "heads", h, "an existing head-search result JSON file")
            selected = _selected(h)
            check(
                isinstance(selected, list) and bool(selected),
                "heads",
                h,
                "a result JSON whose 'selected' list is not empty",
            )
            _parse_pairs(selected, "heads")
        elif isinstance(h, dict):
            ok = bool(h) and all(
                isinstance(k, str)
                and k
                and isinstance(v, (list, tuple))
                and v
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
                for k, v in h.items()
            )
            check(ok, "heads", h, allowed)
        elif isinstance(h, (list, tuple)):
            check(bool(h), "heads", h, allowed)
            _parse_pairs(h, "heads")
        else:
            check(False, "heads", h, allowed)

    def head_map(self) -> dict[str, list[int]]:
        """The heads as {layer pattern: [head, ...]}, in the given order (JSON: its first `top`)."""
        h = self.heads
        if isinstance(h, dict):
            return {k: list(v) for k, v in h.items()}
        pairs = _selected(h)[: self.top] if isinstance(h, str) else h
        out: dict[str, list[int]] = {}
        for layer, head in _parse_pairs(pairs, "heads"):
            out.setdefault(layer, []).append(head)
        return out

    def install(self, session: Any) -> None:
        heads: dict[str, tuple[int, ...] | None] = {}
        for pattern, chosen in self.head_map().items():
            try:
                chosen_layers = session.select([pattern], kinds=PERTURBABLE, heads=sorted(set(chosen)))
            except ValueError as e:  # the layer of a head, or a head index, this model does not have
                raise ValueError(f"SoftPAG heads of {pattern!r}: {e}") from None
            for layer in chosen_layers:
                heads[layer.name] = tuple(sorted(set(heads.get(layer.name) or ()) | set(chosen)))
        _install(session, heads, self.u, self.target, self.scope, self.scale, self.adaptive_scale, self.batch)


@dataclasses.dataclass
class PAG(Control):
    """Perturbed-Attention Guidance: every head of the chosen self-attention layers at u = 1.

    layers: layer paths or block indices (e.g. ["mid_block"], diffusers' "mid" on SD).
    scale, adaptive_scale: as SoftPAG (s_t = max(0, s - adaptive·(1000 - t))).
    scope, batch: as SoftPAG ("image" reproduces diffusers' SD3 PAG on joint attention).
    """

    layers: list[str | int] = param(
        kind="layers",
        default_factory=list,
        help='Self-attention layer paths or block indices to perturb (e.g. ["mid_block"]).',
    )
    scale: float = _scale()
    adaptive_scale: float = _adaptive_scale()
    scope: str = _scope()
    batch: str = _batch()

    def install(self, session: Any) -> None:
        heads = {layer.name: None for layer in session.select(self.layers, kinds=PERTURBABLE)}
        _install(session, heads, 1.0, "identity", self.scope, self.scale, self.adaptive_scale, self.batch)


def _install(session: Any, heads: dict, u: float, target: str, scope: str, scale, adaptive, batch) -> None:
    if u == 0 or scale == 0:
        return  # O' = O, or ε_c - ε_p weighted 0: exactly the unguided run, at no cost
    # SoftPAG and PAG together: one perturbed branch, perturbing the union of their heads
    shared = next((w for w in session.wrappers if isinstance(w, PerturbedGuidance)), None)
    if shared is None:
        session.add_wrapper(PerturbedGuidance(scale, adaptive, batch))
    elif (shared.scale, shared.adaptive_scale, shared.batch) != (scale, adaptive, batch):
        raise ValueError(
            "SoftPAG and PAG in one control() share one perturbed branch, so their scale, adaptive_scale "
            f"and batch must be equal; got {(shared.scale, shared.adaptive_scale, shared.batch)} and "
            f"{(scale, adaptive, batch)}"
        )
    layers = [layer for layer in session.layers if layer.name in heads]
    session.add_edit(layers, _PerturbHeads(heads, u, target, scope))


def _selected(path: str) -> Any:
    """The "selected" entry of a head-search result file; an unreadable file or one without it is
    one error naming `heads`."""
    try:
        return json.loads(Path(path).read_text())["selected"]
    except OSError as e:
        reason = e.strerror or type(e).__name__
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except RecursionError:
        reason = "JSON nested too deeply"
    except json.JSONDecodeError as e:
        reason = f"not JSON: {e}"
    except (ValueError, KeyError, TypeError):
        reason = "no 'selected' list"
    raise ValueError(f"heads={path!r} is not allowed: a JSON file with a 'selected' list ({reason})")


def _parse_pairs(pairs: Any, name: str) -> list[tuple[str, int]]:
    out = []
    for p in pairs:
        layer, _, head = p.rpartition(":") if isinstance(p, str) else ("", "", "")
        check(
            bool(layer) and head.isascii() and head.isdigit(),
            name,
            p,
            '"layer path:head index" strings, e.g. "mid_block.attentions.0.transformer_blocks.0.attn1:3"',
        )
        out.append((layer, int(head)))
    return out


# Per call shape (and thread count, kernel choice): whether `_PerturbHeads`' short way gives the
# bits of the long one. A property of the kernels, not of a run: found once per process.
_SAME_BITS: dict[tuple, bool] = {}


class _PerturbHeads(AttentionEdit):
    """O' = (1 - u)·O + u·A_target·V on the perturbed rows' selected heads; nothing else changes."""

    def __init__(self, heads: dict[str, tuple[int, ...] | None], u: float, target: str, scope: str):
        self.heads, self.u, self.target, self.scope = heads, u, target, scope
        self._filled = False
        self._rest: dict[tuple[str, int], list[int]] = {}  # the heads left as they are, per layer

    def active(self, session: Any, layer: Any) -> bool:
        return bool(session.rows.perturbed)

    def kernel(self, call: AttentionCall) -> torch.Tensor | None:
        """At u = 1 with the identity target the perturbed rows' selected heads need no attention
        over the image block: their output is V, or with the image scope each image query's mix of
        its own value and the text keys' (`image_scope_attention`). The model's kernel runs on the
        other rows and the perturbed rows' other heads only. Any other kernel edit (e.g.
        DraftAttention) computes everything instead, and `mix_output` overwrites those heads.

        Where the perturbed rows' q, k and v are still bit for bit the conditional rows' they copy
        (at the first perturbed layer of a forward nothing has told them apart yet), their
        unperturbed part (the other heads; with the image scope, the text queries) is the
        conditional rows' output over again, and is taken from it instead of another kernel call
        (on the CPU, where PyTorch's SDPA is the model's kernel).

        Both are the same mathematically as running the model's kernel on every row and heads and
        overwriting the perturbed part (`_whole`, what the image scope did before); bit for bit
        they are where the kernel's blocking does not depend on the rows, heads or queries a call
        holds, which depends on the shapes and the thread count (PyTorch's CPU flash attention:
        almost always). So the first call of each shape in a process computes both ways and
        compares them, and only a shape found identical takes the short way after that."""
        if self.u != 1 or self.target != "identity" or call.mask is not None:
            return None
        perturbed = call.rows.perturbed  # appended last (`append_perturbed`), or a call of their own
        if (
            not perturbed
            or perturbed[-1] != call.query.shape[0] - 1
            or len(perturbed) != perturbed[-1] - perturbed[0] + 1
        ):
            return None
        if any(e is not self and overrides(e, "kernel") for e in call.edits):
            return None
        first = perturbed[0]
        heads = self.heads[call.layer.name]
        image_scope = self._image_scope(call)
        others = call.model_output(first) if first else None
        twins = _twin_output(call, first, others)  # the conditional rows' output, where they are copies
        out = self._short(call, first, heads, image_scope, others, twins)
        self._filled = True
        if not image_scope and (heads is None or twins is None):
            return out  # what the identity target has always computed: no other way to compare with
        q, k = call.query, call.key
        layout = call.layout
        shape = (q.shape, q.stride(), k.shape[2], k.stride(), q.dtype, call.rows.cond, heads, twins is None)
        shape += (layout.image_q.start, layout.image_q.stop, layout.image_k.start, layout.image_k.stop)
        choice = torch._fused_sdp_choice(q, k, call.value) if call.native else None  # PyTorch's CPU kernel
        shape += (torch.get_num_threads(), choice, call.native)
        same = _SAME_BITS.get(shape)
        if same is None:
            expected = self._whole(call, first, heads, image_scope)  # last: its cached denominators stay
            _SAME_BITS[shape] = torch.equal(out, expected)
            return expected
        return out if same else self._whole(call, first, heads, image_scope)

    def _alone(
        self,
        call: AttentionCall,
        first: int,
        heads: tuple[int, ...] | None,
        image_scope: bool,
        others: torch.Tensor | None,
        twins: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = call.query, call.key, call.value
        own = slice(first, None)
        qp, kp, vp = q[own], k[own], v[own]
        if heads is not None:
            chosen = list(heads)
            qp, kp, vp = qp[:, chosen], kp[:, chosen], vp[:, chosen]
        if image_scope:
            layout = call.layout
            plain = None if twins is None else (twins if heads is None else twins[:, chosen])
            goal = image_scope_attention(qp, kp, vp, layout.image_k, call.scale, layout.image_q, plain=plain)
        else:
            goal = _own(call, vp)
        goal = goal if goal.dtype == v.dtype else goal.to(v.dtype)
        if heads is not None:
            rest = self._rest_heads(call, heads)
            block = v.new_empty((q.shape[0] - first,) + q.shape[1:3] + v.shape[3:])
            if rest:
                block[:, rest] = (
                    twins[:, rest]
                    if twins is not None
                    else call.default_kernel(
                        q[own][:, rest], k[own][:, rest], v[own][:, rest], None, call.kernel_scale
                    )
                )
            block[:, chosen] = goal
            goal = block
        return goal if others is None else cat_tokens_last([others, goal], dim=0)

    _short = _alone  # the short way `kernel` takes: a name of its own, which the tests replace

    def _whole(
        self, call: AttentionCall, first: int, heads: tuple[int, ...] | None, image_scope: bool
    ) -> torch.Tensor:
        """The output the long way: the model's kernel on every row (image scope; the identity
        target: on the other rows and the perturbed rows' other heads), the perturbed part
        overwritten."""
        if not image_scope:
            return self._alone(call, first, heads, False, call.model_output(first) if first else None, None)
        q, k, v = call.query, call.key, call.value
        own = slice(first, None)
        out = call.model_output()
        layout = call.layout
        goal = image_scope_attention(q[own], k[own], v[own], layout.image_k, call.scale, layout.image_q)
        mixed = perturbed_output(out[own], goal, heads, 1.0, "identity")
        return _with_last_rows(out, first, mixed)

    def _rest_heads(self, call: AttentionCall, heads: tuple[int, ...]) -> list[int]:
        key = (call.layer.name, call.query.shape[1])
        if key not in self._rest:
            self._rest[key] = [h for h in range(call.query.shape[1]) if h not in heads]
        return self._rest[key]

    def mix_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if self._filled:
            self._filled = False
            return out
        rows = list(call.rows.perturbed)
        if not rows:  # a kernel call of other rows only (a processor that runs row by row)
            return out
        heads = self.heads[call.layer.name]
        index = row_index(rows)  # a slice: the perturbed rows come last
        if self._image_scope(call):
            goal = image_scope_attention(
                call.query[index],
                call.key[index],
                call.value[index],
                call.layout.image_k,
                call.scale,
                call.layout.image_q,
            )
            mixed = perturbed_output(out[index], goal, heads, self.u, "identity")
        else:
            mixed = perturbed_output(
                out[index], _values(call, index, self.target), heads, self.u, self.target
            )
        if isinstance(index, slice) and index.stop == out.shape[0]:
            return _with_last_rows(out, index.start, mixed)
        return out.index_copy(0, torch.tensor(rows, device=out.device), mixed)

    def _image_scope(self, call: AttentionCall) -> bool:
        return self.scope == "image" and call.layer.kind == "joint" and call.layout.text_k is not None


def _with_last_rows(x: torch.Tensor, start: int, rows: torch.Tensor) -> torch.Tensor:
    """`x` with its batch rows from `start` on (the last ones) replaced by `rows`: a new tensor, `x`
    unchanged."""
    return torch.cat([x[:start], rows]) if start else rows


def _twin_output(call: AttentionCall, first: int, others: torch.Tensor | None) -> torch.Tensor | None:
    """The attention output of the conditional rows that the perturbed rows (from `first` on) copy,
    where their q, k and v are still bit for bit the same; else None. `others`: the model's output
    of the rows before `first`. Only where that is PyTorch's SDPA on the CPU (`call.native`): the
    comparison reads the tensors, which on an accelerator would wait for it."""
    cond = row_index(call.rows.cond)
    own = slice(first, call.query.shape[0])
    if others is None or not call.native or call.query.device.type != "cpu" or not isinstance(cond, slice):
        return None
    if cond.stop > first or cond.stop - cond.start != own.stop - own.start:
        return None
    if not all(torch.equal(x[cond], x[own]) for x in (call.query, call.key, call.value)):
        return None
    return others[cond]


def _values(call: AttentionCall, rows: list[int] | slice, target: str) -> torch.Tensor:
    """The values the target mixes in: each query's own (identity) or, for the uniform target, the
    keys' values with masked keys left out of the mean."""
    v = call.value[rows]
    if target == "identity":
        return _own(call, v)
    if call.mask is None:
        return v
    mask = call.mask if call.mask.shape[0] == 1 else call.mask[rows]
    check(mask.shape[-2] == 1, "target", target, "'identity' on layers with a per-query attention mask")
    keep = (mask if mask.dtype == torch.bool else mask > float("-inf")).to(v.dtype)[..., 0, :, None]
    mean = (v * keep).sum(2, keepdim=True) / keep.sum(2, keepdim=True).clamp_min(1)
    return mean.expand_as(v)


def _image_q(call: AttentionCall) -> slice | None:
    """The image queries where a call's queries are not its keys (Qwen-Image 2.1: the image only)."""
    return None if call.query.shape[2] == call.key.shape[2] else call.layout.image_q


def _own(call: AttentionCall, v: torch.Tensor) -> torch.Tensor:
    """Each query's own value (the identity target). Where a call's queries are only its image
    tokens, fewer than its keys (Qwen-Image 2.1's target image over [text prefix ; target]), they are
    the image keys."""
    queries, image_q, image_k = call.query.shape[2], call.layout.image_q, call.layout.image_k
    if v.shape[2] == queries:
        return v
    if image_q != slice(0, queries) or image_k.stop - image_k.start != queries:
        raise ValueError(f"{call.layer.name}: the identity target needs each query's own key")
    return v[:, :, image_k]


class PerturbedGuidance(DenoiserWrapper):
    """Adds the perturbed branch to every conditional denoiser call and folds it back out.

    batch: "auto" runs [uncond, cond, perturbed] as one batched forward (on CUDA only while the
    device's free memory is at least the model's parameter memory, a proxy for one more branch of
    activations; else as "split"); "split" runs the perturbed rows as a second forward.
    """

    def __init__(self, scale: float, adaptive_scale: float = 0.0, batch: str = "auto"):
        self.scale = scale
        self.adaptive_scale = adaptive_scale
        self.batch = batch
        self._scale_now = 0.0  # s_t of the current call; 0: no branch in this call
        self._split_inputs: tuple | None = None
        self._nested = False

    def before(self, session: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._nested or session.guiding:
            # a forward inside this call (split mode's perturbed rows, or latent guidance's gradient
            # forward): it gets no branch and must not touch the state of the call around it
            return args, kwargs
        self._scale_now = 0.0
        if not session.rows.cond:
            return args, kwargs
        if self.adaptive_scale:
            self._scale_now = guidance_scale_at(self.scale, self.adaptive_scale, _scheduler_timestep(session))
        else:
            self._scale_now = self.scale
        if self._scale_now == 0:
            return args, kwargs  # s_t = 0 (adaptive schedule): the unguided call, exactly
        cond = session.cond_rows
        if self._split(module):
            self._split_inputs = take_rows((args, kwargs), cond, session.batch, session.adapter.batch_dims)
            return args, kwargs
        session.rows = session.rows.append_perturbed(len(cond))
        return append_rows((args, kwargs), cond, session.batch, session.adapter.batch_dims)

    def after(self, session: Any, module: torch.nn.Module, output: Any) -> Any:
        if self._nested or session.guiding or self._scale_now == 0:
            return output
        prediction, put = denoiser_output(output)
        rows = session.rows
        if self._split_inputs is not None:
            perturbed = self._perturbed_forward(session, module)
            base = prediction
        else:
            perturbed = prediction[row_index(rows.perturbed)]
            base = prediction[: rows.size - len(rows.perturbed)]
        if perturbed.dtype != base.dtype:
            perturbed = perturbed.to(base.dtype)
        cond = row_index(rows.cond)
        guided = fold_into_cond(base[cond], perturbed, self._scale_now, _cfg_scale(session))
        if isinstance(cond, slice) and cond.stop == len(base):  # [uncond, cond] or cond alone
            return put(_with_last_rows(base, cond.start, guided))
        folded = base.clone()
        folded[cond] = guided
        return put(folded)

    def _split(self, module: torch.nn.Module) -> bool:
        if self.batch == "split":
            return True
        param = next(module.parameters(), None)
        if param is None or param.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(param.device)
        need = sum(p.numel() * p.element_size() for p in module.parameters())
        return free < need

    def _perturbed_forward(self, session: Any, module: torch.nn.Module) -> torch.Tensor:
        """The perturbed rows as a forward of their own (split mode); the session's view of the
        outer call is put back afterwards."""
        args, kwargs = self._split_inputs
        self._split_inputs = None
        saved = (session.rows, session.batch, session.grid, session.text_len, session.branch)
        self._nested = True
        session.branch = "perturbed"
        try:
            output = module(*args, **kwargs)
        finally:
            self._nested = False
            session.rows, session.batch, session.grid, session.text_len, session.branch = saved
        return denoiser_output(output)[0]


def _cfg_scale(session: Any) -> float | None:
    """The pipeline's CFG scale w when it combines ε_u + w·(ε_c - ε_u) after this call, else None."""
    pipe = session.pipe
    guider = getattr(pipe, "guider", None)  # diffusers' guiders: a second condition is CFG's negative
    if session.rows.uncond or getattr(pipe, "do_classifier_free_guidance", False):
        return session.adapter.cfg_scale(pipe)
    if guider is not None and getattr(guider, "num_conditions", 1) > 1:
        return session.adapter.cfg_scale(pipe)
    if session.adapter.cfg_forwards and session._batched_cfg(None):  # separate, unnamed forwards
        return session.adapter.cfg_scale(pipe)
    return None


def _scheduler_timestep(session: Any) -> float:
    """The step's timestep in the scheduler's 0-1000 convention (FLUX passes t / 1000 to its model)."""
    timesteps = getattr(session.pipe.scheduler, "timesteps", None)
    if timesteps is not None and 0 <= session.step < len(timesteps):
        return float(timesteps[session.step])
    return float(session.timestep or 0.0)
