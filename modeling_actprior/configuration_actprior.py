"""Configuration of the Stage-1 action prior (``model_type="actprior"``).

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports
nothing from the installed package.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

#: Bumped when a field changes meaning; checkpoints record the version they were written with.
ACTPRIOR_CONFIG_VERSION = 1

TIME_SAMPLING_DENSITIES = ("beta", "uniform", "logit_normal")

# Keys transformers itself passes to a config besides its dataclass fields (from config.json or from_pretrained).
_TRANSFORMERS_KWARGS = {"auto_map", "model_type", "name_or_path", "torch_dtype", "attn_implementation",
                        "output_attentions", "experts_implementation", "per_layer_config", "num_labels"}

def refuse_unknown_fields(config, kwargs: dict, schema: str, written: int, current: int, allowed=()) -> None:
    """Raise a ValueError listing ``kwargs`` that are neither fields of ``config`` nor what transformers passes
    (``_TRANSFORMERS_KWARGS``, ``allowed``): a misspelt or newer field must not be carried along silently."""
    unknown = sorted(k for k in kwargs if k not in _TRANSFORMERS_KWARGS and k not in allowed and not k.startswith("_"))
    if unknown:
        fields = sorted(f for f in config.__dataclass_fields__ if not f.startswith("_"))
        raise ValueError(
            f"{type(config).__name__} got unknown field(s) {unknown} (config written with {schema} version {written}; "
            f"this code reads version {current}). Known fields: {fields}. Fix the name, or upgrade actprior if the "
            "checkpoint comes from a newer release."
        )


#: Size presets. ``tiny`` is for tests and CI; ``base`` is near the paper's 4-layer encoder and
#: 4-block MLP decoder.
ACTPRIOR_PRESETS = {
    "tiny": dict(hidden_size=32, encoder_layers=1, encoder_heads=2, encoder_ffn_size=64,
                 decoder_hidden_size=64, decoder_layers=2, latent_dim=8),
    "small": dict(hidden_size=128, encoder_layers=2, encoder_heads=4, encoder_ffn_size=512,
                  decoder_hidden_size=512, decoder_layers=3, latent_dim=32),
    "base": dict(hidden_size=256, encoder_layers=4, encoder_heads=8, encoder_ffn_size=1024,
                 decoder_hidden_size=1024, decoder_layers=4, latent_dim=64),
}


@strict
class ActionPriorConfig(PreTrainedConfig):
    r"""
    Configuration of [`ActionPriorModel`]: a transformer encoder over past actions that yields a
    diagonal-Gaussian latent ``z``, and a flow-matching MLP decoder ``v(x_t, t, z)`` over the future
    chunk. Flow time follows diffusers/openpi: ``t = 1`` is noise, ``t = 0`` is data.

    Args:
        max_action_dim (`int`, defaults to 32):
            ``D_max``, the padded width of the unified action space shared by all embodiments.
        chunk_size (`int`, defaults to 16):
            ``H``, number of future actions the decoder generates per sample.
        history_length (`int`, defaults to 16):
            ``K``, number of past actions the encoder reads. Shorter histories are padded and masked;
            longer ones are an error.
        max_state_dim (`int`, defaults to 0):
            Padded width of an optional proprioceptive state of the current step, fed to the encoder's
            summary token (standardized per dataset, zero-padded). 0 disables states.
        hidden_size (`int`, defaults to 256):
            Width of the encoder transformer.
        encoder_layers (`int`, defaults to 4):
            Number of transformer encoder layers.
        encoder_heads (`int`, defaults to 8):
            Attention heads per encoder layer.
        encoder_ffn_size (`int`, defaults to 1024):
            Feed-forward width inside each encoder layer.
        latent_dim (`int`, defaults to 64):
            ``d_z``, width of the latent ``z``.
        decoder_hidden_size (`int`, defaults to 1024):
            Width of the MLP decoder's residual blocks.
        decoder_layers (`int`, defaults to 4):
            Number of residual MLP blocks in the decoder (the paper's "4-layer MLP decoder").
        time_embedding_dim (`int`, defaults to 128):
            Width of the sinusoidal embedding of flow time ``t``.
        dropout (`float`, defaults to 0.0):
            Dropout in encoder and decoder.
        kl_weight (`float`, defaults to 1e-5):
            ``beta`` in ``loss = flow_matching + beta * KL(q(z|history) || N(0, I))``. May be 0. Measured on the
            quickstart corpus: 1e-3 collapsed the posterior (0 of 32 latent dims active, samples no better than
            the mean chunk); 1e-5 keeps ~31 dims active and the prior beats both baselines on every robot.
        logvar_min (`float`, defaults to -10.0) / logvar_max (`float`, defaults to 4.0):
            Clamp range of the latent's log-variance, for numerical safety.
        time_sampling (`str`, defaults to `"beta"`):
            Density of training flow times: ``"beta"`` (Beta(alpha, beta) as in pi0/SmolVLA),
            ``"uniform"``, or ``"logit_normal"`` (sigmoid of a normal).
        time_beta_alpha (`float`, defaults to 1.5) / time_beta_beta (`float`, defaults to 1.0):
            Parameters of the Beta density.
        time_logit_normal_mean (`float`, defaults to 0.0) / time_logit_normal_std (`float`, defaults to 1.0):
            Parameters of the logit-normal density.
        time_min (`float`, defaults to 0.001) / time_max (`float`, defaults to 1.0):
            Sampled times are mapped affinely into ``[time_min, time_max]`` so ``t = 0`` exactly (a target
            equal to the data) is never drawn.
        num_inference_steps (`int`, defaults to 10):
            Default number of flow integration steps at sampling time.
        shortcut_max_steps (`int`, defaults to 0):
            Few-step generation (shortcut models, Frans et al. 2024). 0: plain flow matching. A power of two ``M >= 2``:
            the decoder also reads the step size ``d`` and learns, besides the velocity (``d = 0``), the average
            velocity over a step of size ``d`` for ``d = 1, 1/2, ..., 2/M`` through self-consistency (one step of
            ``2d`` equals two steps of ``d``; steps of ``1/M`` read the velocity). Checkpoints then sample with the
            ``"shortcut"`` solver in 1, 2, 4... steps; the ``"euler"`` solver still integrates the velocity itself.
        shortcut_fraction (`float`, defaults to 0.25):
            Share of each batch that also gets a self-consistency target (the paper's 1/4).
        shortcut_weight (`float`, defaults to 1.0):
            Weight of the self-consistency loss beside the flow-matching loss.
        actprior_config_version (`int`):
            Version of this config's schema, written into ``config.json``.
    """

    model_type = "actprior"

    max_action_dim: int = 32
    chunk_size: int = 16
    history_length: int = 16
    max_state_dim: int = 0
    hidden_size: int = 256
    encoder_layers: int = 4
    encoder_heads: int = 8
    encoder_ffn_size: int = 1024
    latent_dim: int = 64
    decoder_hidden_size: int = 1024
    decoder_layers: int = 4
    time_embedding_dim: int = 128
    dropout: float = 0.0
    kl_weight: float = 1e-5
    logvar_min: float = -10.0
    logvar_max: float = 4.0
    time_sampling: str = "beta"
    time_beta_alpha: float = 1.5
    time_beta_beta: float = 1.0
    time_logit_normal_mean: float = 0.0
    time_logit_normal_std: float = 1.0
    time_min: float = 0.001
    time_max: float = 1.0
    num_inference_steps: int = 10
    shortcut_max_steps: int = 0
    shortcut_fraction: float = 0.25
    shortcut_weight: float = 1.0
    actprior_config_version: int = ACTPRIOR_CONFIG_VERSION

    def __post_init__(self, **kwargs):
        refuse_unknown_fields(self, kwargs, "actprior config", self.actprior_config_version, ACTPRIOR_CONFIG_VERSION)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        positive = ("max_action_dim", "chunk_size", "history_length", "hidden_size", "encoder_layers",
                    "encoder_heads", "encoder_ffn_size", "latent_dim", "decoder_hidden_size", "decoder_layers",
                    "time_embedding_dim", "num_inference_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ActionPriorConfig.{name} must be a positive integer; got {getattr(self, name)}.")
        if self.max_state_dim < 0:
            raise ValueError(f"ActionPriorConfig.max_state_dim must be >= 0 (0 = no states); got {self.max_state_dim}.")
        if self.hidden_size % self.encoder_heads:
            raise ValueError(
                f"ActionPriorConfig.hidden_size={self.hidden_size} must be divisible by encoder_heads="
                f"{self.encoder_heads}."
            )
        if self.time_embedding_dim % 2:
            raise ValueError(f"ActionPriorConfig.time_embedding_dim must be even; got {self.time_embedding_dim}.")
        if self.time_sampling not in TIME_SAMPLING_DENSITIES:
            raise ValueError(
                f"ActionPriorConfig.time_sampling must be one of {TIME_SAMPLING_DENSITIES}; got {self.time_sampling!r}."
            )
        if not (0.0 <= self.time_min < self.time_max <= 1.0):
            raise ValueError(
                f"ActionPriorConfig needs 0 <= time_min < time_max <= 1; got {self.time_min}, {self.time_max}."
            )
        if not (math.isfinite(self.logvar_min) and math.isfinite(self.logvar_max) and self.logvar_min < self.logvar_max):
            raise ValueError(f"ActionPriorConfig needs finite logvar_min < logvar_max; got {self.logvar_min}, "
                             f"{self.logvar_max}.")
        if not math.isfinite(self.kl_weight) or self.kl_weight < 0 or not (0.0 <= self.dropout < 1.0):
            raise ValueError(
                f"ActionPriorConfig needs kl_weight >= 0 and 0 <= dropout < 1; got {self.kl_weight}, {self.dropout}."
            )
        m = self.shortcut_max_steps
        if m != 0 and (m < 2 or m & (m - 1)):
            raise ValueError(f"ActionPriorConfig.shortcut_max_steps must be 0 (off) or a power of two >= 2 (16 learns "
                             f"1, 2, 4 and 8-step shortcuts); got {m}.")
        if not (0.0 < self.shortcut_fraction <= 1.0) or not (math.isfinite(self.shortcut_weight)
                                                              and self.shortcut_weight >= 0):
            raise ValueError(f"ActionPriorConfig needs 0 < shortcut_fraction <= 1 and shortcut_weight >= 0; got "
                             f"{self.shortcut_fraction}, {self.shortcut_weight}.")
        if self.actprior_config_version > ACTPRIOR_CONFIG_VERSION:
            raise ValueError(
                f"This checkpoint was written with actprior config version {self.actprior_config_version}, newer "
                f"than this code understands ({ACTPRIOR_CONFIG_VERSION}). Upgrade actprior to load it."
            )

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> ActionPriorConfig:
        """A config of size ``preset`` (``"tiny"``, ``"small"`` or ``"base"``), any field overridable."""
        if preset not in ACTPRIOR_PRESETS:
            raise ValueError(f"Unknown ActionPriorConfig preset {preset!r}; choose from {sorted(ACTPRIOR_PRESETS)}.")
        return cls(**{**ACTPRIOR_PRESETS[preset], **overrides})


__all__ = ["ACTPRIOR_CONFIG_VERSION", "ACTPRIOR_PRESETS", "ActionPriorConfig"]
