"""Stage 1 of the method: ``ActionPriorModel``, a flow-matching action prior learned from actions alone.

* Encoder ``E_phi``: a transformer over the last ``K`` normalized, padded actions (optionally with
  states), pooled through a learned summary token into a diagonal Gaussian ``q(z | a_<t) = N(mu, sigma^2)``.
* Decoder ``D_psi``: an MLP velocity field ``v(x_t, t, z)`` over the future chunk ``a_{t:t+H}``
  (residual blocks modulated by flow time and latent).
* Loss: masked flow-matching MSE ``|| v(x_t, t, z) - (noise - actions) ||^2`` over real action
  dimensions and real chunk steps only, plus ``beta * KL(q || N(0, I))``.

Flow time: ``t = 1`` is noise and ``t = 0`` is data (see ``scheduling_flow_matching``).
Padding: every input is multiplied by its mask on entry and the loss is masked, so values in padded
action dimensions or padded chunk/history steps change neither the loss nor any gradient.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports only
its siblings, relatively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .action_space import ActionNormalizer
from .configuration_actprior import ActionPriorConfig
from .fast_path import (
    PlainDecoderWeights,
    _first_token_output,
    _gelu,
    _has_forward_hooks,
    _layer_norm,
    _linear,
    _mlp,
    compile_euler_flow,
    fresh_flow_inputs,
    plain_decoder_weights,
    plain_velocity,
)
from .guidance import ChunkGuidance, _guided_integration, rtc_weights  # noqa: F401 - rtc_weights re-exported
from .inputs import (  # noqa: F401 - the batch keys, re-exported
    ACTION_MASK,
    ACTIONS,
    DIM_MASK,
    EMBODIMENT,
    HISTORY,
    HISTORY_MASK,
    STATE,
    check_action_inputs,
    check_state,
)
from .modeling_checkpoint import (
    ActionCheckpointMixin,
)
from .scheduling_flow_matching import FlowMatchingActionScheduler

logger = hf_logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class ActionPriorLatent(ModelOutput):
    """
    Args:
        mean (`(B, d_z)`): mean of ``q(z | history)``.
        logvar (`(B, d_z)`): log-variance of ``q(z | history)``, clamped to the config's range.
        sample (`(B, d_z)`): a reparameterized draw (equals ``mean`` when not sampling).
    """

    mean: torch.Tensor = None
    logvar: torch.Tensor = None
    sample: torch.Tensor = None


@dataclass
class ActionPriorOutput(ModelOutput):
    """
    Args:
        loss (`()`): ``flow_loss + kl_weight * kl_loss`` (``+ shortcut_weight * shortcut_loss`` for shortcut models).
        flow_loss (`()`): masked flow-matching MSE, mean over real (step, dimension) entries.
        kl_loss (`()`): ``KL(q(z | history) || N(0, I))`` summed over ``d_z``, mean over the batch.
        shortcut_loss (`()`): the self-consistency MSE of a shortcut decoder (``shortcut_consistency_loss``), else
            None.
        velocity (`(B, H, D_max)`): predicted velocity, zero in padded dimensions.
        target_velocity (`(B, H, D_max)`): ``noise - actions``, zero in padded dimensions.
        timesteps (`(B,)`): the flow times drawn for this batch.
        latent (`ActionPriorLatent`): the encoder's posterior for this batch.
    """

    loss: torch.Tensor | None = None
    flow_loss: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None
    shortcut_loss: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    target_velocity: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    latent: ActionPriorLatent | None = None


# --------------------------------------------------------------------------------------------- blocks
def sinusoidal_time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Flow times in [0, 1] of any shape ``(...)`` -> ``(..., dim)`` sin/cos features (times are scaled by 1000
    first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ActionHistoryEncoder(nn.Module):
    """``E_phi``: past actions ``(B, K, D_max)`` -> Gaussian latent ``(B, d_z)`` x 2.

    Each history step is embedded from ``[action * dim_mask, dim_mask]`` (the mask tells the encoder
    which robot-width it is reading), with a learned position embedding. A learned summary token (plus
    the embedded current state, when the config has ``max_state_dim > 0``) attends over the real steps
    only; its output gives ``(mean, logvar)``.
    """

    def __init__(self, config: ActionPriorConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.action_in = nn.Linear(2 * config.max_action_dim, d)
        self.state_in = nn.Linear(config.max_state_dim, d) if config.max_state_dim > 0 else None
        self.position = nn.Parameter(torch.zeros(1, config.history_length, d))
        self.summary_token = nn.Parameter(torch.zeros(1, 1, d))
        layer = nn.TransformerEncoderLayer(
            d, config.encoder_heads, config.encoder_ffn_size, config.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.to_latent = nn.Linear(d, 2 * config.latent_dim)

    def forward(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        dim_mask: torch.Tensor,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            history: ``(B, K', D_max)`` normalized, padded; ``K' <= K``, the most recent step last.
            history_mask: ``(B, K')`` bool, True for real past actions.
            dim_mask: ``(B, D_max)`` bool, True for the embodiment's real dimensions.
            state: ``(B, max_state_dim)`` standardized, padded state at the current step, or None.
        Returns:
            ``(mean, logvar)``, each ``(B, d_z)``.
        """
        b, k, _ = history.shape
        dm = dim_mask.to(history.dtype)[:, None, :]
        step_valid = history_mask.to(history.dtype)[..., None]
        feats = torch.cat([history * dm * step_valid, dm.expand(b, k, -1)], dim=-1)
        h = self.action_in(feats)
        # Right-align so the most recent action always sits at the last position embedding.
        h = h + self.position[:, -k:] if k > 0 else h
        summary = self.summary_token.expand(b, -1, -1).to(h.dtype)
        if self.state_in is not None and state is not None:
            summary = summary + self.state_in(state.to(h.dtype))[:, None, :]
        h = torch.cat([summary, h], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=h.device), ~history_mask.bool()], dim=1)
        *layers, last = self.layers.layers
        for layer in layers:
            h = layer(h, src_key_padding_mask=pad)
        # Only the summary token's output is read: the last layer computes the other positions' keys and values.
        stats = self.to_latent(self.norm(_first_token_output(last, h, pad)))
        mean, logvar = stats.chunk(2, dim=-1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)


