"""Perturbed-branch guidance at the denoiser level (PAG, SoftPAG; Ahn et al. 2024, 2025).

Each denoiser call that has conditional rows gets a perturbed copy of them (the attention level
perturbs those rows: `session.rows.perturbed`), and the perturbed prediction ε_p is folded into the
conditional one, c' = ε_c + (s_t / w)·(ε_c - ε_p), so that the pipeline's own CFG formula yields
ε_u + w·(ε_c - ε_u) + s_t·(ε_c - ε_p); without CFG, c' = ε_c + s_t·(ε_c - ε_p). No denoising loop
is copied, and the unconditional rows are never touched. The same fold serves noise and flow
(velocity) predictions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.denoiser import DenoiserWrapper, append_rows, denoiser_output, take_rows
from ..processors.softpag_math import fold_into_cond, guidance_scale_at

BATCH_MODES = ("auto", "split")


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
        # the perturbed rows' own forward (split mode), or a latent guidance's gradient forward made
        # inside the pipeline's call: neither may touch the state of the call around it
        if self._nested or session.guiding:
            return args, kwargs
        self._scale_now = 0.0
        if not session.rows.cond:
            return args, kwargs
        self._scale_now = guidance_scale_at(self.scale, self.adaptive_scale, _scheduler_timestep(session))
        if self._scale_now == 0:
            return args, kwargs  # s_t = 0 (adaptive schedule): the unguided call, exactly
        cond = session.cond_rows
        if self._split(module):
            self._split_inputs = take_rows((args, kwargs), cond, session.batch)
            return args, kwargs
        session.rows = session.rows.append_perturbed(len(cond))
        return append_rows((args, kwargs), cond, session.batch)

    def after(self, session: Any, module: torch.nn.Module, output: Any) -> Any:
        if self._nested or session.guiding or self._scale_now == 0:
            return output
        prediction, put = denoiser_output(output)
        rows = session.rows
        if self._split_inputs is not None:
            perturbed = self._perturbed_forward(session, module)
            base = prediction
        else:
            perturbed = prediction[list(rows.perturbed)]
            base = prediction[: rows.size - len(rows.perturbed)]
        cond = list(rows.cond)
        folded = base.clone()
        folded[cond] = fold_into_cond(
            base[cond], perturbed.to(base.dtype), self._scale_now, _cfg_scale(session)
        )
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
    if session.rows.uncond or getattr(pipe, "do_classifier_free_guidance", False):
        return float(pipe.guidance_scale)
    return None


def _scheduler_timestep(session: Any) -> float:
    """The step's timestep in the scheduler's 0-1000 convention (FLUX passes t / 1000 to its model)."""
    timesteps = getattr(session.pipe.scheduler, "timesteps", None)
    if timesteps is not None and 0 <= session.step < len(timesteps):
        return float(timesteps[session.step])
    return float(session.timestep or 0.0)
