"""The denoiser level: a diffusers `ModelHook` on the UNet/transformer, the batch rows, and the
protocol a denoiser-level control fills in.

At each denoiser call the session tracks the step and the timestep and labels the batch rows
(`BatchRows`): the pipeline's `cache_context("cond"/"uncond")` names a one-branch call, else
diffusers' CFG stacking `[uncond, cond]` halves the batch. Then each registered `DenoiserWrapper`
may change the call (`before`), e.g. append perturbed rows and declare them in `session.rows`; after
each one the session reads the batch, grid and text length again, so attention calls see the batch
that really enters the denoiser. After the forward, `after` runs newest first and may fold the
output, e.g. perturbed rows into the prediction the pipeline's own CFG formula then combines.

`session` arguments are the live `Session` (typed Any: this module sits below the session).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..families.base import FamilyAdapter


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """Which rows of the batch entering the denoiser are unconditional, conditional and perturbed."""

    uncond: tuple[int, ...] = ()
    cond: tuple[int, ...] = ()
    perturbed: tuple[int, ...] = ()

    @classmethod
    def of_batch(
        cls, batch: int, branch: str | None, stacked_cfg: bool, order: tuple[str, str] = ("uncond", "cond")
    ) -> BatchRows:
        """The rows of a batch as the pipeline built it: one named branch ("cond" / "uncond"), CFG's
        halves in `order` (diffusers' usual `[uncond, cond]`), or (no CFG) all conditional."""
        rows = tuple(range(batch))
        if branch == "perturbed":  # a separate forward of a perturbed branch (SoftPAG's batch="split")
            return cls(perturbed=rows)
        if branch == "cond":
            return cls(cond=rows)
        if branch == "uncond":
            return cls(uncond=rows)
        if stacked_cfg and batch % 2 == 0:
            return cls(**dict(zip(order, (rows[: batch // 2], rows[batch // 2 :]), strict=True)))
        return cls(cond=rows)

    @property
    def size(self) -> int:
        return len(self.uncond) + len(self.cond) + len(self.perturbed)

    def subset(self, rows: tuple[int, ...]) -> BatchRows:
        """The rows of a call that holds only the batch rows `rows` (in that order), renumbered from 0."""
        index = {r: i for i, r in enumerate(rows)}
        groups = (self.uncond, self.cond, self.perturbed)
        return BatchRows(*(tuple(index[r] for r in group if r in index) for group in groups))

    def append_perturbed(self, count: int) -> BatchRows:
        """These rows and `count` perturbed rows appended at the end of the batch."""
        new = tuple(range(self.size, self.size + count))
        return dataclasses.replace(self, perturbed=self.perturbed + new)


class DenoiserWrapper:
    """A denoiser-level contribution around each denoiser call (`session.add_wrapper`).

    Override what you need; the rest passes the call through unchanged."""

    def before(self, session: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Change the call's arguments. A wrapper that adds rows to the batch declares them in
        `session.rows` (e.g. `session.rows = session.rows.append_perturbed(n)`)."""
        return args, kwargs

    def after(self, session: Any, module: torch.nn.Module, output: Any) -> Any:
        """Change the denoiser's output (e.g. fold the perturbed rows it added back out)."""
        return output


def take_rows(obj: Any, rows: list[int], batch: int, dims: dict[str, int] | None = None) -> Any:
    """Every tensor with the batch as its first dimension, restricted to `rows` (nested in tuples/dicts).
    `dims`: keyword arguments whose batch is another dimension (the adapter's `batch_dims`)."""
    return _map_batch(obj, lambda x: x[rows], batch, dims or {})


def append_rows(obj: Any, rows: list[int], batch: int, dims: dict[str, int] | None = None) -> Any:
    """Every tensor with the batch as its first dimension, with copies of `rows` appended at the end
    (nested in tuples/lists/dicts); e.g. the conditional rows again, as a perturbed branch. `dims`:
    as in `take_rows`."""
    index = row_index(rows)
    return _map_batch(
        obj, lambda x: x + x[rows] if isinstance(x, list) else torch.cat([x, x[index]]), batch, dims or {}
    )


def row_index(rows: list[int] | tuple[int, ...]) -> slice | list[int]:
    """Batch rows as an index of the same rows: a slice where they are consecutive (a view, no
    index tensor to build), else the list."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def _map_batch(obj: Any, fn: Callable[[Any], Any], batch: int, dims: dict[str, int], dim: int = 0) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.dim() > dim and obj.shape[dim] == batch:
            return fn(obj) if dim == 0 else fn(obj.movedim(dim, 0)).movedim(0, dim)
        return obj
    if isinstance(obj, tuple):
        return tuple([_map_batch(o, fn, batch, dims, dim) for o in obj])
    if isinstance(obj, list):
        if is_row_list(obj, batch):  # one entry per row (Z-Image's latents and captions, Qwen's img_shapes)
            return fn(_Rows(obj))
        return [_map_batch(o, fn, batch, dims, dim) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_batch(v, fn, batch, dims, dims.get(k, dim)) for k, v in obj.items()}
    return obj


def is_row_list(obj: Any, batch: int) -> bool:
    """Whether `obj` is a list with one entry per batch row (Z-Image's latents [C, F, H, W] and
    captions [L, D], Qwen-Image's `img_shapes`), not a list of batch-first tensors (IP-Adapter embeds)."""
    return (
        isinstance(obj, list)
        and len(obj) == batch
        and not all(isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == batch for o in obj)
    )


class _Rows(list):
    """A per-row list that `take_rows` / `append_rows` index like a batch-first tensor."""

    def __getitem__(self, rows: Any) -> Any:
        return (
            [list.__getitem__(self, r) for r in rows] if isinstance(rows, list) else super().__getitem__(rows)
        )


def latent_input(session: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable]:
    """The denoiser's latent input, and a function that puts a replacement back into (args, kwargs).
    A list of per-row latents (Z-Image) is given stacked and put back as a list."""
    name = session.adapter.latent_arg
    latent = args[0] if args else kwargs[name]
    rows = isinstance(latent, list)
    if rows:
        latent = torch.stack(latent)

    def put(new: torch.Tensor) -> tuple[tuple, dict]:
        new = list(new.unbind(0)) if rows else new
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, name: new})

    return latent, put


def denoiser_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The prediction in a denoiser's output (a `(sample, ...)` tuple with `return_dict=False`, else
    an output object with `.sample`), and a function that puts a replacement back in the same form;
    a list of per-row predictions (Z-Image) is given stacked and put back as a list. A replacement
    with fewer rows (perturbed rows folded out) cuts the output's other batch-first tensors alike."""
    sample = output[0] if isinstance(output, tuple) else output.sample
    rows = isinstance(sample, list)
    batch = len(sample)

    def put(new: torch.Tensor) -> Any:
        # other batch-first outputs (LTX-2's audio) lose the rows a wrapper appended and took out
        def fit(x: Any) -> Any:
            keep = len(new) < batch and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch
            return x[: len(new)] if keep else x

        new = list(new.unbind(0)) if rows else new
        if isinstance(output, tuple):
            return (new, *map(fit, output[1:]))
        others = {
            f.name: fit(getattr(output, f.name)) for f in dataclasses.fields(output) if f.name != "sample"
        }
        return dataclasses.replace(output, sample=new, **others)

    return (torch.stack(sample) if rows else sample), put


# Controls that only read attention: a run with them alone gives the plain pipeline's output, NaN
# included (a model that overflows in fp16 does so without attnctl too).
OBSERVERS = ("AttentionMaps",)


class DenoiserHook(ModelHook):
    """Tracks each denoiser forward and runs the wrappers around it. Stateful, so diffusers hands it
    the pipeline's cache context."""

    _is_stateful = True

    def __init__(self, session: Any, adapter: FamilyAdapter):
        super().__init__()
        self.session = session
        self.adapter = adapter
        self.state = StateManager(_NoState)  # receives cache_context("cond"/"uncond") from pipelines
        # the pipeline used the denoiser's hook registry itself (its cache contexts, or the reset of
        # stateful hooks at the end of a call): a run without attnctl leaves a registry too
        self.registry_used = False

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        session = self.session
        context = self.state._context
        self.registry_used |= context is not None
        session._begin_forward(
            module, self.adapter, context.name if context is not None else None, args, kwargs
        )
        for wrapper in session.wrappers:
            args, kwargs = wrapper.before(session, module, args, kwargs)
            session._read_batch(module, self.adapter, args, kwargs, changed_by=wrapper)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        session = self.session
        for wrapper in reversed(session.wrappers):
            output = wrapper.after(session, module, output)
        changing = [c.kind for c in session.controls if c.kind not in OBSERVERS]
        if changing and not session.guiding:
            prediction = denoiser_output(output)[0]
            if prediction.is_floating_point() and not torch.isfinite(prediction).all():
                raise ValueError(
                    f"the denoiser's prediction is not finite at step {session.step} under "
                    f"{', '.join(changing)}: a scale, step size or learning rate too large for this model; "
                    "the pipeline is restored"
                )
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.registry_used = True
        return module


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass
