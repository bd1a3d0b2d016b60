import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_corpus
from transformers import AutoModel, AutoProcessor

import modeling_actprior as ap
from modeling_actprior.data import fit_normalizer, load_lerobot_dataset
from modeling_actprior.training import loop as training_loop
from modeling_actprior.training import stage2 as train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--model_preset", "tiny", "--batch_size", "4", "--log_every", "2", "--eval_every", "2", "--no_progress",
        "--eval_windows", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two robots, 4 episodes of 20 frames each, with 16-px camera images."""
    root = tmp_path_factory.mktemp("demos")
    make_corpus(root, n_episodes=4, length=20, images=16)
    return str(root)


def _save_prior(path, datasets):
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    prior.normalizer = fit_normalizer([load_lerobot_dataset(d) for d in datasets], prior.config.max_action_dim)
    prior.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prior_dir(corpus, tmp_path_factory):
    return _save_prior(tmp_path_factory.mktemp("prior") / "final",
                       [os.path.join(corpus, "sawyer"), os.path.join(corpus, "xarm6")])


def test_tiny_run_goes_from_a_prior_to_a_loadable_vla_checkpoint(corpus, prior_dir, tmp_path):
    out = tmp_path / "run"
    result = train_stage2.main(["--dataset", corpus, "--prior", prior_dir, "--output_dir", str(out), "--max_steps", "4",
                                "--checkpoint_every", "2", "--lora_r", "4", "--distill_hold_steps", "1",
                                "--distill_decay_steps", "2", *TINY])
    final = out / "final"
    assert result["step"] == 4 and not result["interrupted"]
    assert {"model.safetensors", "config.json", "action_normalizer.json", "scheduler", "README.md", "loss_curve.png",
            "eval_results.json", "modeling_actprior_vla.py", "processing_actprior.py", "processor_config.json",
            "tokenizer.json", "lora_adapters"} <= set(os.listdir(final))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000004"]

    vla = AutoModel.from_pretrained(final)
    assert type(vla) is ap.VLAWithPriorForAction and vla.config.lora_r == 0  # adapters merged for export
    assert vla.normalizer.embodiment_names == ["sawyer", "xarm6"]
    processor = AutoProcessor.from_pretrained(final)
    chunk = vla.predict_raw_actions(processor, np.zeros((16, 16, 3), np.uint8), "reach the goal", np.zeros((3, 7)),
                                    "xarm6", generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (8, 7) and torch.isfinite(chunk).all()

    logged = json.loads((final / "eval_results.json").read_text())
    hist = logged["history"]
    assert all({"loss", "bc_loss", "kd_loss", "kd_weight", "lr", "val_bc_loss"} <= set(h) for h in hist)
    assert hist[0]["kd_weight"] == 1.0 and hist[-1]["kd_weight"] == pytest.approx(0.25)  # mean of lambda(2), lambda(3)
    assert set(logged["evaluation"]) == {"sawyer", "xarm6"}
    card = (final / "README.md").read_text()
    assert "pipeline_tag: robotics" in card and "| use_prior_decoder | True |" in card and "LoRA r=4" in card


def test_baseline_switches_reach_the_saved_config(corpus, prior_dir, tmp_path):
    out = tmp_path / "run"
    train_stage2.main(["--dataset", corpus, "--prior", prior_dir, "--output_dir", str(out), "--max_steps", "1",
                       "--baseline", "no_prior", "--vlm_family", "paligemma", *TINY])
    cfg = ap.VLAWithPriorConfig.from_pretrained(out / "final")
    assert (cfg.use_prior_decoder, cfg.distill_weight, cfg.history_token) == (False, 0.0, False)
    assert cfg.vlm_config.model_type == "paligemma"
    hist = json.loads((out / "final" / "eval_results.json").read_text())["history"]
    assert hist[-1]["kd_loss"] == 0.0 and hist[-1]["kd_weight"] == 0.0


def test_resume_after_preemption_reaches_the_same_weights_as_an_uninterrupted_run(corpus, prior_dir, tmp_path,
                                                                                   monkeypatch):
    args = ["--dataset", corpus, "--prior", prior_dir, "--max_steps", "4", "--checkpoint_every", "10",
            "--distill_hold_steps", "2", "--distill_decay_steps", "2", "--val_fraction", "0", *TINY]
    train_stage2.main([*args, "--output_dir", str(tmp_path / "full")])

    class PreemptedAtStep2(training_loop.PreemptionGuard):
        """SIGTERM arrives during step 2: the loop checks `requested` once per step."""

        checks = 0

        @property
        def requested(self):
            PreemptedAtStep2.checks += 1
            return PreemptedAtStep2.checks == 2

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(training_loop, "PreemptionGuard", PreemptedAtStep2)  # the loop both stages run
    cut = tmp_path / "cut"
    first = train_stage2.main([*args, "--output_dir", str(cut)])
    assert first["interrupted"] and first["step"] == 2 and not (cut / "final").exists()
    monkeypatch.undo()
    train_stage2.main([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"])
    a, b = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist_a = json.loads((tmp_path / "full" / "final" / "eval_results.json").read_text())["history"]
    hist_b = json.loads((cut / "final" / "eval_results.json").read_text())["history"]
    assert [h["kd_weight"] for h in hist_a] == [h["kd_weight"] for h in hist_b]


def test_missing_prior_fails_early_with_how_to_make_one(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_stage1.py"):
        train_stage2.main(["--dataset", corpus, "--prior", str(tmp_path / "nope"), "--output_dir",
                           str(tmp_path / "o"), *TINY])
    with pytest.raises(ValueError, match="--prior is required"):
        train_stage2.main(["--dataset", corpus, "--output_dir", str(tmp_path / "o"), *TINY])
    assert not (tmp_path / "o").exists()


def test_prior_without_statistics_for_the_datasets_robot_fails_early(corpus, tmp_path):
    sawyer_only = _save_prior(tmp_path / "prior", [os.path.join(corpus, "sawyer")])
    with pytest.raises(ap.UnknownEmbodimentError, match="'xarm6'.*only for: sawyer"):
        train_stage2.main(["--dataset", corpus, "--prior", sawyer_only, "--output_dir", str(tmp_path / "o"), *TINY])
    assert not (tmp_path / "o").exists()


def test_existing_checkpoints_are_kept_unless_overwrite_is_asked(corpus, prior_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", corpus, "--prior", prior_dir, "--output_dir", str(out), "--max_steps", "1", "--val_fraction", "0",
            *TINY]
    train_stage2.main(args)
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        train_stage2.main(args)
    assert train_stage2.main([*args, "--overwrite_output_dir"])["step"] == 1
