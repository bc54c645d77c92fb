"""`attnctl.control(pipe, *controls)`: install controls on entry, restore the pipeline exactly on exit.

Three hook points, one per level (DESIGN.md):
- attention: an `AttnctlProcessor` replaces the processor of each layer a control selects;
- denoiser: a diffusers `ModelHook` (`denoiser.py`) tracks the step, the timestep, the token grid and
  which batch rows are uncond / cond / perturbed, and runs the controls' `DenoiserWrapper`s;
- sampler: controls may wrap methods of the pipeline's objects on the instance (restored on exit).
Everything installed is recorded as an undo action and undone in reverse order in a `finally`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any, Generic, TypeVar

import torch
from diffusers.hooks import HookRegistry

from ..families import FamilyAdapter, LayerInfo, adapter_for
from ..families.base import attention_modules, set_processor
from ..families.support import CACHE_REFUSALS, METHODS, SUPPORTED, caches_of, status
from .attention import AttentionEdit
from .controls import Control
from .denoiser import BatchRows, DenoiserHook, DenoiserWrapper
from .layers import LayerSelection, SelectedLayer
from .processor import AttnctlProcessor, open_seam
from .tokens import TokenTruncatedError

T = TypeVar("T")

HOOK_NAME = "attnctl"
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
# The cache contexts diffusers' guiders name a pipeline's forwards with (ClassifierFreeGuidance's
# `_input_predictions`, e.g. HunyuanVideo 1.5), as the branches they are.
_GUIDER_BRANCHES = {"pred_cond": "cond", "pred_uncond": "uncond"}
# Other guidance forwards a pipeline names "uncond_<kind>" (LTX-2: "uncond_stg", "uncond_modality"):
# predictions its formula subtracts, so the unconditional branch for controls.
_UNCOND_PREFIX = "uncond_"


class _Wrapped:
    """A session's replacement of a method on an instance. A deep copy of the instance (LTX-2's
    pipeline copies its scheduler for the audio) gets the method as it was, not the replacement."""

    def __init__(self, fn: Callable, owner: Any, attr: str, had: bool, previous: Any):
        functools.update_wrapper(self, fn)  # inspect.signature sees fn's (pipelines inspect `step`)
        self.fn, self.owner, self.attr, self.had, self.previous = fn, owner, attr, had, previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        twin = memo.get(id(self.owner))
        if twin is None:
            return self
        if self.had:
            return copy.deepcopy(self.previous, memo)
        return getattr(type(self.owner), self.attr).__get__(twin)


@contextlib.contextmanager
def control(pipe: Any, *controls: Control) -> Iterator[Session]:
    """Install `controls` on a diffusers pipeline for the duration of a `with` block.

    The pipeline is called as usual inside the block. On exit, also after an exception, every
    attention processor, hook and wrapped method is put back exactly as it was.
    """
    for c in controls:
        if not isinstance(c, Control):
            raise TypeError(f"control(...) takes attnctl controls, got {c!r} ({type(c).__name__})")
    session = Session(pipe)
    try:
        session.install(controls)
        yield session
    finally:
        session.restore()


class Session:
    """What `control(...)` yields: live state during generation and results afterwards (`maps`)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        # A denoiser compiled as `torch.compile(module)` is controlled through the module it wraps:
        # attnctl's processors and hook live there, and the compiled wrapper calls it.
        self.denoisers = [
            getattr(d, "_orig_mod", d)
            for d in (getattr(pipe, a, None) for a in DENOISER_ATTRS)
            if isinstance(d, torch.nn.Module)
        ]
        if not self.denoisers:
            raise ValueError(
                f"{type(pipe).__name__} has no denoiser (looked for {', '.join(DENOISER_ATTRS)}); "
                "attnctl.control needs a diffusers pipeline"
            )
        self.adapters = [adapter_for(d) for d in self.denoisers]
        self.adapter = self.adapters[0]
        self.layers: list[LayerInfo] = self.adapter.layers(self.denoisers[0])
        self.controls: list[Control] = []
        self.wrappers: list[DenoiserWrapper] = []  # denoiser level, in the order added
        self.generation_hooks: list[Callable[[Session], None]] = []  # called as each generation starts
        self.maps: Any = None  # filled by AttentionMaps (an attnctl.processors.maps.MapStore)
        # live state, updated at every denoiser forward
        self.step = -1  # index of the denoising step of the current forward
        self.timestep: float | None = None
        self.branch: str | None = None  # forced "cond"/"uncond" for forwards made by controls
        self.guiding = False  # True during a control's own gradient forward (latent guidance)
        self.log: dict[str, list[dict]] = {}  # per control kind: what it did (e.g. guidance losses)
        self.rows = BatchRows()  # of the batch entering the denoiser, after the wrappers' changes
        self.batch = 0
        self.grid: tuple[int, int, int] = (1, 0, 0)
        self.text_len: int | None = None
        self.prompt: str | list[str] | None = None
        # CFG as the pipeline told its `encode_prompt` (PixArt, AuraFlow keep it in a local variable)
        self.prompt_cfg: bool | None = None
        self.generation = 0  # counts pipeline calls (generations) seen in this session
        self._forwards_since_prompt = 0
        self._step_forwards = 0  # the pipeline's own denoiser forwards at this step (not controls')
        self._edits: dict[str, list[AttentionEdit]] = {}
        self._signatures: dict[Any, _Binder | None] = {}  # of the denoisers' forwards
        self._installed: list[_Installed] = []  # attnctl's processors, and what each stands in for
        self._undo: list[Callable[[], None]] = []

    # ---- installing -------------------------------------------------------------------------
    def install(self, controls: tuple[Control, ...]) -> None:
        """Check that the controls work on this pipeline and together, then install each; `control()` calls it."""
        # one walk over each denoiser's modules serves the checks and the backend snapshot
        walked = [list(d.named_modules()) for d in self.denoisers]
        attention = [attention_modules(d, modules) for d, modules in zip(self.denoisers, walked, strict=True)]
        self._check_not_controlled(attention)
        self._check_not_fullgraph(controls, [m for modules in walked for _, m in modules])
        caches = [c for d, modules in zip(self.denoisers, walked, strict=True) for c in caches_of(d, modules)]
        for c in controls:
            mark, why = status(self.adapter, c.kind) if c.kind in METHODS else (SUPPORTED, "")
            if mark != SUPPORTED:
                raise ValueError(
                    f"{c.kind} does not work on {type(self.denoisers[0]).__name__} ({self.adapter.name}): "
                    f"{why} (`attnctl families` lists what works where)"
                )
            for cache in caches:
                if (c.kind, cache) in CACHE_REFUSALS:
                    raise ValueError(f"{c.kind} does not work with {cache}: {CACHE_REFUSALS[c.kind, cache]}")
        self.controls = list(controls)
        for denoiser, adapter, modules in zip(self.denoisers, self.adapters, attention, strict=True):
            self._snapshot_backends(modules)
            self._install_hook(denoiser, adapter)
        self._wrap_method(self.pipe, "encode_prompt", self._on_encode_prompt)
        for c in controls:
            c.install(self)

    def _check_not_controlled(self, attention: list[dict[str, torch.nn.Module]]) -> None:
        """One session per pipeline: a second one would stack hooks and processors on the first's,
        and its exit could not restore them in order. Checked before anything is installed.
        `attention`: each denoiser's attention modules."""
        for denoiser, modules in zip(self.denoisers, attention, strict=True):
            registry = getattr(denoiser, "_diffusers_hook", None)
            hooked = registry is not None and HOOK_NAME in getattr(registry, "hooks", {})
            swapped = any(isinstance(m.processor, AttnctlProcessor) for m in modules.values())
            if hooked or swapped:
                raise ValueError(
                    f"attnctl.control: this {type(self.pipe).__name__} is already inside an attnctl.control "
                    "block (or a *ControlPipeline call); give all controls to one control(pipe, *controls) "
                    "instead of nesting them"
                )

    def _check_not_fullgraph(self, controls: tuple[Control, ...], modules: list[torch.nn.Module]) -> None:
        """attnctl's denoiser hook and processors run Python that a graph compiled with
        fullgraph=True cannot hold: refused before anything is installed, naming what breaks it.
        `modules`: every module of the denoisers."""
        compiled = [getattr(self.pipe, a, None) for a in DENOISER_ATTRS] + modules
        if any(_fullgraph(m) for m in compiled if isinstance(m, torch.nn.Module)):
            names = ", ".join(c.kind for c in controls) or "control() itself"
            raise ValueError(
                f"{names} cannot run in a denoiser compiled with fullgraph=True: attnctl's denoiser hook and "
                "attention processors break the graph; compile without it (torch.compile(model), "
                "model.compile() or compile_repeated_blocks())"
            )

    def select(
        self, layers: Any = None, kinds: tuple[str, ...] | None = None, heads: Any = None
    ) -> list[SelectedLayer]:
        """Resolve a control's `layers` value (None, a pattern, or a list of patterns/indices) and
        `heads` (None: every head)."""
        if isinstance(layers, (str, int)):
            layers = [layers]
        selection = LayerSelection(
            None if layers is None else tuple(layers), kinds, None if heads is None else tuple(heads)
        )
        return selection.resolve(self.layers)

    def add_edit(self, layers: list[LayerInfo], edit: AttentionEdit) -> None:
        """Route `edit` into the given layers, installing attnctl's processor where needed."""
        for layer in layers:
            if layer.name not in self._edits:
                self._edits[layer.name] = []
                for denoiser, adapter in zip(self.denoisers, self.adapters, strict=True):
                    self._swap_processor(denoiser, adapter, layer)
            self._edits[layer.name].append(edit)

    def add_wrapper(self, wrapper: DenoiserWrapper) -> None:
        """Run `wrapper` around every denoiser call (its `after` in reverse order of adding)."""
        self.wrappers.append(wrapper)

    def installed_edits(self) -> list[AttentionEdit]:
        """Every attention edit installed, in any layer, each once."""
        return list({id(e): e for edits in self._edits.values() for e in edits}.values())

    def edits_for(self, layer: LayerInfo) -> list[AttentionEdit]:
        """The attention edits taking part in the current call of `layer`."""
        return [e for e in self._edits.get(layer.name, ()) if e.active(self, layer)]

    def wrap(self, owner: Any, attr: str, wrapper: Callable[[Callable], Callable]) -> None:
        """Replace `owner.attr` on the instance by `wrapper(original)` until the session ends."""
        had = attr in vars(owner)
        previous = vars(owner).get(attr)
        setattr(owner, attr, _Wrapped(wrapper(getattr(owner, attr)), owner, attr, had, previous))

        def undo() -> None:
            if had:
                setattr(owner, attr, previous)
            else:
                delattr(owner, attr)

        self._undo.append(undo)

    def _wrap_method(self, owner: Any, attr: str, before: Callable[[tuple, dict], None]) -> None:
        if not callable(getattr(owner, attr, None)):
            return

        def wrapper(original: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any) -> Any:
                before(args, kwargs)
                return original(*args, **kwargs)

            return call

        self.wrap(owner, attr, wrapper)

    def _install_hook(self, denoiser: torch.nn.Module, adapter: FamilyAdapter) -> None:
        had_registry = hasattr(denoiser, "_diffusers_hook")
        had_forward = "forward" in vars(denoiser)
        previous_forward = vars(denoiser).get("forward")
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        hook = DenoiserHook(self, adapter)
        registry.register_hook(hook, HOOK_NAME)

        def undo() -> None:
            registry.remove_hook(HOOK_NAME, recurse=False)
            if had_forward:
                denoiser.forward = previous_forward
            else:
                vars(denoiser).pop("forward", None)
            # A pipeline that uses the registry itself (cache contexts; resetting stateful hooks at
            # the end of its call) makes one: then a run without attnctl would have left it too.
            if not had_registry and not hook.registry_used:
                del denoiser._diffusers_hook

        self._undo.append(undo)

    def _snapshot_backends(self, modules: dict[str, torch.nn.Module]) -> None:
        """Put every processor's attention backend settings back on exit, even if changed meanwhile
        (`modules`: a denoiser's attention modules)."""
        saved = [
            (proc, {a: vars(proc)[a] for a in ("_attention_backend", "_parallel_config") if a in vars(proc)})
            for proc in (m.processor for m in modules.values())
            if hasattr(proc, "_attention_backend")
        ]

        def undo() -> None:
            for proc, attrs in saved:
                for a in ("_attention_backend", "_parallel_config"):
                    if a in attrs:
                        setattr(proc, a, attrs[a])
                    else:
                        vars(proc).pop(a, None)  # it was the class default

        self._undo.append(undo)

    def _swap_processor(self, denoiser: torch.nn.Module, adapter: FamilyAdapter, layer: LayerInfo) -> None:
        try:
            module = denoiser.get_submodule(layer.name)
        except AttributeError:
            return  # a second denoiser (e.g. Wan 2.2's transformer_2) may lack this layer
        installed = _Installed(module, layer, adapter, module.processor)
        self._installed.append(installed)
        self._undo.append(lambda: set_processor(module, installed.original))
        self._wrap_processor(installed)

    def _wrap_processor(self, installed: _Installed) -> None:
        if installed.adapter.seam is not None:
            self._undo.append(open_seam(installed.original, installed.adapter.seam))
        set_processor(
            installed.module, AttnctlProcessor(installed.original, self, installed.layer, installed.adapter)
        )

    def _follow_processor_changes(self) -> None:
        """A processor the user set inside the block (`set_attn_processor`, `enable_attention_slicing`,
        `fuse_qkv_projections`...) is found at the next denoiser call and becomes the one attnctl
        wraps, and the one left on exit. One that attnctl cannot take q, k and v from on a family
        that captures them at the kernel call (it calls no kernel attnctl knows) is one error."""
        changed = []
        for installed in self._installed:
            current = installed.module.processor
            if isinstance(current, AttnctlProcessor) and current.session is self:
                continue
            known = {type(installed.original).__name__, *installed.adapter.processors}
            installed.original = current  # what is left on exit, error or not
            changed.append((installed, installed.adapter.seam is None or type(current).__name__ in known))
        unknown = [i for i, ok in changed if not ok]
        if unknown:
            raise ValueError(
                f"the attention processor of {unknown[0].layer.name} was changed inside attnctl.control to "
                f"{type(unknown[0].original).__name__}, which attnctl cannot take q, k and v from; set "
                "processors before control(...)"
            )
        for installed, _ in changed:
            self._wrap_processor(installed)

    def restore(self) -> None:
        """Undo everything installed, newest first. Runs every undo even if one fails."""
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # noqa: BLE001 - keep restoring, report afterwards
                errors.append(e)
        self._edits.clear()
        self._installed.clear()
        if errors:
            raise RuntimeError(f"attnctl could not restore the pipeline completely: {errors}") from errors[0]

    # ---- tracking ---------------------------------------------------------------------------
    def _on_encode_prompt(self, args: tuple, kwargs: dict) -> None:
        # A pipeline call encodes the prompt before its first denoiser forward; a second encode
        # before any forward (e.g. HunyuanVideo's negative prompt) belongs to the same generation.
        if self.prompt is not None and self._forwards_since_prompt == 0:
            return
        prompt = kwargs["prompt"] if "prompt" in kwargs else (args[0] if args else None)
        # a copy of a list: ZImagePipeline writes its chat-templated text into the caller's list
        self.prompt = list(prompt) if isinstance(prompt, list) else prompt
        self.prompt_cfg = self._encode_argument("do_classifier_free_guidance", args, kwargs)
        self._forwards_since_prompt = 0
        self.generation += 1
        self.step = -1
        self.timestep = None
        for hook in self.generation_hooks:
            hook(self)

    def _encode_argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """An argument the pipeline passed to its `encode_prompt` (None: not passed)."""
        try:
            bound = inspect.signature(type(self.pipe).encode_prompt).bind_partial(self.pipe, *args, **kwargs)
        except (TypeError, ValueError):
            return None
        return bound.arguments.get(name)

    def _begin_forward(
        self, module: torch.nn.Module, adapter: FamilyAdapter, context: str | None, args: tuple, kwargs: dict
    ) -> None:
        self._follow_processor_changes()
        self._forwards_since_prompt += 1
        inputs = self._named_inputs(module, args, kwargs)
        t = inputs.get(adapter.timestep_arg)
        if isinstance(t, torch.Tensor):  # one timestep per row (or one for all): the first
            t = float(t) if t.numel() == 1 else float(t.reshape(-1)[0])
        else:
            t = None if t is None else float(t)
        if t != self.timestep:
            self.step += 1
            self.timestep = t
            self._step_forwards = 0
            if self.step == 0:
                self._check_steps()
        if self.branch is None:  # controls name the branch of the forwards they make
            self._step_forwards += 1
        self._read_batch(module, adapter, args, kwargs, inputs=inputs)
        context = _GUIDER_BRANCHES.get(context, context)
        if context is not None and context.startswith(_UNCOND_PREFIX):
            context = "uncond"
        branch = self.branch or context or self._separate_branch(adapter)
        self.rows = BatchRows.of_batch(self.batch, branch, self._batched_cfg(branch), adapter.cfg_batch)

    def _separate_branch(self, adapter: FamilyAdapter) -> str | None:
        """The branch of this forward where the pipeline runs CFG's branches as separate forwards
        without naming them (`adapter.cfg_forwards`, e.g. Chroma: the prompt's, then the negative's)."""
        order = adapter.cfg_forwards
        if not order or not self._batched_cfg(None):
            return None
        return order[min(self._step_forwards, len(order)) - 1]

    def _check_steps(self) -> None:
        """Step lists beyond the run: a warning for the steps that never come, an error when none
        of a list's steps comes (the control would do nothing)."""
        n = self.num_steps
        if n <= 0:
            return
        for c in self.controls:
            for spec in c.fields():
                steps = getattr(c, spec.name)
                if spec.kind != "steps" or steps is None:
                    continue
                beyond = [s for s in steps if s >= n]
                where = f"{c.kind}.{spec.name}={list(steps)}"
                if len(beyond) == len(steps):
                    raise ValueError(f"{where}: no step of this {n}-step run (steps 0 to {n - 1})")
                if beyond:
                    warnings.warn(f"{where}: steps {beyond} lie beyond this {n}-step run", stacklevel=2)

    def _read_batch(
        self,
        module: torch.nn.Module,
        adapter: FamilyAdapter,
        args: tuple,
        kwargs: dict,
        changed_by: DenoiserWrapper | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> None:
        """Batch size, token grid and text length of the call as it will enter the denoiser
        (`inputs`: its arguments by name, where the caller has them already)."""
        if inputs is None:
            inputs = self._named_inputs(module, args, kwargs)
        text = inputs.get("encoder_hidden_states")
        self.text_len = None if text is None else text.shape[1]
        adapter.observe_forward(self, inputs)
        latent = inputs[adapter.latent_arg]
        self.batch = len(latent) if isinstance(latent, list) else latent.shape[0]  # Z-Image: a list
        if changed_by is not None and self.rows.size != self.batch:
            raise ValueError(
                f"{type(changed_by).__name__} made the denoiser batch {self.batch} rows but session.rows "
                f"declares {self.rows.size} ({self.rows}); declare added rows, e.g. rows.append_perturbed(n)"
            )

    def _named_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The denoiser call's arguments by parameter name, however the pipeline passed them (the
        signature of each forward read once per session)."""
        forward = module.forward
        if forward not in self._signatures:
            try:
                self._signatures[forward] = _Binder(inspect.signature(forward))
            except TypeError:
                self._signatures[forward] = None
        binder = self._signatures[forward]
        if binder is not None:
            try:
                return binder(args, kwargs)
            except TypeError:
                pass
        return dict(kwargs)  # a signature we cannot bind: keyword arguments are all we can name

    def _batched_cfg(self, context: str | None) -> bool:
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if cfg is None and isinstance(self.prompt_cfg, bool):
            cfg = self.prompt_cfg
        if cfg is None and (context == "cond_uncond" or self.adapter.cfg_forwards):
            # CogVideoX marks its batched forward so, Kandinsky 5 runs unnamed separate forwards, and
            # both keep the CFG flag local to __call__; their `guidance_scale` property tells the same
            cfg = (getattr(self.pipe, "guidance_scale", None) or 0) > 1
        return bool(cfg)

    @property
    def cond_rows(self) -> list[int]:
        """The conditional rows of the current denoiser batch (a list, to index tensors with)."""
        return list(self.rows.cond)

    @property
    def num_steps(self) -> int:
        """The number of denoising steps of the current run (0 before the scheduler is set)."""
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return 0 if timesteps is None else len(timesteps)

    def prompts(self) -> list[str]:
        """The prompt of each conditional image, in batch order of the conditional rows."""
        if self.prompt is None:
            raise ValueError(
                "this control finds words in the prompt text, but the pipeline was called without "
                '`prompt` (e.g. with prompt_embeds); pass prompt="..." (the text) instead of prompt_embeds'
            )
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        n = max(1, len(self.cond_rows) // len(prompts))  # num_images_per_prompt
        return [p for p in prompts for _ in range(n)]

    def text_positions(self, word: str, occurrence: int = 0) -> list[list[int]]:
        """Positions of `word` in the text keys, one list per conditional row."""
        rows = [self.adapter.text_positions(self.pipe, p, word, occurrence) for p in self.prompts()]
        if self.text_len is not None and any(max(pos) >= self.text_len for pos in rows):
            raise TokenTruncatedError(
                f"{word!r} lies past the {self.text_len} text tokens this call gives the denoiser "
                "(the prompt is truncated there): shorten the prompt or raise max_sequence_length"
            )
        return rows


class _Binder:
    """`signature.bind_partial(*args, **kwargs).arguments` as a dict, without binding through
    inspect where the call is plain (positional arguments within the named parameters, keywords
    that name parameters and repeat none of them): what a denoiser forward gets at every call."""

    def __init__(self, signature: inspect.Signature):
        kinds = inspect.Parameter
        params = list(signature.parameters.values())
        self.signature = signature
        self.positional = [
            p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        self.keyword = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
        self.order = [p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]

    def __call__(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        n = len(args)
        plain = n <= len(self.positional) and all(k in self.keyword for k in kwargs)
        if plain and not any(name in kwargs for name in self.positional[:n]):
            given = dict(zip(self.positional, args, strict=False))
            given.update(kwargs)
            return {name: given[name] for name in self.order if name in given}  # in parameter order
        return dict(self.signature.bind_partial(*args, **kwargs).arguments)


@dataclasses.dataclass
class _Installed:
    """A layer whose processor attnctl stands in for, and the processor it stands in for (the user's
    own, also one set inside the block), which is the one left on exit."""

    module: torch.nn.Module
    layer: LayerInfo
    adapter: FamilyAdapter
    original: Any


class PerGeneration(Generic[T]):
    """A value a control computes from the session once per generation, on first use (e.g. the
    prompt's word positions): `compute(session)` runs again only when a new pipeline call began."""

    def __init__(self, compute: Callable[[Any], T]):
        self._compute = compute
        self._generation: int | None = None
        self._value: T | None = None

    def get(self, session: Any) -> T:
        if self._generation != session.generation:
            self._value = self._compute(session)
            self._generation = session.generation
        return self._value  # type: ignore[return-value]


def in_steps(
    step: int, num_steps: int, *, steps: Collection[int] | None = None, first: float | None = None
) -> bool:
    """Whether denoising step `step` of `num_steps` is one a control acts on: listed in `steps`
    (None: any) and within the first `first` fraction of the run (None: to the end). Papers give
    step ranges as fractions of the run (steps 0-24 of 50: the first 0.5)."""
    return (steps is None or step in steps) and (first is None or step < first * num_steps)


def _fullgraph(module: torch.nn.Module) -> bool:
    """Whether `module` was compiled with fullgraph=True: `torch.compile(module, ...)` (the
    wrapper's context says it) or `module.compile(...)` (its compiled call holds that context)."""
    # read from the instance (both are set as attributes): a getattr miss on a module costs an
    # exception in nn.Module.__getattr__, and this runs on every submodule of the denoisers
    attrs = vars(module)
    context, call = attrs.get("dynamo_ctx"), attrs.get("_compiled_call_impl")
    if context is None and call is None:  # neither compiled way: most modules
        return False
    contexts = [context, *(c.cell_contents for c in getattr(call, "__closure__", None) or ())]
    return any(getattr(c, "fullgraph", False) is True for c in contexts)
