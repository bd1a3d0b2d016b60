import json
import os
import re

import numpy as np
import pytest
import torch
from synthetic import smooth_episodes

import modeling_actprior as ap
from modeling_actprior import viz
from modeling_actprior.cli import main as cli_main
from modeling_actprior.data import fit_normalizer, load_lerobot_dataset, split_episodes, write_lerobot_dataset
from modeling_actprior.training import stage2 as train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = ("reach the goal", "push the block")
SEED, VAL_FRACTION = 3, 0.5  # held-out episodes [2, 3] of 4: one of each task per robot


def _write(root, name, n_episodes, length, seed):
    spec = ap.get_embodiment(name)
    path = str(root / name)
    write_lerobot_dataset(path, smooth_episodes(spec.action_dim, n_episodes, length, seed, images=16, tasks=TASKS),
                          spec, fps=spec.fps, camera_names=("front",), image_size=16)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step LoRA Stage-2 run on two robots x two tasks, checkpoints at steps 2 and 4, lambda = 0 from step 3."""
    root = tmp_path_factory.mktemp("viz")
    demos = [_write(root / "demos", name, 4, 20, i) for i, name in enumerate(("sawyer", "xarm6"))]
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    prior.normalizer = fit_normalizer([load_lerobot_dataset(d) for d in demos], prior.config.max_action_dim)
    prior.save_pretrained(root / "prior")
    train_stage2.main(["--dataset", str(root / "demos"), "--prior", str(root / "prior"), "--output_dir",
                       str(root / "run"), "--max_steps", "4", "--checkpoint_every", "2", "--lora_r", "4",
                       "--distill_hold_steps", "1", "--distill_decay_steps", "2", "--model_preset", "tiny",
                       "--batch_size", "4", "--log_every", "2", "--eval_every", "0", "--eval_windows", "4",
                       "--no_progress", "--seed", str(SEED), "--val_fraction", str(VAL_FRACTION)])
    return {"root": root, "run": str(root / "run"), "demos": str(root / "demos"), "prior": str(root / "prior")}


def test_matrix_groups_and_checkpoint_curve_are_drawn_for_a_run(run, tmp_path, capsys):
    out = tmp_path / "viz"
    assert cli_main(["viz-latents", "--model", run["run"], "--dataset", run["demos"], "--out", str(out),
                     "--windows", "24", "--batch-size", "7", "--no-progress"]) == 0
    assert "step       4 (λ 0)" in capsys.readouterr().out
    assert {"cosine_matrix.png", "cosine_per_task.png", "cosine_per_embodiment.png", "alignment_over_training.png",
            "latent_alignment.json", "index.html"} <= set(os.listdir(out))

    page = (out / "index.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) == 4
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page

    report = json.loads((out / "latent_alignment.json").read_text())
    w = report["windows"]
    assert w["count"] == 24 and w["held_out"] and len(report["cosine_matrix"]) == 24
    assert all(len(row) == 24 for row in report["cosine_matrix"])
    # Sorted by embodiment, then task; balanced: 6 windows in each of the 2 x 2 groups; held-out episodes only.
    keys = list(zip(w["embodiment"], w["task"]))
    assert keys == sorted(keys)
    assert [(g["embodiment"], g["task"], g["windows"]) for g in report["groups"]] == [
        (e, t, 6) for e in ("sawyer", "xarm6") for t in sorted(TASKS)]
    assert set(w["episode"]) <= set(split_episodes(4, VAL_FRACTION, SEED)[1])
    assert report["per_task"]["labels"] == sorted(TASKS) and np.shape(report["per_task"]["matrix"]) == (2, 2)
    assert report["per_embodiment"]["labels"] == ["sawyer", "xarm6"]
    cos = np.array(report["cosine_matrix"])
    assert report["per_embodiment"]["matrix"][0][1] == pytest.approx(cos[:12, 12:].mean(), abs=1e-4)
    assert report["final"]["diagonal_mean"] == pytest.approx(np.mean(report["diagonal"]), abs=1e-5)

    # lambda read from the config at each checkpoint's step; hold 1 + decay 2 -> 0 from step 3.
    assert [(c["step"], c["lambda"]) for c in report["checkpoints"]] == [(2, 0.5), (4, 0.0)]
    assert report["distillation"]["zero_step"] == 3
    # The last checkpoint holds the PEFT-wrapped VLA, final/ the merged one: the same latents.
    last = report["checkpoints"][-1]
    for k in ("diagonal_mean", "off_diagonal_mean", "mean_kl"):
        assert last[k] == pytest.approx(report["final"][k], abs=1e-4)


def test_a_readout_equal_to_the_teacher_gives_a_unit_diagonal(run, tmp_path, monkeypatch):
    def teacher_as_readout(self, input_ids, pixel_values, attention_mask=None, history=None, history_mask=None,
                           dim_mask=None, state=None):
        return self.teacher(history, history_mask, dim_mask, state)

    monkeypatch.setattr(ap.VLAWithPriorForAction, "encode", teacher_as_readout)
    final = os.path.join(run["run"], "final")
    report = viz.visualize_latents(final, [run["demos"]], str(tmp_path / "viz"), num_windows=16, seed=1,
                                   progress=False)
    cos = np.array(report["cosine_matrix"])
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-4)
    np.testing.assert_allclose(cos, cos.T, atol=1e-4)  # rows and columns are the same windows, in the same order
    assert report["final"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["final"]["off_diagonal_mean"] < 0.999
    # A model folder alone: no checkpoints, so (b) is skipped, and said so.
    assert report["checkpoints"] == [] and "skipped" in report["notes"][0]
    assert not (tmp_path / "viz" / "alignment_over_training.png").exists()
    assert report["split"] == {"val_fraction": viz.DEFAULT_VAL_FRACTION, "seed": viz.DEFAULT_SPLIT_SEED}


def test_cosine_statistics_of_known_vectors():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[0.5, np.sqrt(3) / 2], [0.0, -1.0], [1.0, 1.0]])
    cos = viz.cosine_matrix(a, b)
    np.testing.assert_allclose(np.diag(cos), [0.5, -1.0, 1.0])
    assert cos[0, 1] == pytest.approx(0.0) and cos[1, 0] == pytest.approx(np.sqrt(3) / 2)
    names, blocks = viz.block_means(cos, ["y", "x", "y"])
    assert names == ["x", "y"] and blocks[1, 1] == pytest.approx(cos[np.ix_([0, 2], [0, 2])].mean())
    assert viz.allocate([3, 10, 10], 12) == [3, 5, 4] and viz.allocate([2, 2], 10) == [2, 2]


def test_wrong_inputs_fail_with_what_to_pass_instead(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        viz.visualize_latents(str(tmp_path / "empty"), [run["demos"]], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="Stage-1 prior"):
        viz.visualize_latents(run["prior"], [run["demos"]], str(tmp_path / "o"))
    other = _write(tmp_path, "kuka_iiwa", 2, 10, 0)
    with pytest.raises(ap.UnknownEmbodimentError, match="'kuka_iiwa'.*only for: sawyer, xarm6"):
        viz.visualize_latents(run["run"], [other], str(tmp_path / "o"))
    assert cli_main(["viz-latents", "--model", str(tmp_path / "nope"), "--dataset", run["demos"], "--out",
                     str(tmp_path / "o")]) == 2
    assert "error: --model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_input_sensitivity_measures_what_the_chunk_depends_on(run):
    from modeling_actprior.study import input_sensitivity

    final, demos = os.path.join(run["run"], "final"), os.path.join(run["demos"], "sawyer")
    a = input_sensitivity(final, demos, windows=12)
    assert a == input_sensitivity(final, demos, windows=12)  # fixed windows and noise
    assert a["windows"] == 12 and a["mse_to_truth"] > 0
    # This VLA reads both the image and the history token, so swapping either changes its chunks.
    assert a["change_when_image_swapped"] > 0 and a["change_when_history_swapped"] > 0
