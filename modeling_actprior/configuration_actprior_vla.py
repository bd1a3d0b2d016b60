"""Configuration of the Stage-2 vision-language-action model with an action prior (``model_type="actprior_vla"``).

The config nests two sub-configs, transformers-5 style (``sub_configs_defaults``, as ``PI0Config`` does):
``vlm_config`` (any transformers vision-language config whose base model ``AutoModel.from_config`` builds,
e.g. ``LlavaConfig`` or ``PaliGemmaConfig``) and ``prior_config`` (the Stage-1 ``ActionPriorConfig`` whose
encoder and decoder the VLA reuses). Everything else is the method's switches and schedule.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports only its
siblings, relatively.
"""

from __future__ import annotations

import copy
import math
import sys

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_actprior import ACTPRIOR_PRESETS, ActionPriorConfig, refuse_unknown_fields

#: Bumped when a field changes meaning; checkpoints record the version they were written with.
ACTPRIOR_VLA_CONFIG_VERSION = 1

#: Special tokens of the instruction tokenizers built for random-init presets; ids follow this order.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<image>"
TINY_IMAGE_TOKEN_ID = 3

VLM_FAMILIES = ("llava", "paligemma")
DISTILL_DECAYS = ("cosine", "linear")
DISTILL_MATCHES = ("kl", "mean")
LATENT_CONDITIONINGS = ("sample", "mean")
VISION_MODES = ("frozen", "lora", "full")


def _siglip(hidden, layers, heads, ffn, image, patch):
    return {"model_type": "siglip_vision_model", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ffn, "image_size": image, "patch_size": patch,
            "vision_use_head": False}


def _vlm(family: str, vision: dict, text: dict, image_token_id: int) -> dict:
    """A ``vlm_config`` dict of ``family`` ("llava" or "paligemma") with the given vision and text towers."""
    if family == "llava":
        # SigLIP has no CLS token, so keep every patch ("full") and read the last vision layer.
        return {"model_type": "llava", "vision_config": vision, "text_config": {"model_type": "llama", **text},
                "image_token_index": image_token_id, "vision_feature_select_strategy": "full",
                "vision_feature_layer": -1, "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2}
    if family == "paligemma":
        gemma = {"model_type": "gemma", "num_key_value_heads": 1, **text}
        gemma.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
        return {"model_type": "paligemma", "vision_config": vision, "text_config": gemma,
                "image_token_index": image_token_id, "vocab_size": text["vocab_size"],
                "projection_dim": text["hidden_size"], "hidden_size": text["hidden_size"]}
    raise ValueError(f"Unknown vlm_family {family!r}; choose from {VLM_FAMILIES} (or pass your own vlm_config).")


_TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=256)
_SMALL_TEXT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=768, vocab_size=4096, max_position_embeddings=1024)
# OpenVLA's backbone: Llama-2-7B text (vocab 32000 + pad) behind a SigLIP-so400m-shaped vision tower.
_LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)

#: ``name -> (vision dict, text dict, image token id, prior preset)``; the family is chosen separately.
VLA_PRESETS = {
    "tiny": (_siglip(32, 1, 2, 64, 32, 8), _TINY_TEXT, TINY_IMAGE_TOKEN_ID, "tiny"),
    "small": (_siglip(128, 2, 4, 512, 64, 8), _SMALL_TEXT, TINY_IMAGE_TOKEN_ID, "small"),
    "openvla-7b": (_siglip(1152, 27, 16, 4304, 224, 14), _LLAMA2_7B, 32000, "base"),
}

#: The method's baselines: one class, one code path, these switches (see ``VLAWithPriorConfig``).
VLA_BASELINES = {
    # Distillation as configured; the history token trained on augmented histories (noise 0.3, shift <= 8, sampled
    # summary): without it the token is copied ("copycat") and the full method scores below scratch in closed loop
    # (benchmarks/prior_vs_scratch.py --budget medium: 0.11 as the paper builds it, 0.39 with it, scratch 0.19).
    "full": dict(use_prior_decoder=True, history_token=True, history_noise=0.3, history_shift=8,
                 history_latent="sample"),
    "no_prior": dict(use_prior_decoder=False, distill_weight=0.0, history_token=False),
    "decoder_only": dict(use_prior_decoder=True, distill_weight=0.0, history_token=False),
    "kd_only": dict(use_prior_decoder=False, history_token=False),
    "no_history_token": dict(use_prior_decoder=True, history_token=False),
}


