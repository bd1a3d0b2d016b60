"""Stage 2 from a pretrained vision-language model: find, check and load a VLM and its processor.

``VLAWithPriorForAction.from_prior(prior, vlm="org/llava-model")`` and ``train_stage2.py --vlm_name_or_path`` come
here. A VLM is a local folder or a Hub id holding a transformers checkpoint of a supported family (``config.json``
with a ``vision_config``) and its processor (image processor + tokenizer, and the chat template where the family
has one). The VLA keeps the base model (``LlavaModel``, ``PaliGemmaModel``): the language-model head of a
``...ForConditionalGeneration`` checkpoint is not used (the latent query's readout replaces it).
"""

from __future__ import annotations

import os

#: ``model_type`` of the VLM families whose base model, image features and processor we support, with how each one
#: lays out its prompt when its processor has no chat template (what follows the instruction).
SUPPORTED_VLM_TYPES = {"llava": "", "paligemma": "\n"}

_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def _supported() -> str:
    return ", ".join(sorted(SUPPORTED_VLM_TYPES))


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``org/name``): absolute, relative with ``.``/``~``, or more than one ``/``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.rstrip("/").count("/") > 1


def load_vlm_config(name_or_path: str | os.PathLike, **hub_kwargs):
    """The VLM's transformers config, or a ValueError / FileNotFoundError that says what is supported."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"{name} holds no config.json: it is not a transformers checkpoint. Pass the folder "
                                f"that save_pretrained wrote for a VLM ({_supported()}), or a Hub id.")
    if not os.path.isdir(name) and _looks_local(name):
        raise FileNotFoundError(f"No VLM at {name}: the folder does not exist. Pass a local folder written by "
                                f"save_pretrained or a Hub id of a {_supported()} model.")
    try:
        config = AutoConfig.from_pretrained(name, **{k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS})
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read a VLM config from {name!r} ({type(e).__name__}: {e}). Pass a local folder or a "
                         f"Hub id of a {_supported()} model.") from None
    model_type = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is None or not hasattr(config, "get_text_config"):
        raise ValueError(f"{name} is a {model_type!r} model, not a vision-language model (its config has no "
                         f"vision_config). Stage 2 starts from a VLM of these families: {_supported()}.")
    if model_type not in SUPPORTED_VLM_TYPES:
        raise ValueError(f"{name} is a {model_type!r} VLM; Stage 2 supports {_supported()} (their base models, image "
                         "features and processors are what the VLA reads). Convert the model, or use a preset.")
    return config


def load_vlm_processor(name_or_path: str | os.PathLike, **hub_kwargs):
    """The VLM's own processor (image processor, tokenizer, chat template); a clear error when it has no image
    processor (a family whose processor needs extra binaries, or a folder saved without it)."""
    from transformers import AutoProcessor

    name = str(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(name, **{k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS})
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise ValueError(f"{name} has no usable processor ({type(e).__name__}: {e}). A VLM checkpoint for Stage 2 "
                         "needs its processor saved beside it (processor.save_pretrained(folder)): an image processor "
                         f"and a tokenizer, as the {_supported()} families ship them.") from None
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        missing = " and ".join(n for n, v in (("an image processor", image_processor), ("a tokenizer", tokenizer))
                               if v is None)
        raise ValueError(f"{name}: the processor found ({type(processor).__name__}) has no {missing}. Stage 2 needs the "
                         f"VLM's image processor and tokenizer ({_supported()} processors have both); save the full "
                         "processor beside the model.")
    return processor


def load_vlm_base_model(name_or_path: str | os.PathLike, **hub_kwargs):
    """The VLM's base model (no language-model head), with its pretrained weights."""
    from transformers import AutoModel

    name = str(name_or_path)
    return AutoModel.from_pretrained(name, **{k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS})


__all__ = ["SUPPORTED_VLM_TYPES", "load_vlm_base_model", "load_vlm_config", "load_vlm_processor"]
