"""Stage 2 of the method: ``VLAWithPriorForAction``, a vision-language-action model built around a Stage-1 prior.

Sequence fed to the VLM (left-padded, so the last position is always the query)::

    [pad ... pad] [image tokens] [bos] [instruction tokens] [history token] [latent query]

* History token: the prior's encoder (frozen by default) summarizes the past ``K`` actions into its latent mean
  ``z_hist`` ``(B, d_z)``; ``Linear(d_z, text_hidden)`` makes it exactly one token, whatever ``K`` is.
* Latent readout: the query's last hidden state -> ``Linear`` -> ``(mean, logvar)`` of ``p_VLM(z | o, l, z_hist)``
  in the prior's latent space.
* Action head: the prior's flow-matching decoder ``v(x_t, t, z)``, conditioned on ``z ~ p_VLM`` in training
  (``latent_conditioning="sample"``, reparameterized) or its mean (``"mean"``; always the mean at inference).
* Teacher: a frozen copy of the prior's encoder gives ``p_prior(z | a_<t)`` for the same window.
* Loss: ``bc_loss + lambda(step) * KL(p_VLM || p_prior)``, with ``lambda`` from ``config.distill_lambda``: a
  plateau, then a decay to exactly 0. Once ``lambda`` is 0 the teacher is not run and ``kd_loss`` is exactly 0.

Flow time follows the prior: ``t = 1`` is noise, ``t = 0`` is data. Actions are normalized and padded to
``D_max`` with a dimension mask, exactly as in Stage 1.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports only its
siblings, relatively.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .action_space import ActionNormalizer
from .configuration_actprior import ActionPriorConfig
from .configuration_actprior_vla import VLAWithPriorConfig
from .inputs import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES, check_action_inputs  # noqa: F401 - keys re-exported
from .modeling_actprior import (
    ActionCheckpointMixin,
    ActionHistoryEncoder,
    ActionPriorPreTrainedModel,
    ChunkGuidance,
    FlowMatchingActionDecoder,
    default_scheduler,
    ensure_finite_actions,
    flow_matching_loss,
    integrate_flow,
    sample_flow_time,
    shortcut_consistency_loss,
)
from .scheduling_flow_matching import FlowMatchingActionScheduler

# PaliGemma counts positions from 1; LLaVA (Llama) from 0.
_POSITION_OFFSET = {"paligemma": 1}
_LANGUAGE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class VLAWithPriorOutput(ModelOutput):
    """
    Args:
        loss (`()`): ``bc_loss + kd_weight * kd_loss`` (``+ shortcut_weight * shortcut_loss`` when the action head is a
            shortcut decoder).
        bc_loss (`()`): masked flow-matching MSE of the action head, mean over real (step, dimension) entries.
        kd_loss (`()`): ``KL(p_VLM || p_prior)`` summed over ``d_z``, mean over the batch; exactly 0 when
            ``kd_weight`` is 0 (the teacher is not run then).
        kd_weight (`()`): ``lambda(step)`` used for this batch.
        shortcut_loss (`()`): the action head's self-consistency loss when the prior was trained as a shortcut model
            (``shortcut_max_steps``), so Stage 2 keeps its few-step sampling; else None.
        latent_mean (`(B, d_z)`) / latent_logvar (`(B, d_z)`): ``p_VLM(z | observation, instruction, history)``.
        prior_mean (`(B, d_z)`) / prior_logvar (`(B, d_z)`): the teacher's ``p_prior(z | a_<t)``, or None.
        velocity (`(B, H, D_max)`): predicted velocity, zero in padded dimensions.
        target_velocity (`(B, H, D_max)`): ``noise - actions``, zero in padded dimensions.
        timesteps (`(B,)`): the flow times of this batch.
    """

    loss: torch.Tensor | None = None
    bc_loss: torch.Tensor | None = None
    kd_loss: torch.Tensor | None = None
    kd_weight: torch.Tensor | None = None
    shortcut_loss: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_logvar: torch.Tensor | None = None
    prior_mean: torch.Tensor | None = None
    prior_logvar: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    target_velocity: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


def gaussian_kl_between(mean_p, logvar_p, mean_q, logvar_q) -> torch.Tensor:
    """``KL(N(mean_p, exp(logvar_p)) || N(mean_q, exp(logvar_q)))`` summed over the last dim: ``(B, d_z)`` -> ``(B,)``."""
    return 0.5 * (logvar_q - logvar_p + (logvar_p.exp() + (mean_p - mean_q).pow(2)) / logvar_q.exp() - 1.0).sum(-1)


# --------------------------------------------------------------------------------------------- models
class VLAWithPriorPreTrainedModel(PreTrainedModel):
    config_class = VLAWithPriorConfig
    base_model_prefix = "actprior_vla"
    main_input_name = INPUT_IDS
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = False  # PaliGemma's prefix mask is not expressible in flash attention
    _no_split_modules = ["ActionHistoryEncoder", "FlowMatchingActionDecoder"]

    @torch.no_grad()
    def _init_weights(self, module):
        # The VLM initializes itself (it is a PreTrainedModel); the prior's blocks keep the prior's init.
        if isinstance(module, VLAWithPriorForAction):
            std = getattr(self.config.vlm_config.get_text_config(), "initializer_range", 0.02)
            nn.init.normal_(module.latent_query, std=std)
        else:
            ActionPriorPreTrainedModel._init_weights(self, module)


class VLAWithPriorForAction(ActionCheckpointMixin, VLAWithPriorPreTrainedModel):
    """A VLA whose action head is the Stage-1 prior's flow decoder, aligned to the prior's latent space.

    Besides weights and config, a checkpoint carries the flow sampler (``scheduler/``) and the per-embodiment
    action statistics (``action_normalizer.json``); ``save_pretrained`` / ``from_pretrained`` write and read them.
    The processor (``ActionPriorProcessor``: image processor, tokenizer, the same statistics) is saved beside it.

    Example:
        ```python
        >>> import modeling_actprior
        >>> from modeling_actprior import VLAWithPriorForAction
        >>> vla = VLAWithPriorForAction.from_prior("path/to/prior", vlm_config="tiny")
        >>> out = vla(**batch, step=global_step)          # out.loss, out.bc_loss, out.kd_loss, out.kd_weight
        >>> chunk = vla.predict_action(**inputs)           # (B, H, D_max) normalized
        ```
    """

    _flow_decoder = "action_head"  # for compile_flow

    def __init__(self, config: VLAWithPriorConfig):
        super().__init__(config)
        prior, d_text, d_z = config.prior_config, config.text_hidden_size, config.prior_config.latent_dim
        self.vlm = AutoModel.from_config(config.vlm_config)
        self.latent_query = nn.Parameter(torch.zeros(1, 1, d_text))
        self.latent_readout = nn.Linear(d_text, 2 * d_z)
        self.action_head = FlowMatchingActionDecoder(prior)
        self.teacher = ActionHistoryEncoder(prior)
        if config.history_token:
            self.history_encoder = ActionHistoryEncoder(prior)
            self.history_projection = nn.Linear(d_z, d_text)
        # Set by the training script each optimizer step when forward gets no `step`.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long), persistent=False)
        # Memo of teacher_is_history_encoder(): the encoders' tensor versions it was computed for, and the answer.
        self._teacher_check_key, self._teacher_check_result = None, False
        self.scheduler = default_scheduler(prior)
        self.normalizer: ActionNormalizer | None = None
        self.post_init()
        self._freeze()
        if config.lora_r > 0:
            self.apply_lora()

    def _freeze(self) -> None:
        self.teacher.requires_grad_(False)
        if self.config.history_token and self.config.freeze_history_encoder:
            self.history_encoder.requires_grad_(False)
        if self.config.vision_mode == "frozen":
            self.base_vlm.vision_tower.requires_grad_(False)

    def train(self, mode: bool = True):
        """Like ``nn.Module.train``, but the teacher (and a frozen history encoder) always stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.config.history_token and self.config.freeze_history_encoder:
            self.history_encoder.eval()
        return self

    @property
    def base_vlm(self) -> PreTrainedModel:
        """The VLM base model (``LlavaModel``, ``PaliGemmaModel``...), without any PEFT wrapper."""
        return self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_prior(
        cls,
        prior,
        vlm_config: str | dict | object = "tiny",
        vlm_family: str = "llava",
        baseline: str | None = None,
        vlm: str | os.PathLike | None = None,
        **config_overrides,
    ) -> VLAWithPriorForAction:
        """Build a VLA around a trained Stage-1 prior.

        The action head is the prior's decoder bit for bit (unless ``use_prior_decoder=False``), the teacher and
        the history-token encoder are the prior's encoder, and the prior's normalizer and scheduler are inherited.

        Args:
            prior: an ``ActionPriorModel`` or a path / Hub id of one.
            vlm_config: a preset name of ``VLAWithPriorConfig.from_preset`` (``"tiny"``, ``"small"``,
                ``"openvla-7b"``), a vision-language config, or a dict of one: a randomly initialized VLM.
            vlm_family: ``"llava"`` or ``"paligemma"`` when ``vlm_config`` is a preset name.
            baseline: a name of ``VLA_BASELINES`` (``"no_prior"``, ``"decoder_only"``, ``"kd_only"``...).
            vlm: a pretrained VLM instead (local folder or Hub id of a LLaVA or PaliGemma checkpoint, see
                ``pretrained_vlm``): its config and weights replace ``vlm_config``; build the matching processor
                with ``ActionPriorProcessor.from_vlm(vlm, model.config, model.normalizer)``. LoRA (``lora_r``) wraps
                the pretrained weights. ``config.base_vlm`` records where it came from.
            config_overrides: other ``VLAWithPriorConfig`` fields.
        """
        if isinstance(prior, (str, os.PathLike)):
            from .modeling_actprior import ActionPriorModel

            prior = ActionPriorModel.from_pretrained(prior)
        if not all(hasattr(prior, a) for a in ("encoder", "decoder", "config")):
            raise TypeError(f"from_prior needs an ActionPriorModel (or a path to one); got {type(prior).__name__}.")
        prior_fields = {k: v for k, v in prior.config.to_diff_dict().items()
                        if k not in ("auto_map", "architectures", "transformers_version", "model_type", "dtype")}
        prior_config = ActionPriorConfig(**prior_fields)
        lora_r = None
        if vlm is not None:
            from .configuration_actprior_vla import baseline_switches
            from .pretrained_vlm import load_vlm_config

            fields = {**baseline_switches(baseline), **config_overrides}
            lora_r = int(fields.pop("lora_r", 0))  # the adapters wrap the pretrained weights, loaded first
            config = VLAWithPriorConfig(vlm_config=load_vlm_config(vlm), prior_config=prior_config,
                                        base_vlm=str(vlm), **fields)
        elif isinstance(vlm_config, str):
            config = VLAWithPriorConfig.from_preset(vlm_config, vlm_family=vlm_family, baseline=baseline,
                                                    prior_config=prior_config, **config_overrides)
        else:
            from .configuration_actprior_vla import baseline_switches

            config = VLAWithPriorConfig(vlm_config=vlm_config, prior_config=prior_config,
                                        **{**baseline_switches(baseline), **config_overrides})
        model = cls(config)
        if vlm is not None:
            from .pretrained_vlm import load_vlm_base_model

            pretrained = load_vlm_base_model(vlm)
            missing, unexpected = model.vlm.load_state_dict(pretrained.state_dict(), strict=False)
            if missing or unexpected:
                raise ValueError(f"The weights of {vlm} do not fit its own config's base model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); the checkpoint is damaged or of another architecture.")
            del pretrained
            if lora_r:
                model.apply_lora(r=lora_r)
        encoder_state = prior.encoder.state_dict()
        model.teacher.load_state_dict(encoder_state)
        if config.history_token:
            model.history_encoder.load_state_dict(encoder_state)
        if config.use_prior_decoder:
            model.action_head.load_state_dict(prior.decoder.state_dict())
        model.scheduler = copy.deepcopy(prior.scheduler)
        model.normalizer = copy.deepcopy(getattr(prior, "normalizer", None))
        return model

    # ------------------------------------------------------------------------------------ LoRA
    def apply_lora(self, r: int | None = None, alpha: int | None = None, target_modules: list[str] | None = None,
                   vision: str | None = None, dropout: float | None = None) -> VLAWithPriorForAction:
        """Wrap the VLM with PEFT LoRA adapters on the language model (and, with ``vision="lora"``, on the vision
        tower). Arguments default to the config's ``lora_*`` / ``vision_mode`` fields, and are written back into
        the config, so ``save_pretrained`` / ``from_pretrained`` rebuild the same adapters. The multimodal
        projector stays trainable; the other VLM weights are frozen (``vision="full"`` trains the vision tower).
        """
        from peft import LoraConfig, get_peft_model

        if hasattr(self.vlm, "peft_config"):
            raise ValueError("This VLA already has LoRA adapters; merge_lora() first to add new ones.")
        c = self.config
        c.lora_r = int(r if r is not None else (c.lora_r or 16))
        c.lora_alpha = int(alpha if alpha is not None else c.lora_alpha)
        c.lora_dropout = float(dropout if dropout is not None else c.lora_dropout)
        c.lora_target_modules = list(target_modules or c.lora_target_modules or _LANGUAGE_LORA_TARGETS)
        c.vision_mode = vision or c.vision_mode
        c._check()
        pattern = rf"language_model\..*\.({'|'.join(c.lora_target_modules)})"
        if c.vision_mode == "lora":
            pattern = rf"({pattern})|(vision_tower\..*\.({'|'.join(_VISION_LORA_TARGETS)}))"
        keep = [n for n in ("multi_modal_projector",) if hasattr(self.base_vlm, n)]
        lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=pattern,
                          modules_to_save=keep or None)
        self.vlm = get_peft_model(self.vlm, lora)
        if c.vision_mode == "full":
            self.base_vlm.vision_tower.requires_grad_(True)
        return self

    def save_lora_adapters(self, save_directory: str | os.PathLike) -> None:
        """Write only the LoRA adapters (and the projector) with PEFT's ``save_pretrained``."""
        self._require_lora()
        self.vlm.save_pretrained(save_directory)

    def load_lora_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters written by ``save_lora_adapters`` into this model's (same-shaped) adapters."""
        from peft import load_peft_weights, set_peft_model_state_dict

        self._require_lora()
        result = set_peft_model_state_dict(self.vlm, load_peft_weights(str(directory), device=str(self.device)))
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise ValueError(f"Adapters in {directory} do not fit this model (unexpected {bad[:3]}...); check lora_r and targets.")

    def merge_lora(self) -> VLAWithPriorForAction:
        """Fold the adapters into the VLM weights (for export): a plain VLM again, ``config.lora_r = 0``."""
        self._require_lora()
        self.vlm = self.vlm.merge_and_unload()
        self.config.lora_r = 0
        return self

    def _require_lora(self) -> None:
        if not hasattr(self.vlm, "peft_config"):
            raise ValueError("This VLA has no LoRA adapters; call apply_lora(...) or build it with lora_r > 0.")

    # ------------------------------------------------------------------------------------ checks
    def _check_action_inputs(self, history, history_mask, dim_mask, actions=None, state=None, batch=None):
        check_action_inputs(self.config.prior_config, history, history_mask, dim_mask, actions, state=state, batch=batch)

    # ------------------------------------------------------------------------------------ VLM prefix
    def prefix_embeddings(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        history_posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VLM's input sequence: prompt embeddings with image features merged, then the history token (if
        ``config.history_token``), then the latent query.

        Args:
            input_ids: ``(B, L)`` left-padded prompt ids with the VLM's image placeholders (from the processor).
            pixel_values: ``(B, 3, S, S)`` images processed for the vision tower.
            attention_mask: ``(B, L)``, 1 for real tokens.
            history: ``(B, K', D_max)`` normalized, padded past actions; ``history_mask`` ``(B, K')`` bool.
            dim_mask: ``(B, D_max)`` bool; ``state``: ``(B, max_state_dim)`` standardized current state, or None.
            history_posterior: ``history_posterior(history, ...)`` when the caller already has it.
        Returns:
            ``(inputs_embeds (B, L + 1 [+ 1], text_hidden), attention_mask (B, L + 1 [+ 1]))``.
        """
        vlm, b = self.base_vlm, input_ids.shape[0]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        vocab = vlm.get_input_embeddings().num_embeddings
        image_slots = input_ids == self.config.image_token_id
        embeds = vlm.get_input_embeddings()(input_ids.masked_fill(input_ids >= vocab, 0))
        if pixel_values is not None:
            pooled = vlm.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
            feats = torch.cat(list(pooled), 0) if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1])
            if int(image_slots.sum()) != feats.shape[0]:
                raise ValueError(
                    f"input_ids hold {int(image_slots.sum())} image placeholder tokens (id {self.config.image_token_id}) "
                    f"but the images give {feats.shape[0]} features ({self.config.num_image_tokens} per image). Build "
                    "inputs with this model's ActionPriorProcessor."
                )
            embeds = embeds.masked_scatter(image_slots[..., None], feats.to(embeds.dtype))
        extra = [self.latent_query.expand(b, -1, -1).to(embeds.dtype)]
        if self.config.history_token:
            if history is None:
                raise ValueError(
                    "This VLA reads a history token (config.history_token=True) but got no history. Pass the past "
                    "actions (normalized, padded; zero steps with history_mask False at an episode start)."
                )
            token = self.history_token(history, history_mask, dim_mask, state, posterior=history_posterior)
            extra.insert(0, token[:, None].to(embeds.dtype))
        embeds = torch.cat([embeds, *extra], dim=1)
        extra_mask = attention_mask.new_ones(b, len(extra))
        if self.config.history_token and self.training and self.config.history_dropout > 0:
            # Hide the history token from a random share of samples (see config.history_dropout).
            keep = torch.rand(b, device=embeds.device) >= self.config.history_dropout
            extra_mask[:, 0] = keep.to(extra_mask.dtype)
        attention_mask = torch.cat([attention_mask, extra_mask], dim=1)
        return embeds, attention_mask

    def token_history_differs_from_teachers(self) -> bool:
        """Whether the history token reads another view of the past than the teacher (a lag always; noise or a
        time shift in training), so the teacher's posterior must be computed on its own."""
        c = self.config
        return c.history_lag > 0 or (self.training and (c.history_noise > 0 or c.history_shift > 0))

    def token_history(self, history: torch.Tensor, history_mask: torch.Tensor,
                      dim_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The past actions the history token reads: ``history`` ``(B, K', D_max)`` (normalized, padded, oldest first)
        without its ``history_lag`` most recent steps; in training also without a random ``U{0..history_shift}``
        more per sample and with ``history_noise`` on real steps and dimensions. Dropped steps become padding
        (zero, masked) at the front, so the window keeps its length. Returns ``(history, history_mask)``."""
        c = self.config
        b, k = history.shape[:2]
        drop = torch.full((b,), c.history_lag, dtype=torch.long, device=history.device)
        if self.training and c.history_shift > 0:
            drop = drop + torch.randint(0, c.history_shift + 1, (b,), device=history.device)
        if bool((drop > 0).any()):
            # Position j of the new window holds old step j - drop (an older one), or padding where that is < 0.
            src = torch.arange(k, device=history.device)[None, :] - drop[:, None]
            valid = src >= 0
            src = src.clamp_min(0)
            history = torch.gather(history, 1, src[..., None].expand(-1, -1, history.shape[-1])) * valid[..., None]
            history_mask = torch.gather(history_mask, 1, src) & valid
        if self.training and c.history_noise > 0:
            real = history_mask[..., None] & dim_mask[:, None, :]
            history = history + c.history_noise * torch.randn_like(history) * real
        return history, history_mask

    def history_posterior(self, history, history_mask=None, dim_mask=None, state=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The history encoder's ``q(z | a_<t)`` on the past actions the token reads (``token_history`` of
        ``(B, K', D_max)``): ``(mean, logvar)``, each ``(B, d_z)``. A frozen encoder runs without autograd."""
        b, k = history.shape[:2]
        history_mask = torch.ones(b, k, dtype=torch.bool, device=history.device) if history_mask is None else history_mask
        dim_mask = self._default_dim_mask(b, history.device) if dim_mask is None else dim_mask
        history, history_mask = self.token_history(history, history_mask, dim_mask)
        history = history.to(self.history_projection.weight.dtype)
        if self.config.freeze_history_encoder and torch.is_grad_enabled():
            with torch.no_grad():
                return self.history_encoder(history, history_mask, dim_mask, state)
        return self.history_encoder(history, history_mask, dim_mask, state)

    def history_token(self, history, history_mask=None, dim_mask=None, state=None, posterior=None) -> torch.Tensor:
        """Past actions ``(B, K', D_max)`` -> one token ``(B, text_hidden)``: the projected encoder latent mean (in
        training a draw from the posterior with ``history_latent="sample"``).
        ``posterior``: ``history_posterior(history, ...)`` when already computed."""
        if posterior is None:
            posterior = self.history_posterior(history, history_mask, dim_mask, state)
        mean, logvar = posterior
        if self.training and self.config.history_latent == "sample":
            mean = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.history_projection(mean)

    def teacher_is_history_encoder(self) -> bool:
        """Whether the teacher's ``p_prior(z | a_<t)`` equals the history encoder's posterior on the same window, so
        Stage-2 training can reuse the latter instead of running the teacher again.

        True only when it provably does: the history token is on with a frozen encoder, both encoders are in eval
        mode, read the history in the same dtype, and hold equal weights (as ``from_prior`` makes them: both are the
        prior's encoder). The weight comparison runs once and again only when a tensor of either encoder is replaced
        or modified in place (its storage or version counter changes), so loading other weights into one of them
        switches the reuse off. Sharded parameters (empty outside their forward) never count as equal.
        """
        c = self.config
        if not (c.history_token and c.freeze_history_encoder) or self.teacher.training or self.history_encoder.training:
            return False
        if self.history_projection.weight.dtype != self.action_head.out.weight.dtype:
            return False  # the two read the history cast to these dtypes
        mine = [*self.history_encoder.named_parameters(), *self.history_encoder.named_buffers()]
        theirs = [*self.teacher.named_parameters(), *self.teacher.named_buffers()]
        # Inference tensors keep no version counter: without one, compare every time.
        key = None if any(t.is_inference() for _, t in mine + theirs) else \
            tuple((n, t.data_ptr(), t._version) for n, t in mine + theirs)
        if key is None or key != self._teacher_check_key:
            self._teacher_check_key = key
            self._teacher_check_result = len(mine) == len(theirs) and all(
                na == nb and a.numel() > 0 and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                for (na, a), (nb, b) in zip(mine, theirs)
            )
        return self._teacher_check_result

    def encode(self, input_ids, pixel_values, attention_mask=None, history=None, history_mask=None, dim_mask=None,
               state=None, history_posterior=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One VLM forward -> ``(mean, logvar)`` of ``p_VLM(z | observation, instruction, history)``, each ``(B, d_z)``.
        ``history_posterior``: ``history_posterior(history, ...)`` when the caller already has it."""
        embeds, mask = self.prefix_embeddings(input_ids, pixel_values, attention_mask, history, history_mask,
                                              dim_mask, state, history_posterior)
        offset = _POSITION_OFFSET.get(self.config.vlm_config.model_type, 0)
        # Positions count real tokens only, so left padding never shifts a sample's positions.
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0) + offset
        hidden = self.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        stats = self.latent_readout(hidden[:, -1].to(self.latent_readout.weight.dtype)).float()
        mean, logvar = stats.chunk(2, dim=-1)
        pc = self.config.prior_config
        return mean, logvar.clamp(pc.logvar_min, pc.logvar_max)

    def _default_dim_mask(self, b, device) -> torch.Tensor:
        return torch.ones(b, self.config.prior_config.max_action_dim, dtype=torch.bool, device=device)

    # ------------------------------------------------------------------------------------ training
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        step: int | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> VLAWithPriorOutput | tuple:
        """Behaviour-cloning flow loss plus scheduled latent distillation for a batch of windows.

        Args:
            input_ids, pixel_values, attention_mask: the processor's outputs for images and instructions.
            history: ``(B, K', D_max)`` past actions, normalized, padded; ``history_mask`` ``(B, K')`` bool.
            actions: ``(B, H, D_max)`` future chunk, normalized, padded; ``action_mask`` ``(B, H)`` bool. Without
                actions only the latent is returned (no loss).
            dim_mask: ``(B, D_max)`` bool, True for the embodiment's real dimensions.
            state: ``(B, max_state_dim)`` standardized current state, or None.
            step: optimizer step for ``lambda(step)``; default ``self.training_step`` (set by the training script).
            noise: ``(B, H, D_max)`` optional fixed noise; ``timesteps``: ``(B,)`` optional fixed flow times.
            kwargs: other batch entries (``embodiment``, ``instruction``...) are accepted and ignored.
        """
        b, dev = input_ids.shape[0], input_ids.device
        dim_mask = self._default_dim_mask(b, dev) if dim_mask is None else dim_mask
        if history is not None and history_mask is None:
            history_mask = torch.ones(history.shape[:2], dtype=torch.bool, device=dev)
        self._check_action_inputs(history, history_mask, dim_mask, actions, state, b)
        posterior = None
        if self.config.history_token and history is not None:
            posterior = self.history_posterior(history, history_mask, dim_mask, state)
        mean, logvar = self.encode(input_ids, pixel_values, attention_mask, history, history_mask, dim_mask, state,
                                   history_posterior=posterior)
        if actions is None:
            out = VLAWithPriorOutput(latent_mean=mean, latent_logvar=logvar)
            return out if return_dict else out.to_tuple()

        z = mean
        if self.training and self.config.latent_conditioning == "sample":
            eps = torch.randn(mean.shape, generator=generator, device=dev, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * eps
        action_mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=dev) if action_mask is None else action_mask
        if noise is None:
            noise = torch.randn(actions.shape, generator=generator, device=dev, dtype=torch.float32).to(actions.dtype)
        if timesteps is None:
            timesteps = sample_flow_time(self.config.prior_config, b, dev, generator).to(actions.dtype)
        bc_loss, velocity, target = flow_matching_loss(self.action_head, self.scheduler, z, actions, action_mask,
                                                       dim_mask, noise, timesteps)
        head_dtype = self.action_head.out.weight.dtype

        lam = self.config.distill_lambda(int(self.training_step) if step is None else step)
        prior_mean = prior_logvar = None
        kd_loss = bc_loss.new_zeros(())
        if lam > 0:
            if history is None:
                raise ValueError("Latent distillation (lambda > 0) needs the window's history for the teacher.")
            if (posterior is not None and not self.token_history_differs_from_teachers()
                    and self.teacher_is_history_encoder()):
                # The frozen history encoder is the teacher, weight for weight, on the same history: its posterior is
                # the teacher's.
                prior_mean, prior_logvar = posterior[0].detach(), posterior[1].detach()
            else:
                with torch.no_grad():
                    prior_mean, prior_logvar = self.teacher(history.to(head_dtype), history_mask, dim_mask, state)
            kd_loss = self.distillation_loss(mean, logvar, prior_mean.float(), prior_logvar.float())
        loss = bc_loss + lam * kd_loss if lam > 0 else bc_loss
        shortcut = None
        if self.action_head.reads_step_size:
            shortcut = shortcut_consistency_loss(self.action_head, z, actions, action_mask, dim_mask, generator)
            loss = loss + self.config.prior_config.shortcut_weight * shortcut
        out = VLAWithPriorOutput(
            loss=loss, bc_loss=bc_loss, kd_loss=kd_loss, kd_weight=torch.tensor(lam, device=dev), shortcut_loss=shortcut,
            latent_mean=mean, latent_logvar=logvar, prior_mean=prior_mean, prior_logvar=prior_logvar,
            velocity=velocity, target_velocity=target, timesteps=timesteps,
        )
        return out if return_dict else out.to_tuple()

    def distillation_loss(self, mean, logvar, prior_mean, prior_logvar) -> torch.Tensor:
        """``kd_loss`` of ``p_VLM = N(mean, exp(logvar))`` against the teacher's ``p_prior``, all ``(B, d_z)``, mean
        over the batch: ``KL(p_VLM || p_prior)`` with the teacher's variances scaled by
        ``distill_teacher_temperature ** 2`` and floored at ``exp(distill_teacher_logvar_min)``, or with
        ``distill_match="mean"`` the squared distance of the means (both summed over ``d_z``)."""
        c = self.config
        if c.distill_match == "mean":
            return (mean - prior_mean).pow(2).sum(-1).mean()
        if c.distill_teacher_temperature != 1.0:
            prior_logvar = prior_logvar + 2.0 * math.log(c.distill_teacher_temperature)
        if c.distill_teacher_logvar_min is not None:
            prior_logvar = prior_logvar.clamp_min(c.distill_teacher_logvar_min)
        return gaussian_kl_between(mean, logvar, prior_mean, prior_logvar).mean()

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample_actions(
        self,
        z: torch.Tensor,
        dim_mask: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        scheduler: FlowMatchingActionScheduler | None = None,
        guidance: ChunkGuidance | None = None,
    ) -> torch.Tensor:
        """Integrate the action head's flow from noise to a chunk given latents ``z`` ``(B, d_z)``: the decoder's
        latent conditioning is computed once, then only the decoder runs per flow step. ``guidance``: real-time
        chunking toward the chunk being executed (``ChunkGuidance``).

        Returns ``(B, H, D_max)`` float32 normalized actions, zero in padded dimensions.
        """
        dim_mask = self._default_dim_mask(z.shape[0], z.device) if dim_mask is None else dim_mask
        return integrate_flow(self.action_head, scheduler or self.scheduler, z, dim_mask,
                              self.config.prior_config.chunk_size, num_inference_steps, generator, noise, guidance)

    @torch.no_grad()
    def predict_action(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        state: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        scheduler: FlowMatchingActionScheduler | None = None,
        guidance: ChunkGuidance | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The next chunk for processed observations: ONE VLM forward gives the latent mean, then only the action
        head runs inside the flow loop.

        Args: as ``forward`` (``kwargs`` takes other processor outputs and ignores them); ``guidance``: real-time
        chunking (``ChunkGuidance``, normalized units), as the pipeline builds it from ``previous_chunk``.
        Returns:
            ``(B, H, D_max)`` float32 normalized actions, zero in padded dimensions.
        """
        b, dev = input_ids.shape[0], input_ids.device
        dim_mask = self._default_dim_mask(b, dev) if dim_mask is None else dim_mask
        self._check_action_inputs(history, history_mask, dim_mask, state=state, batch=b)
        with torch.inference_mode():  # internal only: the chunk returned is an ordinary tensor
            mean, _ = self.encode(input_ids, pixel_values, attention_mask, history, history_mask, dim_mask, state)
        chunk = self.sample_actions(mean, dim_mask, num_inference_steps, generator, noise, scheduler, guidance)
        ensure_finite_actions(self, chunk, {"history": history, "state": state, "pixel_values": pixel_values})
        return chunk

    @torch.no_grad()
    def predict_raw_actions(
        self,
        processor,
        images,
        instruction: str | list[str],
        history,
        embodiment: str,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Raw observation -> the next chunk in the robot's own units, through ``processor`` (an
        ``ActionPriorProcessor``) and the checkpoint's normalizer.

        Args:
            images: one image (PIL or ``(H, W, 3)`` uint8) or a list of them.
            instruction: the task string (or one per image).
            history: ``(K', action_dim)`` (or a list of them) raw past actions, oldest first; ``K'`` may be 0.
            embodiment: a robot this checkpoint has statistics for.
        Returns:
            ``(H, action_dim)``, or ``(B, H, action_dim)`` for a list of images.
        """
        single = isinstance(instruction, str)
        inputs = processor(images=images, text=instruction, history=history if not single else [history],
                           embodiment=embodiment)
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        pv = inputs.get(PIXEL_VALUES)
        inputs[PIXEL_VALUES] = pv.to(self.base_vlm.dtype) if pv is not None else None
        chunk = self.predict_action(**inputs, generator=generator, num_inference_steps=num_inference_steps)
        normalizer = self.normalizer or processor.action_normalizer
        raw = normalizer.unnormalize(chunk.cpu(), embodiment)
        return raw[0] if single else raw

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def action_head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the action head (their learning rate is scaled by ``action_head_lr_multiplier``)."""
        return [p for p in self.action_head.parameters() if p.requires_grad]


__all__ = [
    "VLAWithPriorForAction",
    "VLAWithPriorOutput",
    "VLAWithPriorPreTrainedModel",
    "gaussian_kl_between",
]
