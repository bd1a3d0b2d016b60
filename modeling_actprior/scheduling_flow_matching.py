"""Flow-matching sampler for action chunks, as a diffusers scheduler.

Time convention (diffusers, openpi, LeRobot): ``t = 1`` is pure noise, ``t = 0`` is data. The
interpolant is ``x_t = t * noise + (1 - t) * actions`` and the model predicts the velocity
``v = noise - actions``; sampling integrates ``dx/dt = v`` from ``t = 1`` down to ``t = 0``, so each
step is ``x <- x + (t_next - t) * v`` with ``t_next - t < 0``.

Three solvers share one grid of ``num_inference_steps`` uniform intervals:

* ``"euler"``: one velocity evaluation per interval (10 by default);
* ``"heun"``: second order (predict with Euler, correct with the mean of both slopes), two
  evaluations per interval except the last, like diffusers' ``HeunDiscreteScheduler``;
* ``"shortcut"``: one evaluation per interval of a decoder trained as a shortcut model
  (``ActionPriorConfig.shortcut_max_steps``), told the interval's length ``d`` (``model_step_sizes``), so it
  returns the average velocity over the step rather than the instantaneous one: 1 or 2 steps suffice.

Concurrency: ``set_timesteps`` and the Heun corrector keep per-run state on the instance, as all diffusers
schedulers do. Callers that share one scheduler between threads (a pipeline serving several requests)
take ``scheduler.for_run(num_inference_steps)``: a private copy whose timesteps are set, so no run sees
another's state. Precision: ``step`` returns the sample in float32 whatever the dtype of the model
output, so a bf16 model never rounds the integration state between steps.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports
nothing from the installed package.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

SOLVERS = ("euler", "heun", "shortcut")


@dataclass
class FlowMatchingSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor` of shape `(B, H, D)`, float32):
            The sample at the next (smaller) flow time, to feed back into the model.
        pred_original_sample (`torch.Tensor` of shape `(B, H, D)`, float32):
            The one-step estimate of the data, ``x_t - t * v``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FlowMatchingActionScheduler(SchedulerMixin, ConfigMixin):
    """Integrates a learned velocity field from noise (``t = 1``) to actions (``t = 0``).

    Args:
        num_inference_steps (`int`, defaults to 10): intervals of the uniform time grid.
        solver (`str`, defaults to `"euler"`): ``"euler"``, ``"heun"`` (second order) or ``"shortcut"`` (step-size
            conditioned Euler, for decoders trained with ``shortcut_max_steps``).
        t_max (`float`, defaults to 1.0): flow time at which sampling starts (1 = pure noise).
        t_min (`float`, defaults to 0.0): flow time at which sampling stops (0 = data).

    ``timesteps`` holds the flow time fed to the model at each call of ``step`` (float32, shape
    ``(num_model_evaluations,)``); ``sigmas`` holds the uniform grid itself (``num_inference_steps + 1``
    points from ``t_max`` to ``t_min``).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, num_inference_steps: int = 10, solver: str = "euler", t_max: float = 1.0, t_min: float = 0.0):
        if solver not in SOLVERS:
            raise ValueError(f"FlowMatchingActionScheduler solver must be one of {SOLVERS}; got {solver!r}.")
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"FlowMatchingActionScheduler needs 0 <= t_min < t_max <= 1; got {t_min}, {t_max}.")
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None):
        """Lay the uniform grid of ``num_inference_steps`` intervals from ``t_max`` to ``t_min``."""
        n = int(num_inference_steps if num_inference_steps is not None else self.config.num_inference_steps)
        if n <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps}.")
        self.num_inference_steps = n
        # Built on the CPU, where the step sizes are read once as Python floats: `step` then never reads a
        # device tensor back to the host.
        sigmas = torch.linspace(self.config.t_max, self.config.t_min, n + 1, dtype=torch.float32, device="cpu")
        if self.config.solver == "heun":
            # Predictor at sigma_i, corrector at sigma_{i+1}; the last corrector would evaluate at t_min
            # where the flow ends, which diffusers' Heun also skips (it falls back to Euler there).
            timesteps = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2)])
        else:
            timesteps = sigmas[:-1].clone()
        self._sigma_values = sigmas.tolist()
        self._timestep_values = timesteps.tolist()
        self.sigmas = sigmas.to(device) if device is not None else sigmas
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self._step_index = 0
        self._heun_state = None  # (x at sigma_i, v at sigma_i) between predictor and corrector

    def for_run(self, num_inference_steps: int | None = None, device=None) -> FlowMatchingActionScheduler:
        """A private copy with its timesteps set, so concurrent samplers never share step state."""
        run = copy.copy(self)
        run.set_timesteps(num_inference_steps, device=device)
        return run

    @property
    def timestep_values(self) -> list[float]:
        """``timesteps`` as Python floats (read without touching a device)."""
        return list(self._timestep_values)

    def euler_step_sizes(self) -> list[float] | None:
        """The Euler (or shortcut) solver's steps ``t_next - t`` (negative) on the current grid, for samplers that
        apply the update ``x + dt * v`` themselves (one fused op per step); None for Heun (call ``step``)."""
        if self.config.solver == "heun":
            return None
        s = self._sigma_values
        return [s[i + 1] - s[i] for i in range(len(s) - 1)]

    def model_step_sizes(self) -> list[float] | None:
        """The step size ``d > 0`` the decoder is told at each model evaluation (the shortcut solver: each interval's
        length); None for the other solvers, whose decoder returns the instantaneous velocity (``d = 0``)."""
        if self.config.solver != "shortcut":
            return None
        s = self._sigma_values
        return [s[i] - s[i + 1] for i in range(len(s) - 1)]

    @property
    def step_index(self) -> int:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> FlowMatchingSchedulerOutput | tuple:
        """One integration step.

        Args:
            model_output: velocity ``v(x_t, t)`` of shape ``(B, H, D)``, any float dtype.
            timestep: the flow time the model was evaluated at, ``self.timesteps[self.step_index]``. As in diffusers'
                flow-matching schedulers, the step reads its times from its own grid at ``step_index``, so a
                device tensor here is never read back to the host.
            sample: ``x_t`` of shape ``(B, H, D)``.
        Returns:
            ``prev_sample`` at the next flow time, float32.
        """
        i = self._step_index
        if i >= len(self._timestep_values):
            raise RuntimeError(
                "FlowMatchingActionScheduler.step called more times than there are timesteps; call "
                "set_timesteps (or use for_run) before each sampling run."
            )
        v = model_output.float()
        x = sample.float()
        sigmas = self._sigma_values
        if self.config.solver != "heun":
            prev = torch.add(x, v, alpha=sigmas[i + 1] - sigmas[i])
        elif self._heun_state is None:
            interval = (i + 1) // 2
            prev = torch.add(x, v, alpha=sigmas[interval + 1] - sigmas[interval])
            if interval + 1 < self.num_inference_steps:  # a corrector follows
                self._heun_state = (x, v)
        else:
            x0, v0 = self._heun_state
            interval = i // 2
            prev = torch.add(x0, v0 + v, alpha=0.5 * (sigmas[interval + 1] - sigmas[interval]))
            self._heun_state = None
        pred_original = torch.add(x, v, alpha=-self._timestep_values[i])
        self._step_index += 1
        if not return_dict:
            return (prev, pred_original)
        return FlowMatchingSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = t * noise + (1 - t) * data`` with ``t`` of shape ``(B,)``."""
        t = timesteps.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return t * noise + (1.0 - t) * original_samples

    def __len__(self) -> int:
        return self.config.num_inference_steps


__all__ = ["FlowMatchingActionScheduler", "FlowMatchingSchedulerOutput"]
