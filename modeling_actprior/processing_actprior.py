"""``ActionPriorProcessor``: everything between a robot's raw observation and ``VLAWithPriorForAction``.

It holds three things, saved beside the model and restored together by ``AutoProcessor.from_pretrained``:

* an image processor (``SiglipImageProcessorPil`` for the built-in presets: resize to the vision tower's size,
  scale to [-1, 1]; no torchvision needed);
* a tokenizer for the instruction (for random-init presets, a small byte-level BPE trained on the instructions
  with ``build_instruction_tokenizer``);
* the action normalizer (per-embodiment statistics, ``action_normalizer.json``).

Prompt layout: ``[image token] * num_image_tokens + [bos] + instruction + prompt_suffix``, the instruction truncated to
``max_text_length`` tokens, left-padded (the model appends the history token and the latent query after it, so the
query is always the last position). A processor built from a pretrained VLM (``from_vlm``) uses that VLM's tokenizer
and, where it has one, its chat template: the instruction becomes the user's turn, followed by the generation prompt,
with the template's image placeholder expanded to ``num_image_tokens``.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports only its
siblings, relatively.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from .action_space import ACTION_NORMALIZER_NAME, ActionNormalizer, check_finite
from .configuration_actprior_vla import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from .inputs import ATTENTION_MASK, DIM_MASK, HISTORY, HISTORY_MASK, INPUT_IDS, PIXEL_VALUES


def build_instruction_tokenizer(texts: Sequence[str], vocab_size: int = 512, image_token: str = IMAGE_TOKEN,
                                ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (instructions), for random-init VLMs.

    Special tokens get the first ids, in this order: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``image_token`` 3 (the
    ``image_token_id`` of the built-in presets). Padding is on the left. Byte-level, so any text encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, image_token]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)} (256 bytes + 4 special tokens); "
                         f"got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([str(t) for t in texts] or [""], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN, extra_special_tokens=[image_token], padding_side="left")


class ActionPriorProcessor(ProcessorMixin):
    """Images + instructions (+ raw past actions of an embodiment) -> ``VLAWithPriorForAction`` inputs.

    Args:
        image_processor: resizes/normalizes images to the vision tower's input.
        tokenizer: the VLM's tokenizer; must know ``image_token`` and have bos and pad tokens.
        action_normalizer (`ActionNormalizer`): per-embodiment action statistics.
        num_image_tokens (`int`): placeholders one image takes (``VLAWithPriorConfig.num_image_tokens``).
        image_token (`str`): the VLM's image placeholder token.
        history_length (`int`): ``K``; histories are right-aligned into ``K`` steps.
        max_text_length (`int`): instruction tokens kept.
        prompt_suffix (`str`): text after the instruction when there is no chat template (PaliGemma's ``"\n"``).
        chat_template (`str`, *optional*): the VLM's chat template (see the module docstring).
    """

    def __init__(self, image_processor=None, tokenizer=None, action_normalizer=None, num_image_tokens: int = 1,
                 image_token: str = IMAGE_TOKEN, history_length: int = 16, max_text_length: int = 64,
                 prompt_suffix: str = "", **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.prompt_suffix = str(prompt_suffix)
        if isinstance(action_normalizer, dict):
            action_normalizer = ActionNormalizer.from_dict(action_normalizer)
        self.action_normalizer = action_normalizer
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.history_length = int(history_length)
        self.max_text_length = int(max_text_length)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer does not know the image token {image_token!r}; add it as a special token.")
        if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer needs a bos and a pad token (the prompt starts with bos and is left-padded).")

    @classmethod
    def from_config(cls, config, action_normalizer: ActionNormalizer | None = None, tokenizer=None,
                    instructions: Sequence[str] | None = None) -> ActionPriorProcessor:
        """The processor for a ``VLAWithPriorConfig``: an image processor sized for its vision tower and, without
        ``tokenizer``, an instruction tokenizer trained on ``instructions`` within the VLM's vocabulary."""
        from transformers import SiglipImageProcessorPil

        vis = config.vlm_config.vision_config
        image_processor = SiglipImageProcessorPil(size={"height": vis.image_size, "width": vis.image_size})
        vocab = config.vlm_config.get_text_config().vocab_size
        if tokenizer is None:
            tokenizer = build_instruction_tokenizer(instructions or [""], vocab_size=min(vocab, 4096))
        if len(tokenizer) > vocab:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the VLM's vocabulary holds {vocab}.")
        processor = cls(image_processor, tokenizer, action_normalizer, num_image_tokens=config.num_image_tokens,
                        history_length=config.prior_config.history_length, max_text_length=config.max_text_length)
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer maps {processor.image_token!r} to id {processor.image_token_id} but the VLM expects "
                f"image_token_id={config.image_token_id}. Use the VLM's own tokenizer, or set image_token_index."
            )
        return processor

    @classmethod
    def from_vlm(cls, vlm, config, action_normalizer: ActionNormalizer | None = None, **hub_kwargs
                 ) -> ActionPriorProcessor:
        """The processor of a VLA built on the pretrained VLM ``vlm`` (local folder or Hub id; ``config``: the VLA's
        ``VLAWithPriorConfig``): the VLM's own image processor, tokenizer and chat template. A tokenizer without a
        pad token pads with its eos token (padding is masked out)."""
        from .pretrained_vlm import SUPPORTED_VLM_TYPES, load_vlm_processor

        vlm_processor = load_vlm_processor(vlm, **hub_kwargs)
        tokenizer = vlm_processor.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        image_token = getattr(vlm_processor, "image_token", None) or IMAGE_TOKEN
        template = getattr(vlm_processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        processor = cls(vlm_processor.image_processor, tokenizer, action_normalizer,
                        num_image_tokens=config.num_image_tokens, image_token=image_token,
                        history_length=config.prior_config.history_length, max_text_length=config.max_text_length,
                        prompt_suffix=SUPPORTED_VLM_TYPES.get(config.vlm_config.model_type, ""),
                        chat_template=template)
        if processor.image_token_id != config.image_token_id:
            raise ValueError(f"{vlm}: the tokenizer maps {image_token!r} to id {processor.image_token_id} but the VLM's "
                             f"config expects image_token_id={config.image_token_id}; the processor saved beside the "
                             "model is not this model's.")
        return processor

    # ------------------------------------------------------------------------------------ call
    def __call__(self, images=None, text: str | list[str] | None = None, history=None,
                 embodiment: str | list[str] | None = None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list (one per sample): PIL images or ``(H, W, 3)`` uint8 arrays.
            text: the instruction(s), one per image.
            history: raw past actions in the robot's units, oldest first: ``(K', action_dim)`` per sample (a list),
                or ``(B, K', action_dim)``; ``K' <= history_length``, 0 at an episode start.
            embodiment: the robot's name (one for all samples, or one per sample); needed with ``history``.
        Returns:
            ``BatchFeature`` with ``pixel_values (B, 3, S, S)``, ``input_ids (B, L)``, ``attention_mask (B, L)``
            and, with ``history``: ``history (B, K, D_max)`` normalized and padded, ``history_mask (B, K)``,
            ``dim_mask (B, D_max)``.
        """
        data = {}
        texts = [text] if isinstance(text, str) else list(text) if text is not None else None
        if images is not None:
            imgs = self._check_images(images)
            if texts is not None and len(texts) != len(imgs):
                raise ValueError(f"Got {len(imgs)} images but {len(texts)} instructions; give one instruction per image.")
            data[PIXEL_VALUES] = self.image_processor(imgs, return_tensors="pt")["pixel_values"]
        if texts is not None:
            data.update(self._tokenize(texts, with_images=images is not None))
        if history is not None:
            data.update(self.normalize_history(history, embodiment))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_images(self, images) -> list:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        out = []
        for i, img in enumerate(items):
            if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8:
                out.append(img)
            elif type(img).__module__.startswith("PIL."):
                out.append(img.convert("RGB"))
            else:
                what = (f"{type(img).__name__} of shape {tuple(img.shape)} and dtype {img.dtype}"
                        if hasattr(img, "shape") else type(img).__name__)
                hint = " Pick one camera: images[cam]." if isinstance(img, dict) else ""
                raise TypeError(f"Image {i}: expected a PIL image or an (H, W, 3) uint8 array; got {what}.{hint}")
            h, w = out[-1].shape[:2] if isinstance(out[-1], np.ndarray) else out[-1].size[::-1]
            if h == 0 or w == 0:
                raise ValueError(f"Image {i} is empty ({h}x{w} pixels): the camera returned no frame. Pass an RGB image "
                                 "of at least 1x1 pixels (the processor resizes it for the vision tower).")
        return out

    def _tokenize(self, texts: list[str], with_images: bool) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prefix = [self.image_token_id] * (self.num_image_tokens if with_images else 0) + [tok.bos_token_id]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Instruction {i} must be a string; got {type(t).__name__}.")
        words = tok(texts, add_special_tokens=False)["input_ids"]
        specials = {self.image_token_id, tok.bos_token_id, tok.pad_token_id}
        for i, w in enumerate(words):
            if specials & set(w):
                # e.g. "<image>" typed into an instruction: it would take an image feature's place in the sequence
                token = tok.convert_ids_to_tokens(next(x for x in w if x in specials))
                raise ValueError(f"Instruction {i} ({texts[i]!r}) contains the special token {token!r}, which marks "
                                 "where image features or padding go; remove it from the instruction.")
        words = [w[: self.max_text_length] for w in words]
        if getattr(self, "chat_template", None):
            rows = [self._chat_prompt(tok.decode(w), with_images) for w in words]
        else:
            suffix = tok(self.prompt_suffix, add_special_tokens=False)["input_ids"] if self.prompt_suffix else []
            rows = [prefix + w + suffix for w in words]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last real token sits at the last position
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        return {INPUT_IDS: ids, ATTENTION_MASK: mask}

    def _chat_prompt(self, instruction: str, with_images: bool) -> list[int]:
        """Token ids of the chat template's user turn (image, then the instruction) and generation prompt, the image
        placeholder expanded to ``num_image_tokens``, starting with bos."""
        content = ([{"type": "image"}] if with_images else []) + [{"type": "text", "text": instruction}]
        text = self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        slots = [j for j, x in enumerate(ids) if x == self.image_token_id]
        if with_images and len(slots) != 1:
            raise ValueError(f"The chat template renders {len(slots)} image placeholders ({self.image_token!r}) for one "
                             "image; it must render exactly one.")
        if slots:
            ids = ids[: slots[0]] + [self.image_token_id] * self.num_image_tokens + ids[slots[0] + 1:]
        bos = self.tokenizer.bos_token_id
        return ids if ids and ids[0] == bos else [bos] + ids

    def normalize_history(self, history, embodiment: str | list[str] | None) -> dict[str, torch.Tensor]:
        """Raw past actions -> ``history (B, K, D_max)`` normalized, right-aligned, ``history_mask (B, K)``,
        ``dim_mask (B, D_max)``."""
        if self.action_normalizer is None:
            raise ValueError("This processor has no action normalizer, so it cannot read raw actions; attach one.")
        if embodiment is None:
            raise ValueError(f"Raw history needs its embodiment; this processor knows: "
                             f"{', '.join(self.action_normalizer.embodiment_names)}.")
        rows = list(history) if isinstance(history, (list, tuple)) or getattr(history, "ndim", 0) == 3 else [history]
        names = [embodiment] * len(rows) if isinstance(embodiment, str) else list(embodiment)
        if len(names) != len(rows):
            raise ValueError(f"Got {len(rows)} histories but {len(names)} embodiments.")
        norm, k = self.action_normalizer, self.history_length
        hist = torch.zeros(len(rows), k, norm.max_action_dim)
        mask = torch.zeros(len(rows), k, dtype=torch.bool)
        dims = torch.zeros(len(rows), norm.max_action_dim, dtype=torch.bool)
        for i, (h, name) in enumerate(zip(rows, names)):
            spec = norm.spec(name)  # unknown embodiment: an error listing the known ones
            h = h.detach().cpu().float().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.float32)
            h = h.reshape(0, spec.action_dim) if h.size == 0 else h
            if h.ndim != 2 or h.shape[-1] != spec.action_dim:
                raise ValueError(
                    f"History {i} for {name!r} must be (steps, {spec.action_dim}) raw actions "
                    f"({', '.join(spec.action_names)}); got shape {tuple(h.shape)}."
                )
            if h.shape[0] > k:
                raise ValueError(f"History {i} has {h.shape[0]} steps; this model reads history_length={k}. "
                                 f"Pass the last {k} actions.")
            check_finite(h, f"history {i}")
            dims[i] = norm.dim_mask(name)
            if h.shape[0]:
                hist[i, k - h.shape[0]:] = norm.normalize(h, name)[0]
                mask[i, k - h.shape[0]:] = True
        return {HISTORY: hist, HISTORY_MASK: mask, DIM_MASK: dims}

    @property
    def model_input_names(self) -> list[str]:
        return [PIXEL_VALUES, INPUT_IDS, ATTENTION_MASK, HISTORY, HISTORY_MASK, DIM_MASK]

    # ------------------------------------------------------------------------------------ hub I/O
    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("action_normalizer", None)  # saved as action_normalizer.json, shared with the model
        out.pop("image_token_id", None)
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self.action_normalizer is not None:
            files.append(self.action_normalizer.save_pretrained(save_directory))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "processor_config.json")):
                raise FileNotFoundError(f"{path} is not a complete ActionPriorProcessor folder: processor_config.json is "
                                        "missing. Copy the whole final/ folder, or re-save the processor with "
                                        "save_pretrained.")
        try:
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"A processor file in {path} cannot be read ({type(e).__name__}: {e}): tokenizer.json or a "
                             "config file is truncated or damaged. Copy the checkpoint again, or re-save the processor "
                             "with save_pretrained.") from None
        if getattr(processor, "chat_template", None) is None and getattr(processor.tokenizer, "chat_template", None):
            # transformers hands chat_template.jinja to the tokenizer on loading; the prompt is built here.
            processor.chat_template = processor.tokenizer.chat_template
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, ACTION_NORMALIZER_NAME)):
                processor.action_normalizer = ActionNormalizer.from_pretrained(path)
        else:
            from transformers.utils import cached_file

            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            found = cached_file(path, ACTION_NORMALIZER_NAME, _raise_exceptions_for_missing_entries=False, **hub)
            if found:
                processor.action_normalizer = ActionNormalizer.from_pretrained(found)
        return processor


__all__ = ["ActionPriorProcessor", "build_instruction_tokenizer"]
