"""Stage 2 from a pretrained VLM: tiny LLaVA and PaliGemma checkpoints saved with their processors, loaded by
``from_prior(prior, vlm=...)`` and ``train_stage2.py --vlm_name_or_path``."""

import os

import numpy as np
import pytest
import torch
from synthetic import make_corpus, random_prior
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    LlamaConfig,
    LlamaModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)

import modeling_actprior as ap
from modeling_actprior.configuration_actprior_vla import VLA_PRESETS, _vlm
from modeling_actprior.processing_actprior import build_instruction_tokenizer
from modeling_actprior.training import stage2 as train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAVA_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _save_vlm(root, family):
    """A tiny pretrained-looking VLM of ``family`` with its processor, as a user's folder would hold it."""
    vision, text, token_id, _ = VLA_PRESETS["tiny"]
    config = AutoConfig.for_model(**_vlm(family, dict(vision), dict(text), token_id))
    torch.manual_seed(7)
    model = (LlavaForConditionalGeneration if family == "llava" else PaliGemmaForConditionalGeneration)(config)
    with torch.no_grad():  # weights no initializer would give: a loader that re-initializes cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = os.path.join(root, family)
    model.save_pretrained(folder)
    tokenizer = build_instruction_tokenizer(["open the drawer", "reach the goal", "push the block"])
    image_processor = SiglipImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]})
    if family == "llava":
        processor = LlavaProcessor(image_processor, tokenizer, patch_size=vision["patch_size"],
                                   chat_template=LLAVA_TEMPLATE)
    else:
        processor = PaliGemmaProcessor(image_processor, tokenizer)
    processor.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlms"))
    return {family: _save_vlm(root, family) for family in ("llava", "paligemma")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    make_corpus(root, n_episodes=4, length=20, images=16)
    return str(root)


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_from_prior_loads_the_pretrained_vlm_bit_for_bit(vlms, family):
    folder, saved = vlms[family]
    prior = random_prior(history_length=4)
    vla = ap.VLAWithPriorForAction.from_prior(prior, vlm=folder)
    assert vla.config.base_vlm == folder and vla.config.vlm_config.model_type == family
    reference = saved.model.state_dict()
    loaded = vla.vlm.state_dict()
    assert set(loaded) == set(reference)
    for k, v in reference.items():
        assert torch.equal(loaded[k], v), k
    # The action side is still the prior's.
    for k, v in prior.decoder.state_dict().items():
        assert torch.equal(vla.action_head.state_dict()[k], v), k

    processor = ap.ActionPriorProcessor.from_vlm(folder, vla.config, vla.normalizer)
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(folder).tokenizer.get_vocab()
    feats = processor(images=[np.zeros((20, 20, 3), np.uint8)], text=["open the drawer"],
                      history=[np.zeros((2, 4), np.float32)], embodiment="sawyer")
    ids = feats["input_ids"][0].tolist()
    assert ids.count(vla.config.image_token_id) == vla.config.num_image_tokens
    if family == "llava":  # the chat template frames the instruction
        text = processor.tokenizer.decode([i for i in ids if i != vla.config.image_token_id])
        assert "USER:" in text and text.rstrip().endswith("ASSISTANT:") and "open the drawer" in text
    else:  # PaliGemma's layout: image tokens, bos, the instruction, a newline
        assert processor.tokenizer.decode(ids[-1:]) == "\n"
    with torch.no_grad():
        chunk = vla.eval().predict_action(**feats)
    assert chunk.shape == (1, prior.config.chunk_size, prior.config.max_action_dim) and torch.isfinite(chunk).all()


def test_lora_wraps_the_pretrained_weights(vlms):
    folder, saved = vlms["llava"]
    vla = ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), vlm=folder, lora_r=4)
    assert vla.config.lora_r == 4 and hasattr(vla.vlm, "peft_config")
    vla.merge_lora()  # adapters start at zero: merging gives the pretrained weights back
    for k, v in saved.model.state_dict().items():
        assert torch.equal(vla.vlm.state_dict()[k], v), k


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_train_stage2_from_a_pretrained_vlm_trains_saves_and_loads(vlms, corpus, tmp_path, family):
    folder, _ = vlms[family]
    prior_dir = tmp_path / "prior"
    from modeling_actprior.data import fit_normalizer, load_lerobot_dataset

    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    prior.normalizer = fit_normalizer([load_lerobot_dataset(os.path.join(corpus, r)) for r in ("sawyer", "xarm6")],
                                      prior.config.max_action_dim)
    prior.save_pretrained(prior_dir)
    out = tmp_path / "run"
    train_stage2.main(["--dataset", corpus, "--prior", str(prior_dir), "--output_dir", str(out), "--max_steps", "2",
                       "--vlm_name_or_path", folder, "--batch_size", "4", "--log_every", "1", "--no_progress",
                       "--eval_every", "0", "--eval_windows", "4", "--seed", "0"])
    final = out / "final"
    vla = AutoModel.from_pretrained(final)
    assert vla.config.base_vlm == folder and vla.config.vlm_config.model_type == family
    processor = AutoProcessor.from_pretrained(final)
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(folder).tokenizer.get_vocab()
    assert bool(processor.chat_template) == (family == "llava")
    assert processor.prompt_suffix == ("\n" if family == "paligemma" else "")
    assert "pretrained VLM" in (final / "README.md").read_text()
    from transformers import pipeline

    robot = pipeline("robot-action", model=str(final), device="cpu")
    out = robot(np.zeros((16, 16, 3), np.uint8), instruction="open the drawer", history=np.zeros((1, 4), np.float32),
                embodiment="sawyer", seed=0)
    assert out["actions"].shape == (8, 4) and np.isfinite(out["actions"]).all()


def test_a_wrong_path_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="No VLM at .*does not exist"):
        ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), vlm=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), vlm=str(tmp_path / "empty"))


def test_a_model_that_is_not_a_vlm_is_refused(tmp_path):
    LlamaModel(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=64)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' model, not a vision-language model.*llava, paligemma"):
        ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), vlm=str(tmp_path / "llama"))


def test_a_vlm_saved_without_its_image_processor_is_refused(vlms, tmp_path):
    folder, saved = vlms["llava"]
    bare = tmp_path / "bare"
    saved.save_pretrained(bare)
    AutoProcessor.from_pretrained(folder).tokenizer.save_pretrained(bare)  # the tokenizer only
    vla = ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), vlm=str(bare))
    with pytest.raises(ValueError, match="image processor"):
        ap.ActionPriorProcessor.from_vlm(str(bare), vla.config, vla.normalizer)