class ModulatedResidualBlock(nn.Module):
    """LayerNorm -> scale/shift from the conditioning -> MLP -> gated residual (adaLN-Zero style).

    Its layers are applied through their parameters (``_linear``), so forward hooks on them do not fire; hook the
    decoder itself.
    """

    def __init__(self, width: int, cond_width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(cond_width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width))

    def modulate(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditioning ``(..., cond_width)`` -> ``(1 + scale, shift, gate)``, each ``(..., width)``."""
        scale, shift, gate = _linear(self.modulation, cond).chunk(3, dim=-1)
        return 1 + scale, shift, gate

    def forward(self, h: torch.Tensor, modulation: tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, width)``; ``modulation`` from ``modulate``, each ``(B, width)``, or ``(width,)`` when shared by
        the whole batch (then scale and shift are the layer norm's affine: one fused op); or the conditioning itself,
        modulated here."""
        one_plus_scale, shift, gate = self.modulate(modulation) if torch.is_tensor(modulation) else modulation
        norm = self.norm
        if one_plus_scale.dim() == 1 and type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None:
            y = F.layer_norm(h, norm.normalized_shape, one_plus_scale, shift, norm.eps)
        else:
            y = torch.addcmul(shift, _layer_norm(norm, h), one_plus_scale)
        up, act, drop, down = self.mlp
        y = _linear(up, y)
        y = _gelu(y, act.approximate) if type(act) is nn.GELU else act(y)
        if drop.p > 0 and drop.training:
            y = drop(y)
        return torch.addcmul(h, gate, _linear(down, y))


@dataclass
class DecoderConditioning:
    """Everything of the velocity field ``v(x_t, t, z)`` that does not depend on ``x_t``.

    Built by ``FlowMatchingActionDecoder.conditioning`` for one flow time per sample (training), or for all flow
    steps of a chunk at once (sampling: the scheduler knows the times before the first step), in which case
    ``steps()`` splits it into one conditioning per step, as views.

    Args:
        latent (`(B, width)`): the latent's embedding, added to the residual stream at the input.
        dim_mask (`(B, D_max)`): the dimension mask in the decoder's dtype; ``chunk_mask``: the same, ``(B, 1, D_max)``.
        modulation: per block, ``(1 + scale, shift, gate)``, each ``(B, width)``, or ``(S, B, width)`` for ``S``
            flow steps (``(width,)`` per step when ``B = 1``).
        weights: the decoder's layers as plain tensors (``PlainDecoderWeights``), or None when one of them is not a
            plain layer (a LoRA or quantized wrapper...): then each step calls the modules.
        input_bias (`(B, width)`): with ``weights``, the input layer's output on the dimension mask, plus its bias
            and the latent's embedding: each step's input layer is one ``addmm`` on the chunk's values.
    """

    latent: torch.Tensor
    dim_mask: torch.Tensor
    chunk_mask: torch.Tensor
    modulation: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    weights: PlainDecoderWeights | None = None
    input_bias: torch.Tensor | None = None

    def step_modulations(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per flow step, every block's ``(1 + scale, shift, gate)`` of a conditioning built for ``S`` steps;
        ``(width,)`` each at batch 1 (fused into the layer norms), else ``(B, width)`` views.

        At batch 1 each ``(S, width)`` tensor is made contiguous once here: the layer norm copies a strided weight or
        bias on every call otherwise (the modulation layer's output is a transposed view, see ``_linear``)."""
        shared = self.latent.shape[0] == 1
        per_block = [[(m.flatten(1).contiguous() if shared else m).unbind(0) for m in mod] for mod in self.modulation]
        return [list(step) for step in zip(*(zip(*mod) for mod in per_block))]

    def steps(self) -> list[DecoderConditioning]:
        """The per-step conditionings of one built for ``S`` flow steps (see ``step_modulations``)."""
        return [DecoderConditioning(self.latent, self.dim_mask, self.chunk_mask, mod, self.weights, self.input_bias)
                for mod in self.step_modulations()]


class FlowMatchingActionDecoder(nn.Module):
    """``D_psi``: velocity ``v(x_t, t, z)`` over a whole chunk, ``(B, H, D_max)`` -> ``(B, H, D_max)``.

    The chunk is flattened and read together with the dimension mask, plus the latent's embedding; flow
    time (sinusoidal) and the latent form the conditioning of ``decoder_layers`` modulated residual MLP blocks. The output is zero
    in padded dimensions.

    The part that does not depend on ``x_t`` (latent embedding, time embedding, every block's modulation, the input
    layer's share of the dimension mask) is ``conditioning(z, t, dim_mask)``; ``forward`` runs the rest. Sampling
    builds the conditioning of all flow steps in one batched pass, so each step runs only the ``x_t`` path (see
    ``integrate_flow``). Forward hooks fire on the decoder, once per velocity evaluation, not on its inner layers.
    """

    def __init__(self, config: ActionPriorConfig):
        super().__init__()
        self.config = config
        width, flat = config.decoder_hidden_size, config.chunk_size * config.max_action_dim
        self.x_in = nn.Linear(flat + config.max_action_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_embedding_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.latent_mlp = nn.Sequential(nn.Linear(config.latent_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            ModulatedResidualBlock(width, width, config.dropout) for _ in range(config.decoder_layers)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, flat)
        # Shortcut models read the step size d beside the flow time (absent otherwise: older checkpoints load as is).
        self.step_mlp = (nn.Sequential(nn.Linear(config.time_embedding_dim, width), nn.SiLU(), nn.Linear(width, width))
                         if config.shortcut_max_steps else None)
        self._grid_time = (None, None)  # (key, time conditioning): see grid_time_condition
        self._compiled_flow = None  # see compile_flow

    def __getstate__(self):
        # A compiled loop belongs to this decoder (it closes over it): copies and pickles sample eagerly.
        return {**super().__getstate__(), "_compiled_flow": None}

    def compile_flow(self, enable: bool = True, num_inference_steps: int | tuple[int, ...] = (), batch_size: int = 1,
                     scheduler: FlowMatchingActionScheduler | None = None, **compile_kwargs) -> FlowMatchingActionDecoder:
        """Sample through a ``torch.compile``d Euler loop (``fast_path.euler_flow``): the conditioning and every flow
        step of a chunk become one compiled graph, which saves the framework's per-operation cost (on a 2-core CPU, in
        isolation, the 2-step flow of the ``tiny`` preset runs 1.4x and that of ``small`` 1.6x faster; inside the
        pipeline, right after the VLM prefix, the gain is smaller: ``benchmarks/speed.py`` measures both). Applies
        to the Euler and shortcut solvers without guidance and without forward hooks on the decoder; any other call
        runs eagerly as before, and so does every call after the compiled loop fails (torch.compile keeps at most 8
        graphs per function: batch sizes, step counts, dtypes...), with a warning. With a float32 head the chunks match
        the eager sampler's to float32 rounding; with a bfloat16 head to bfloat16 rounding (the compiled graph keeps
        fused intermediates in float32). ``enable=False`` goes back to the eager loop; copies and pickles of the
        decoder sample eagerly.

        Compiling takes seconds, once per step count and batch size. ``num_inference_steps`` (one or several) compiles
        those step counts now, at ``batch_size``, on the time grid of ``scheduler`` (default: Euler, or the shortcut
        solver for a shortcut decoder), so the first chunk on a robot does not wait for the compiler; a failure there
        (on a CPU, torch.compile needs a C++ compiler) raises and leaves the eager loop in place. ``compile_kwargs``
        go to ``torch.compile`` (default ``dynamic=False, fullgraph=True``). Returns the decoder."""
        if not enable:
            self._compiled_flow = None
            return self
        if num_inference_steps and scheduler is None:
            scheduler = FlowMatchingActionScheduler(solver="shortcut" if self.reads_step_size else "euler")
        self._compiled_flow = compile_euler_flow(self, num_inference_steps, batch_size, scheduler, **compile_kwargs)
        return self

    @property
    def reads_step_size(self) -> bool:
        """Whether this decoder was built as a shortcut model (``shortcut_max_steps > 0``)."""
        return self.step_mlp is not None

    def time_condition(self, t: torch.Tensor, dtype: torch.dtype | None = None,
                       step_size: torch.Tensor | None = None) -> torch.Tensor:
        """Flow times ``(...)`` (and, for a shortcut decoder, step sizes of the same shape; None = 0, the
        instantaneous velocity) -> their share of the conditioning ``(..., width)``."""
        dtype = dtype or self.out.weight.dtype
        emb = sinusoidal_time_embedding(t, self.config.time_embedding_dim)
        cond = _mlp(self.time_mlp, emb.to(dtype))
        if self.step_mlp is not None:
            d = torch.zeros_like(t, dtype=torch.float32) if step_size is None else step_size.float().expand(t.shape)
            # Steps of 1/M and shorter are the flow itself (see shortcut_consistency_loss).
            d = torch.where(d <= 1.0 / self.config.shortcut_max_steps + 1e-9, torch.zeros_like(d), d)
            cond = cond + _mlp(self.step_mlp, sinusoidal_time_embedding(d, self.config.time_embedding_dim).to(dtype))
        elif step_size is not None and bool((step_size != 0).any()):
            raise ValueError(
                "This decoder was not trained as a shortcut model (shortcut_max_steps=0), so it cannot take a step "
                "size: sample with the 'euler' or 'heun' solver, or train the prior with --shortcut_max_steps 16.")
        return cond

    def grid_time_condition(self, times: list[float], dtype: torch.dtype, device,
                            step_sizes: list[float] | None = None) -> torch.Tensor:
        """``time_condition`` of a sampler's time grid (Python floats, one per flow step; ``step_sizes`` likewise for
        the shortcut solver), ``(S, 1, width)``, without autograd. The same grid serves every chunk, so it is computed
        once and again only when the grid, dtype, device or a weight of the time (or step) MLP changes."""
        params = list(self.time_mlp.parameters()) + (list(self.step_mlp.parameters()) if self.step_mlp else [])
        key = None if any(p.is_inference() for p in params) else (
            tuple(times), None if step_sizes is None else tuple(step_sizes), dtype, str(device),
            tuple((p.data_ptr(), p._version) for p in params))
        cached = self._grid_time  # one read: another thread may replace it with another grid's meanwhile
        if key is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            t = torch.tensor(times, dtype=torch.float32, device=device)[:, None]
            d = None if step_sizes is None else torch.tensor(step_sizes, dtype=torch.float32, device=device)[:, None]
            value = self.time_condition(t, dtype, d)
        self._grid_time = (key, value)
        return value

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        """The latent's share of the conditioning, ``(B, width)``; constant over the flow steps of one chunk."""
        return _mlp(self.latent_mlp, z)

    def conditioning(
        self,
        z: torch.Tensor | None,
        t: torch.Tensor,
        dim_mask: torch.Tensor,
        time_condition: torch.Tensor | None = None,
        step_size: torch.Tensor | None = None,
    ) -> DecoderConditioning:
        """The ``x_t``-independent part of the velocity field.

        Args:
            z: ``(B, d_z)`` latent.
            t: ``(B,)`` one flow time per sample, or ``(S, 1)`` / ``(S, B)`` for ``S`` flow steps at once; ignored
                when ``time_condition`` (from ``time_condition(t)``) is given.
            dim_mask: ``(B, D_max)`` bool.
            step_size: shortcut decoders only: the step size ``d`` per flow time, shaped like ``t`` (None: 0).
        """
        latent = self.condition(z)
        dm = dim_mask.to(latent.dtype)
        # The latent enters the residual stream directly (it carries where the motion is) and, with flow
        # time, modulates every block (how to denoise at this t).
        time = time_condition if time_condition is not None else self.time_condition(t, latent.dtype, step_size)
        cond = F.silu(time + latent)
        out = DecoderConditioning(latent, dm, dm[:, None, :], [block.modulate(cond) for block in self.blocks])
        out.weights = plain_decoder_weights(self)
        if out.weights is not None:
            flat = out.weights.input_weight_t.shape[0]
            out.input_bias = F.linear(dm, self.x_in.weight[:, flat:], self.x_in.bias) + latent
        return out

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        conditioning: DecoderConditioning | None = None,
        step_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x_t: ``(B, H, D_max)`` noisy chunk at flow time ``t``.
            t: ``(B,)`` flow times (1 = noise, 0 = data).
            z: ``(B, d_z)`` latent.
            dim_mask: ``(B, D_max)`` bool.
            conditioning: from ``conditioning(z, t, dim_mask)`` for this step; replaces ``t``, ``z``, ``dim_mask``.
            step_size: ``(B,)`` step sizes, for a shortcut decoder (None: 0, the instantaneous velocity).
        Returns:
            velocity ``(B, H, D_max)`` (a shortcut decoder's average velocity over a step of ``step_size``), zero in
            padded dimensions.
        """
        c = conditioning if conditioning is not None else self.conditioning(z, t, dim_mask, step_size=step_size)
        b, mask = x_t.shape[0], c.chunk_mask
        x = (x_t * mask).reshape(b, -1)
        if c.weights is None:  # some layer is wrapped: call the modules
            h = _linear(self.x_in, torch.cat([x, c.dim_mask], dim=-1)) + c.latent
            for block, modulation in zip(self.blocks, c.modulation):
                h = block.forward(h, modulation)
            v = _linear(self.out, _layer_norm(self.norm_out, h))
        else:
            v = plain_velocity(x, c.weights, c.input_bias, c.modulation)
        return v.view(b, self.config.chunk_size, self.config.max_action_dim) * mask


# --------------------------------------------------------------------------------------------- flow math
def sample_flow_time(config: ActionPriorConfig, batch_size: int, device, generator=None) -> torch.Tensor:
    """Training flow times ``(B,)`` from ``config``'s density, mapped into ``[time_min, time_max]``."""
    if config.time_sampling == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    elif config.time_sampling == "beta":
        # Beta(a, b) through two Gamma draws would ignore `generator`; inverse-CDF sampling keeps it.
        u = _beta_icdf_sample(batch_size, config.time_beta_alpha, config.time_beta_beta, generator, device)
    else:
        n = torch.randn(batch_size, generator=generator, device=device)
        u = torch.sigmoid(config.time_logit_normal_mean + config.time_logit_normal_std * n)
    return config.time_min + (config.time_max - config.time_min) * u


def flow_matching_loss(decoder: FlowMatchingActionDecoder, scheduler: FlowMatchingActionScheduler, z: torch.Tensor,
                       actions: torch.Tensor, action_mask: torch.Tensor, dim_mask: torch.Tensor, noise: torch.Tensor,
                       timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked flow-matching MSE of ``decoder`` on a chunk; returns ``(loss, velocity, target)``.

    ``actions``/``noise`` ``(B, H, D_max)``, ``action_mask`` ``(B, H)``, ``dim_mask`` ``(B, D_max)``, ``timesteps``
    ``(B,)``, ``z`` ``(B, d_z)``. Steps past an episode's end carry no data: their clean value is zeroed (the
    model still sees noise there, as at inference) and their loss is masked, so padding content never matters.
    """
    dm = dim_mask.to(actions.dtype)[:, None, :]
    step = action_mask.to(actions.dtype)[..., None]
    clean, noise = actions * dm * step, noise * dm
    x_t = scheduler.add_noise(clean, noise, timesteps)
    target = noise - clean
    dtype = decoder.out.weight.dtype
    velocity = decoder(x_t.to(dtype), timesteps.to(dtype), z.to(dtype), dim_mask).float()
    weight = dm * step
    loss = ((velocity - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, velocity, target


def shortcut_consistency_loss(decoder: FlowMatchingActionDecoder, z: torch.Tensor, actions: torch.Tensor,
                              action_mask: torch.Tensor, dim_mask: torch.Tensor,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-consistency loss of a shortcut decoder (Frans et al. 2024, "One Step Diffusion via Shortcut Models").

    On the first ``shortcut_fraction`` of the batch: a big step ``D = 2^-k`` (``k`` uniform over ``0..log2(M)-1``, so
    ``D`` in ``1, 1/2, ..., 2/M``), a flow time ``t`` on that step's grid (``t = j * D``, where a sampler of ``1/D``
    steps evaluates), and ``x_t`` from fresh noise. The target is the mean of two half steps ``d = D / 2`` taken with
    the decoder itself, without gradient (steps of ``1/M`` read the instantaneous velocity that the flow-matching
    loss trains), and the decoder's prediction for one step of ``D`` is pulled toward it. The latent is detached:
    this term shapes how the decoder integrates, while the latent is what the encoder (and in Stage 2 the VLM and
    the distillation) shape. Masked like ``flow_matching_loss``; returns the mean over real entries.
    """
    cfg = decoder.config
    b, dev = actions.shape[0], actions.device
    n = max(1, int(round(b * cfg.shortcut_fraction)))
    k = torch.randint(0, int(math.log2(cfg.shortcut_max_steps)), (n,), generator=generator, device=dev)
    big = torch.pow(2.0, -k.float())
    half = big / 2
    j = torch.floor(torch.rand(n, generator=generator, device=dev) / big).clamp_max(1.0 / big - 1) + 1
    t = j * big
    noise = torch.randn((n, *actions.shape[1:]), generator=generator, device=dev, dtype=torch.float32)
    dm = dim_mask[:n].to(torch.float32)[:, None, :]
    weight = dm * action_mask[:n].to(torch.float32)[..., None]
    clean, noise = actions[:n].float() * weight, noise * dm
    x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * clean
    dtype = decoder.out.weight.dtype
    z = z[:n].detach().to(dtype)
    with torch.no_grad():
        first = decoder(x_t.to(dtype), t.to(dtype), z, dim_mask[:n], step_size=half).float()
        middle = x_t - half[:, None, None] * first
        second = decoder(middle.to(dtype), (t - half).to(dtype), z, dim_mask[:n], step_size=half).float()
        target = 0.5 * (first + second)
    pred = decoder(x_t.to(dtype), t.to(dtype), z, dim_mask[:n], step_size=big).float()
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def integrate_flow(decoder: FlowMatchingActionDecoder, scheduler: FlowMatchingActionScheduler, z: torch.Tensor,
                   dim_mask: torch.Tensor, chunk_size: int, num_inference_steps: int | None = None,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                   guidance: ChunkGuidance | dict | None = None) -> torch.Tensor:
    """Noise -> chunk ``(B, H, D_max)`` float32 through ``decoder`` given latents ``z`` ``(B, d_z)``.

    The flow times are known before the first step, so the decoder's conditioning for all of them (latent and time
    embeddings, every block's modulation) is built in one batched pass; each flow step then runs only the
    ``x_t``-dependent path, with no host synchronization; the time embeddings of the sampler's grid are computed once
    per weights (``grid_time_condition``). With the Euler solver, plain layers and no forward hooks on the decoder,
    each step is the velocity and one ``addcmul`` on the flattened chunk; otherwise each step calls the decoder and
    ``scheduler.step``. The loop runs under ``torch.inference_mode`` on a private
    copy of ``scheduler`` (safe across threads) whose state stays float32 whatever the decoder's dtype; the returned
    chunk is an ordinary tensor.

    The ``"shortcut"`` solver tells the decoder each step's size (a decoder trained with ``shortcut_max_steps``).
    With ``guidance`` (real-time chunking, ``ChunkGuidance``) each step also backpropagates through the decoder to
    ``x_t``, so that loop runs with autograd enabled for ``x_t`` alone, outside inference mode.
    """
    b, dev = z.shape[0], z.device
    mask = dim_mask[:, None, :]
    run = scheduler.for_run(num_inference_steps, device=dev)
    model_steps = run.model_step_sizes()
    if model_steps is not None and not decoder.reads_step_size:
        raise ValueError(
            "The 'shortcut' solver needs a decoder trained as a shortcut model (the prior's shortcut_max_steps > 0); "
            "this one was trained without. Sample it with FlowMatchingActionScheduler(solver='euler'), or train the "
            "prior with --shortcut_max_steps 16.")
    if isinstance(guidance, dict):  # from the pipeline, which imports nothing of this package
        guidance = ChunkGuidance(**guidance)
    if guidance is not None:
        shape = (b, chunk_size, dim_mask.shape[-1])
        if tuple(guidance.target.shape) != shape:
            raise ValueError(f"ChunkGuidance target must be (batch, chunk_size, max_action_dim) = {shape}; got "
                             f"{tuple(guidance.target.shape)}.")
    with torch.inference_mode(guidance is None):
        shape = (b, chunk_size, dim_mask.shape[-1])
        x = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32) if noise is None else noise.float()
        x = x * mask
        dtype = decoder.out.weight.dtype
        # Inference tensors cannot be saved for backward, so the guided loop builds its conditioning without them.
        z = z.clone() if z.is_inference() and guidance is not None else z
        time = decoder.grid_time_condition(run.timestep_values, dtype, dev, model_steps)
        time = time.clone() if time.is_inference() and guidance is not None else time
        step_sizes = run.euler_step_sizes()
        compiled = decoder._compiled_flow  # see FlowMatchingActionDecoder.compile_flow
        done = False
        if compiled is not None and guidance is None and step_sizes is not None and not _has_forward_hooks(decoder):
            try:
                z_in, mask_in, time_in = fresh_flow_inputs(z, dim_mask, time, dtype)
                x = compiled(z_in, mask_in, x, time_in, tuple(step_sizes))
                done = True
            except Exception as e:  # torch.compile's limit of graphs, a compiler gone...: sample eagerly
                decoder._compiled_flow = None
                logger.warning(f"The compiled flow loop failed ({e.__class__.__name__}: {str(e).strip()[:200]}); "
                               "this decoder samples eagerly from now on. Call compile_flow() again to recompile.")
        if not done:
            conditioning = decoder.conditioning(z.to(dtype), None, dim_mask, time_condition=time)
            if guidance is not None:
                x = _guided_integration(decoder, run, conditioning, x, mask, guidance, dtype, step_sizes)
            elif step_sizes is not None and conditioning.weights is not None and not _has_forward_hooks(decoder):
                # Euler on plain layers, fused: each step is the velocity's x_t path and one addcmul, on the flattened
                # chunk, which stays zero in padded dimensions (the velocity's padded outputs are multiplied by 0).
                flat = x.reshape(b, -1)
                flat_mask = mask.expand(shape).reshape(b, -1).to(torch.float32)
                w, input_bias = conditioning.weights, conditioning.input_bias
                for modulation, dt in zip(conditioning.step_modulations(), step_sizes):
                    v = plain_velocity(flat if dtype == torch.float32 else flat.to(dtype), w, input_bias, modulation)
                    flat = torch.addcmul(flat, v.float(), flat_mask, value=dt)
                x = flat.view(shape)
            else:
                for t, step in zip(run.timesteps.unbind(0), conditioning.steps()):
                    v = decoder(x.to(dtype), conditioning=step)
                    x = run.step(v, t, x, return_dict=False)[0]
    return x * mask  # outside inference mode: an ordinary tensor


def default_scheduler(config: ActionPriorConfig) -> FlowMatchingActionScheduler:
    """The sampler a new model of ``config`` carries: Euler over ``num_inference_steps``, or the shortcut solver for
    a decoder trained as a shortcut model."""
    solver = "shortcut" if config.shortcut_max_steps else "euler"
    return FlowMatchingActionScheduler(num_inference_steps=config.num_inference_steps, solver=solver)


# --------------------------------------------------------------------------------------------- models
class ActionPriorPreTrainedModel(PreTrainedModel):
    config_class = ActionPriorConfig
    base_model_prefix = "actprior"
    main_input_name = HISTORY
    supports_gradient_checkpointing = False
    _no_split_modules = ["ActionHistoryEncoder", "FlowMatchingActionDecoder"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ActionHistoryEncoder):
            nn.init.trunc_normal_(module.position, std=0.02)
            nn.init.trunc_normal_(module.summary_token, std=0.02)
        elif isinstance(module, ModulatedResidualBlock):
            # Zero-init gates: each block starts as the identity, which keeps deep stacks stable.
            nn.init.zeros_(module.modulation.weight)
            nn.init.zeros_(module.modulation.bias)


class ActionPriorModel(ActionCheckpointMixin, ActionPriorPreTrainedModel):
    """The Stage-1 action prior: history encoder + flow-matching chunk decoder.

    Besides weights and config, a checkpoint carries the flow sampler (``scheduler/``) and, once trained
    on data, the per-embodiment action statistics (``action_normalizer.json``); ``save_pretrained`` /
    ``from_pretrained`` write and read all three.

    Example:
        ```python
        >>> import modeling_actprior
        >>> from transformers import AutoModel
        >>> prior = AutoModel.from_pretrained("path/to/prior")
        >>> chunk = prior.predict_actions(past_actions, embodiment="sawyer")  # (H, 4) raw units
        ```
    """

    def __init__(self, config: ActionPriorConfig):
        super().__init__(config)
        self.encoder = ActionHistoryEncoder(config)
        self.decoder = FlowMatchingActionDecoder(config)
        self.scheduler = default_scheduler(config)
        self.normalizer: ActionNormalizer | None = None
        self.post_init()

    # ------------------------------------------------------------------------------------ checks
    def _check_inputs(self, history, history_mask, dim_mask, actions=None, action_mask=None, state=None):
        check_action_inputs(self.config, history, history_mask, dim_mask, actions, action_mask, state)

    # ------------------------------------------------------------------------------------ encoder
    def encode(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> ActionPriorLatent:
        """Summarize past actions into the prior's latent.

        Args:
            history: ``(B, K', D_max)`` normalized, padded, ``K' <= history_length``.
            history_mask: ``(B, K')`` bool; default all True.
            dim_mask: ``(B, D_max)`` bool; default all True.
            state: ``(B, max_state_dim)`` current state or None.
            sample: draw ``z = mean + sigma * eps`` instead of returning the mean as ``sample``.
        """
        b, k = history.shape[:2]
        history_mask = torch.ones(b, k, dtype=torch.bool, device=history.device) if history_mask is None else history_mask
        dim_mask = torch.ones(b, self.config.max_action_dim, dtype=torch.bool, device=history.device) if dim_mask is None else dim_mask
        self._check_inputs(history, history_mask, dim_mask, state=state)
        mean, logvar = self.encoder(history, history_mask, dim_mask, state)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32).to(mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return ActionPriorLatent(mean=mean, logvar=logvar, sample=z)

    # ------------------------------------------------------------------------------------ training
    def sample_time(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow times ``(B,)`` from the configured density, mapped into ``[time_min, time_max]``."""
        return sample_flow_time(self.config, batch_size, device, generator)

    def forward(
        self,
        history: torch.Tensor,
        actions: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> ActionPriorOutput | tuple:
        """Flow-matching loss for a batch of windows.

        Args:
            history: ``(B, K', D_max)`` past actions, normalized, padded.
            actions: ``(B, H, D_max)`` future chunk, normalized, padded.
            history_mask: ``(B, K')`` bool, True for real past steps (False before an episode's start).
            action_mask: ``(B, H)`` bool, True for real chunk steps (False past an episode's end).
            dim_mask: ``(B, D_max)`` bool, True for the embodiment's real dimensions.
            state: ``(B, max_state_dim)`` current state (standardized, padded) or None.
            noise: ``(B, H, D_max)`` optional fixed noise; ``timesteps``: ``(B,)`` optional fixed flow times.
            kwargs: other batch entries (``embodiment``, ``episode_index``...) are accepted and ignored.
        """
        b, dev = actions.shape[0], actions.device
        history_mask = torch.ones(history.shape[:2], dtype=torch.bool, device=dev) if history_mask is None else history_mask
        action_mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=dev) if action_mask is None else action_mask
        dim_mask = torch.ones(b, self.config.max_action_dim, dtype=torch.bool, device=dev) if dim_mask is None else dim_mask
        self._check_inputs(history, history_mask, dim_mask, actions, action_mask)

        latent = self.encode(history, history_mask, dim_mask, state, sample=self.training, generator=generator)
        if noise is None:
            noise = torch.randn(actions.shape, generator=generator, device=dev, dtype=torch.float32).to(actions.dtype)
        if timesteps is None:
            timesteps = self.sample_time(b, dev, generator).to(actions.dtype)
        flow_loss, velocity, target = flow_matching_loss(self.decoder, self.scheduler, latent.sample, actions,
                                                         action_mask, dim_mask, noise, timesteps)
        kl = gaussian_kl(latent.mean, latent.logvar).mean()
        loss = flow_loss + self.config.kl_weight * kl
        shortcut = None
        if self.decoder.reads_step_size:
            shortcut = shortcut_consistency_loss(self.decoder, latent.sample, actions, action_mask, dim_mask, generator)
            loss = loss + self.config.shortcut_weight * shortcut
        out = ActionPriorOutput(loss=loss, flow_loss=flow_loss, kl_loss=kl, shortcut_loss=shortcut, velocity=velocity,
                                target_velocity=target, timesteps=timesteps, latent=latent)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_actions(
        self,
        z: torch.Tensor,
        dim_mask: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        scheduler: FlowMatchingActionScheduler | None = None,
    ) -> torch.Tensor:
        """Integrate the decoder's flow from noise to a chunk, given latents.

        Args:
            z: ``(B, d_z)`` latents (from ``encode(...).mean``, a VLM, or ``N(0, I)``).
            dim_mask: ``(B, D_max)`` bool; default all True.
            num_inference_steps: flow steps (default: the scheduler's).
            generator: for reproducible initial noise; ``noise`` (``(B, H, D_max)``) fixes it outright.
            scheduler: replaces the checkpoint's sampler for this call (e.g. a Heun solver).
        Returns:
            ``(B, H, D_max)`` float32 normalized actions, zero in padded dimensions.
        """
        dim_mask = torch.ones(z.shape[0], self.config.max_action_dim, dtype=torch.bool, device=z.device) if dim_mask is None else dim_mask
        return integrate_flow(self.decoder, scheduler or self.scheduler, z, dim_mask, self.config.chunk_size,
                              num_inference_steps, generator, noise)

    @torch.no_grad()
    def predict_actions(
        self,
        history,
        embodiment: str,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        sample_latent: bool = False,
    ) -> torch.Tensor:
        """Raw past actions -> the next chunk in raw units, through the checkpoint's normalizer.

        Args:
            history: ``(K', action_dim)`` or ``(B, K', action_dim)`` past actions in the robot's own units,
                oldest first; ``K'`` may be 0 (episode start) and at most ``history_length``.
            embodiment: a robot this checkpoint has statistics for.
        Returns:
            ``(H, action_dim)`` or ``(B, H, action_dim)`` raw actions.
        """
        if self.normalizer is None:
            raise ValueError(
                "This prior has no action normalizer (no action_normalizer.json in the checkpoint), so it cannot "
                "map raw actions. Attach one: model.normalizer = ActionNormalizer(...); or train it on data."
            )
        spec = self.normalizer.spec(embodiment)
        if isinstance(history, (list, tuple)) and len({np.shape(h) for h in history}) > 1:
            raise ValueError(
                f"history holds {len(history)} past-action arrays of different lengths "
                f"({', '.join(str(np.shape(h)) for h in history)}); a batch needs one (batch, steps, "
                f"{spec.action_dim}) array of equal steps. Predict ragged histories one by one, or through the "
                "processor, which pads and masks them.")
        h = torch.as_tensor(np.asarray(history, dtype=np.float32)) if not isinstance(history, torch.Tensor) else history.float()
        single = h.ndim == 2
        h = h[None] if single else h
        if h.ndim != 3 or (h.shape[1] > 0 and h.shape[-1] != spec.action_dim):
            raise ValueError(
                f"history for {embodiment!r} must be (steps, {spec.action_dim}) or (batch, steps, {spec.action_dim}) "
                f"raw actions; got shape {tuple(h.shape)}."
            )
        b, k = h.shape[:2]
        dev = self.device
        if k == 0:
            norm = torch.zeros(b, 0, self.config.max_action_dim, device=dev)
        else:
            norm, _ = self.normalizer.normalize(h.to(dev), embodiment)
        mask = self.normalizer.dim_mask(embodiment, device=dev).expand(b, -1)
        dtype = next(self.encoder.parameters()).dtype
        latent = self.encode(norm.to(dtype), None, mask, sample=sample_latent, generator=generator)
        chunk = self.sample_actions(latent.sample, mask, num_inference_steps, generator)
        raw = self.normalizer.unnormalize(chunk, embodiment)
        ensure_finite_actions(self, raw, {"history": norm})
        return raw[0] if single else raw


#: Normalized inputs beyond this magnitude are read as the cause of a non-finite chunk (the statistics map the
#: robot's range to [-1, 1]; values a million times outside it overflow the encoder).
_IMPLAUSIBLE_NORMALIZED = 1e6


def ensure_finite_actions(model: nn.Module, actions: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> None:
    """Raise instead of returning a chunk with NaN or inf (it must never reach a robot), naming the cause: a weight
    that is not finite, else a normalized input (``inputs``: name -> tensor) that is far outside the robot's
    statistics or not finite."""
    if bool(torch.isfinite(actions).all()):
        return
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"The model produced non-finite actions because its weight {name} holds NaN or inf: the "
                             "checkpoint is corrupt (re-export it; a checksum file would have caught a damaged copy).")
    for name, x in inputs.items():
        if x is None or not x.is_floating_point() or not x.numel():
            continue
        peak = float(x.abs().max()) if bool(torch.isfinite(x).all()) else float("inf")
        if peak > _IMPLAUSIBLE_NORMALIZED:
            raise ValueError(f"The model produced non-finite actions: input {name!r} holds values up to {peak:.3g} in "
                             "normalized units, far outside the robot's action statistics (about [-1, 1]). Pass the "
                             "robot's actions in its own units, for the embodiment the statistics belong to.")
    raise ValueError("The model produced non-finite actions although its weights and inputs are finite; refusing to "
                     "return them. Check the inputs' scale and the checkpoint's normalization statistics.")


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed over the last dim: ``(B, d_z)`` -> ``(B,)``."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _beta_icdf_sample(n: int, a: float, b: float, generator, device) -> torch.Tensor:
    """Beta(a, b) samples drawn through ``generator`` (exact inverse CDF when a or b is 1)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if b == 1.0:
        return u.pow(1.0 / a).float()
    if a == 1.0:
        return (1.0 - (1.0 - u).pow(1.0 / b)).float()
    # General case: invert the regularized incomplete beta numerically on a fine grid.
    grid = torch.linspace(0, 1, 4097, dtype=torch.float64, device=device)
    pdf = grid.clamp(1e-12, 1 - 1e-12).pow(a - 1) * (1 - grid).clamp(1e-12, 1).pow(b - 1)
    cdf = torch.cumsum((pdf[1:] + pdf[:-1]) / 2, 0)
    cdf = torch.cat([cdf.new_zeros(1), cdf / cdf[-1]])
    idx = torch.searchsorted(cdf, u).clamp(1, len(grid) - 1)
    lo, hi = cdf[idx - 1], cdf[idx]
    frac = (u - lo) / (hi - lo).clamp_min(1e-12)
    return (grid[idx - 1] + frac * (grid[idx] - grid[idx - 1])).float()


__all__ = [
    "ActionHistoryEncoder",
    "ActionPriorLatent",
    "ActionPriorModel",
    "ActionPriorOutput",
    "ActionPriorPreTrainedModel",
    "ChunkGuidance",
    "FlowMatchingActionDecoder",
    "default_scheduler",
    "gaussian_kl",
    "rtc_weights",
    "shortcut_consistency_loss",
]