@strict
class VLAWithPriorConfig(PreTrainedConfig):
    r"""
    Configuration of [`VLAWithPriorForAction`]: a vision-language model whose sequence gets one extra
    *history token* (the Stage-1 encoder's summary of past actions) and one learned *latent query*; the
    query's last hidden state gives a Gaussian in the prior's latent space, which conditions the Stage-1
    flow-matching decoder (the action head). Training loss:
    ``flow_matching_bc + lambda(step) * KL(p_VLM(z | o, l, z_hist) || p_prior(z | a_<t))``.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision-language backbone (``AutoModel.from_config`` must give a base model returning hidden
            states, e.g. ``LlavaModel`` or ``PaliGemmaModel``). Defaults to the OpenVLA-like LLaVA stack
            (SigLIP-so400m-shaped vision, Llama-2-7B-shaped text).
        prior_config (`dict` or `ActionPriorConfig`, *optional*):
            The Stage-1 prior whose encoder and decoder this model carries; ``from_prior`` copies it.
        history_token (`bool`, defaults to True):
            Feed the encoder's latent mean of the past ``K`` actions to the VLM as exactly one token.
        history_dropout (`float`, defaults to 0.0):
            Training only: the share of samples whose history token is hidden from the VLM (attention-masked), so
            the policy cannot lean on its own past actions alone ("copycat" behaviour in closed loop) and must read
            the observation too. Inference always shows the token.
        freeze_history_encoder (`bool`, defaults to True):
            Keep the history-token encoder at the prior's weights (only its projection trains).
        use_prior_decoder (`bool`, defaults to True):
            ``from_prior`` initializes the action head with the prior's decoder ("decoder reuse"); False
            leaves it randomly initialized (the no-prior baseline).
        distill_weight (`float`, defaults to 1.0):
            ``lambda`` during the plateau of the distillation schedule; 0 disables distillation (and the
            teacher is never run).
        distill_hold_steps (`int`, defaults to 500):
            Steps for which ``lambda = distill_weight``.
        distill_decay_steps (`int`, defaults to 500):
            Steps over which ``lambda`` then decays to exactly 0 (it stays 0 afterwards).
        distill_decay (`str`, defaults to `"cosine"`):
            Shape of the decay, ``"cosine"`` or ``"linear"``.
        latent_conditioning (`str`, defaults to `"sample"`):
            What conditions the action head in training: ``"sample"`` (a reparameterized draw from
            ``p_VLM``, as the prior was trained with encoder samples) or ``"mean"``. Inference always uses
            the mean.
        action_head_lr_multiplier (`float`, defaults to 1.0):
            Learning rate of the action head relative to the rest (the training script's param groups).
        lora_r (`int`, defaults to 0):
            Rank of PEFT LoRA adapters on the language model's attention projections; 0 trains the full VLM.
        lora_alpha (`int`, defaults to 16) / lora_dropout (`float`, defaults to 0.0):
            LoRA scaling and dropout.
        lora_target_modules (`list[str]`, *optional*):
            Module names inside the language model that get adapters (default q/k/v/o projections).
        vision_mode (`str`, defaults to `"frozen"`):
            The vision tower when ``lora_r > 0``: ``"frozen"``, ``"lora"`` (adapters on its attention too) or
            ``"full"`` (trained). Without LoRA: ``"frozen"`` freezes it, anything else trains it.
        base_vlm (`str`, *optional*):
            The pretrained VLM this model started from (a Hub id or the folder it was loaded from), recorded by
            ``from_prior(prior, vlm=...)``; None for a randomly initialized preset. Model cards name it as
            ``base_model``.
        max_text_length (`int`, defaults to 64):
            Instruction tokens kept by the processor (longer instructions are truncated).
        actprior_vla_config_version (`int`):
            Version of this config's schema, written into ``config.json``.
    """

    model_type = "actprior_vla"
    sub_configs_defaults = {
        "vlm_config": SubConfigSpec(
            config_class=AutoConfig, model_type="llava",
            init_kwargs={k: v for k, v in _vlm("llava", *VLA_PRESETS["openvla-7b"][:3]).items() if k != "model_type"},
        ),
        "prior_config": SubConfigSpec(config_class=ActionPriorConfig, init_kwargs=dict(ACTPRIOR_PRESETS["base"])),
    }

    vlm_config: dict | PreTrainedConfig | None = None
    prior_config: dict | PreTrainedConfig | None = None
    history_token: bool = True
    history_dropout: float = 0.0
    history_noise: float = 0.0
    history_shift: int = 0
    history_lag: int = 0
    history_latent: str = "mean"
    freeze_history_encoder: bool = True
    use_prior_decoder: bool = True
    distill_weight: float = 1.0
    distill_match: str = "kl"
    distill_teacher_logvar_min: float | None = None
    distill_teacher_temperature: float = 1.0
    distill_hold_steps: int = 500
    distill_decay_steps: int = 500
    distill_decay: str = "cosine"
    latent_conditioning: str = "sample"
    action_head_lr_multiplier: float = 1.0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    vision_mode: str = "frozen"
    max_text_length: int = 64
    base_vlm: str | None = None
    actprior_vla_config_version: int = ACTPRIOR_VLA_CONFIG_VERSION

    def __post_init__(self, **kwargs):
        # Exported folders also carry `custom_pipelines` (the robot-action pipeline for remote code).
        refuse_unknown_fields(self, kwargs, "actprior_vla config", self.actprior_vla_config_version,
                              ACTPRIOR_VLA_CONFIG_VERSION, allowed=("custom_pipelines",))
        super().__post_init__(**kwargs)
        self._check()
        self._drop_registered_custom_pipelines()

    def _drop_registered_custom_pipelines(self) -> None:
        # A Hub export names its pipeline file in `custom_pipelines` for Pythons without actprior. Where that task is
        # registered already (`import modeling_actprior`), the installed pipeline serves it: transformers would
        # otherwise demand trust_remote_code=True for a task this Python knows.
        pipelines = sys.modules.get("transformers.pipelines")
        custom = getattr(self, "custom_pipelines", None)
        if pipelines is not None and isinstance(custom, dict) and custom:
            known = pipelines.PIPELINE_REGISTRY.supported_tasks
            self.custom_pipelines = {task: info for task, info in custom.items() if task not in known}

    def _check(self) -> None:
        for name in ("history_token", "freeze_history_encoder", "use_prior_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VLAWithPriorConfig.{name} must be true or false; got {getattr(self, name)!r}.")
        for name in ("distill_weight", "history_dropout", "action_head_lr_multiplier", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"VLAWithPriorConfig.{name} must be a finite number; got {value!r}.")
        if self.distill_weight < 0 or self.distill_hold_steps < 0 or self.distill_decay_steps < 0:
            raise ValueError(
                "VLAWithPriorConfig needs distill_weight >= 0, distill_hold_steps >= 0 and distill_decay_steps >= 0; "
                f"got {self.distill_weight}, {self.distill_hold_steps}, {self.distill_decay_steps}."
            )
        for name, allowed in (("distill_decay", DISTILL_DECAYS), ("latent_conditioning", LATENT_CONDITIONINGS),
                              ("vision_mode", VISION_MODES), ("distill_match", DISTILL_MATCHES),
                              ("history_latent", LATENT_CONDITIONINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VLAWithPriorConfig.{name} must be one of {allowed}; got {getattr(self, name)!r}.")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError(f"VLAWithPriorConfig.history_dropout must be in [0, 1); got {self.history_dropout}.")
        k = self.prior_config.history_length if self.prior_config is not None else None
        for name in ("history_shift", "history_lag"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (k is not None and value >= k):
                raise ValueError(f"VLAWithPriorConfig.{name} must be an integer in [0, history_length={k}); got "
                                 f"{value!r}.")
        if not (math.isfinite(self.history_noise) and self.history_noise >= 0):
            raise ValueError(f"VLAWithPriorConfig.history_noise must be a finite value >= 0; got {self.history_noise}.")
        if not (math.isfinite(self.distill_teacher_temperature) and self.distill_teacher_temperature > 0):
            raise ValueError("VLAWithPriorConfig.distill_teacher_temperature must be a finite value > 0; got "
                             f"{self.distill_teacher_temperature}.")
        if self.distill_teacher_logvar_min is not None and not math.isfinite(self.distill_teacher_logvar_min):
            raise ValueError("VLAWithPriorConfig.distill_teacher_logvar_min must be finite or None; got "
                             f"{self.distill_teacher_logvar_min}.")
        if self.lora_r < 0 or self.action_head_lr_multiplier < 0 or self.max_text_length <= 0:
            raise ValueError(
                "VLAWithPriorConfig needs lora_r >= 0, action_head_lr_multiplier >= 0 and max_text_length > 0; got "
                f"{self.lora_r}, {self.action_head_lr_multiplier}, {self.max_text_length}."
            )
        if self.actprior_vla_config_version > ACTPRIOR_VLA_CONFIG_VERSION:
            raise ValueError(
                f"This checkpoint was written with actprior_vla config version {self.actprior_vla_config_version}, "
                f"newer than this code understands ({ACTPRIOR_VLA_CONFIG_VERSION}). Upgrade actprior to load it."
            )
        if not hasattr(self.vlm_config, "get_text_config") or getattr(self.vlm_config, "vision_config", None) is None:
            raise ValueError(
                f"vlm_config must be a vision-language config with vision_config and text_config (LLaVA, PaliGemma...); "
                f"got {type(self.vlm_config).__name__}."
            )

    # ------------------------------------------------------------------------------------ derived
    @property
    def text_hidden_size(self) -> int:
        """Width of the language model's token embeddings (the history token and query live there)."""
        return self.vlm_config.get_text_config().hidden_size

    @property
    def image_token_id(self) -> int:
        return self.vlm_config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one image takes in the prompt (what the VLM's vision features fill)."""
        vis = self.vlm_config.vision_config
        patches = (vis.image_size // vis.patch_size) ** 2
        if self.vlm_config.model_type == "paligemma":
            return patches
        has_cls = not vis.model_type.startswith("siglip")
        drop_cls = getattr(self.vlm_config, "vision_feature_select_strategy", "full") == "default"
        return patches + int(has_cls) - int(drop_cls)

    def distill_lambda(self, step: int) -> float:
        """``lambda(step)``: ``distill_weight`` for ``distill_hold_steps``, then a cosine (or linear) decay that
        reaches exactly 0 at ``distill_hold_steps + distill_decay_steps`` and stays there."""
        step = int(step)
        if self.distill_weight == 0 or step >= self.distill_hold_steps + self.distill_decay_steps:
            return 0.0
        if step < self.distill_hold_steps:
            return float(self.distill_weight)
        frac = (step - self.distill_hold_steps) / self.distill_decay_steps
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if self.distill_decay == "cosine" else 1.0 - frac
        return float(self.distill_weight * shape)

    # ------------------------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, preset: str, vlm_family: str = "llava", baseline: str | None = None,
                    prior_config: ActionPriorConfig | dict | None = None, **overrides) -> VLAWithPriorConfig:
        """A config of size ``preset`` (``"tiny"``, ``"small"``, ``"openvla-7b"``) in VLM family ``vlm_family``
        (``"llava"`` or ``"paligemma"``), optionally with the switches of a ``baseline`` from ``VLA_BASELINES``.

        ``prior_config`` defaults to the matching Stage-1 preset; any other field can be overridden.
        """
        if preset not in VLA_PRESETS:
            raise ValueError(f"Unknown VLAWithPriorConfig preset {preset!r}; choose from {sorted(VLA_PRESETS)}.")
        vision, text, image_token_id, prior_preset = VLA_PRESETS[preset]
        vlm = _vlm(vlm_family, copy.deepcopy(vision), dict(text), image_token_id)
        if prior_config is None:
            prior_config = ActionPriorConfig.from_preset(prior_preset)
        return cls(vlm_config=vlm, prior_config=prior_config, **{**baseline_switches(baseline), **overrides})


def baseline_switches(name: str | None) -> dict:
    """The config switches of a named baseline (``None`` -> no change)."""
    if name is None:
        return {}
    if name not in VLA_BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose from {sorted(VLA_BASELINES)}.")
    return dict(VLA_BASELINES[name])


__all__ = ["ACTPRIOR_VLA_CONFIG_VERSION", "VLA_BASELINES", "VLA_PRESETS", "VLAWithPriorConfig", "baseline_switches"]
