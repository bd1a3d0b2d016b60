"""Second reliability pass: what a hostile or unlucky user broke on the earlier main, each pinned by the behaviour
that must hold now (no deleted user files, no model of NaN, no NaN actions, no training through NaN, no empty
images, no silently mixed resumes, no out-of-range options, no checksum bypass)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic import make_corpus, random_prior

import modeling_actprior as ap
from modeling_actprior.data.lerobot import STATS_PATH, check_replaceable
from modeling_actprior.training import stage1 as train_stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--model_preset", "tiny", "--chunk_size", "8", "--history_length", "4", "--batch_size", "8",
        "--log_every", "2", "--eval_every", "0", "--no_progress", "--eval_windows", "16", "--seed", "3"]


def _cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "modeling_actprior.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _tiny_vla_and_processor():
    vla = ap.VLAWithPriorForAction.from_prior(random_prior(history_length=4), "tiny")
    return vla, ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["open the drawer"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root, embodiments=("sawyer",), n_episodes=6, length=30)[0]


# --------------------------------------------------------------------------------------------- 1. user files
def test_overwrite_refuses_a_folder_the_library_did_not_write_and_keeps_its_files(tmp_path):
    target = tmp_path / "v"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    proc = _cli("generate", "--sim", "metaworld", "--episodes", "1", "--tasks", "reach-v3", "--out", str(target),
                "--overwrite", "--no-progress")
    assert proc.returncode != 0 and "not a dataset written by actprior" in proc.stderr
    assert (target / "notes.txt").read_text() == "precious" and (target / "sub").is_dir()


def test_overwrite_replaces_our_dataset_but_not_one_holding_a_users_file(corpus, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    check_replaceable(str(copy))  # exactly what the writer wrote: replaceable
    (copy / "meta" / "my_labels.csv").write_text("x")
    with pytest.raises(FileExistsError, match="my_labels.csv"):
        check_replaceable(str(copy))
    assert (copy / "meta" / "my_labels.csv").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(str(empty))


# --------------------------------------------------------------------------------------------- 2. wrong checkpoint
def test_a_checkpoint_of_another_kind_or_with_missing_tensors_is_refused_by_name(tmp_path):
    prior = random_prior(history_length=4)
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny")
    vla.save_pretrained(tmp_path / "vla")
    with pytest.raises(ValueError, match="is a actprior_vla checkpoint; ActionPriorModel needs an actprior one"):
        ap.ActionPriorModel.from_pretrained(tmp_path / "vla")
    prior.save_pretrained(tmp_path / "prior")
    weights = load_file(tmp_path / "prior" / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, tmp_path / "prior" / "model.safetensors", metadata={"format": "pt"})
    os.remove(tmp_path / "prior" / "weights_sha256.json")
    with pytest.raises(ValueError, match=f"missing keys: {dropped}"):
        ap.ActionPriorModel.from_pretrained(tmp_path / "prior")


def test_train_stage2_with_a_vla_as_prior_fails_before_training_and_saves_nothing(tmp_path):
    prior = random_prior(history_length=4)
    ap.VLAWithPriorForAction.from_prior(prior, "tiny").save_pretrained(tmp_path / "vla")
    data = make_corpus(tmp_path / "demos", embodiments=("sawyer",), n_episodes=4, length=20, images=16)[0]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training_scripts", "train_stage2.py"), "--dataset",
                           data, "--prior", str(tmp_path / "vla"), "--output_dir", str(tmp_path / "run"),
                           "--max_steps", "2", "--no_progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "actprior_vla checkpoint" in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


# --------------------------------------------------------------------------------------------- 3. NaN actions
def test_non_finite_actions_are_refused_naming_the_input_or_the_weight():
    prior = random_prior(history_length=4)
    with pytest.raises(ValueError, match="input 'history'"):
        prior.predict_actions(np.full((3, 4), 1e25, np.float32), "sawyer")
    with torch.no_grad():
        prior.decoder.out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight decoder.out.weight"):
        prior.predict_actions(np.zeros((3, 4), np.float32), "sawyer")


# --------------------------------------------------------------------------------------------- 4. NaN in training
def test_a_value_far_outside_the_datasets_statistics_is_reported_before_training(corpus, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    path = next((bad / "data").rglob("*.parquet"))
    table = pq.read_table(path).to_pandas()
    row = table["action"].iloc[7].copy()
    row[1] = 1e30
    table.at[7, "action"] = row
    pq.write_table(__import__("pyarrow").Table.from_pandas(table, preserve_index=False), path)
    stats = json.loads((bad / STATS_PATH).read_text())  # statistics unchanged
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training_scripts", "train_stage1.py"), "--dataset",
                           str(bad), "--output_dir", str(tmp_path / "run"), "--max_steps", "4", *TINY],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "episode 0, frame 7" in proc.stderr and "corrupt value" in proc.stderr
    assert json.loads((bad / STATS_PATH).read_text()) == stats and not (tmp_path / "run" / "final").exists()


def test_non_finite_loss_stops_at_once_naming_step_and_windows(tmp_path):
    from modeling_actprior.training import NonFiniteLossError, check_finite_loss

    batch = {"embodiment": ["sawyer", "xarm6"], "episode_index": torch.tensor([4, 9]),
             "frame_index": torch.tensor([2, 11]), "actions": torch.tensor([[[0.0]], [[float("inf")]]])}
    check_finite_loss(torch.tensor(0.5), 3, batch, str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"step 4: actions of xarm6 episode 9 frame 11.*no checkpoint"):
        check_finite_loss(torch.tensor(float("nan")), 3, batch, str(tmp_path))


# --------------------------------------------------------------------------------------------- 5. empty images
def test_empty_images_are_refused():
    vla, proc = _tiny_vla_and_processor()
    with pytest.raises(ValueError, match="empty"):
        proc(images=[np.zeros((0, 0, 3), np.uint8)], text=["open the drawer"])
    from transformers import pipeline

    robot = pipeline("robot-action", model=vla, processor=proc, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        robot(np.zeros((0, 5, 3), np.uint8), instruction="open the drawer", history=np.zeros((0, 4)),
              embodiment="sawyer")


# --------------------------------------------------------------------------------------------- 6. resume
def test_resume_with_options_that_change_the_result_is_refused_by_name(corpus, tmp_path):
    out = str(tmp_path / "run")
    train_stage1.main(["--dataset", corpus, "--output_dir", out, "--max_steps", "4", "--checkpoint_every", "2", *TINY])
    resume = ["--dataset", corpus, "--output_dir", out, "--resume_from_checkpoint", "latest", *TINY]
    with pytest.raises(ValueError, match="--batch_size 8 -> 4"):
        train_stage1.main([*resume, "--max_steps", "6", "--batch_size", "4"])
    with pytest.raises(ValueError, match="--learning_rate"):
        train_stage1.main([*resume, "--max_steps", "6", "--learning_rate", "0.5"])
    with pytest.raises(ValueError, match="below the step"):
        train_stage1.main([*resume, "--max_steps", "2"])
    # harmless options, and deliberate changes that are named, go through
    result = train_stage1.main([*resume, "--max_steps", "6", "--log_every", "3", "--allow_changed_options",
                                "learning_rate", "--learning_rate", "0.0005"])
    assert result["step"] == 6


# --------------------------------------------------------------------------------------------- 8. option ranges
@pytest.mark.parametrize("argv", [["--max_steps", "0"], ["--max_steps", "-5"], ["--batch_size", "0"],
                                  ["--checkpoint_every", "0"], ["--log_every", "0"],
                                  ["--gradient_accumulation_steps", "0"], ["--seed", str(2**70)],
                                  ["--learning_rate", "nan"], ["--val_fraction", "1"]])
def test_training_options_out_of_range_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_stage1.build_parser().parse_args(["--dataset", "x", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_evaluate_and_generate_options_out_of_range_are_refused(tmp_path):
    for args in (["evaluate", "--model", "m", "--episodes", "0"], ["evaluate", "--model", "m", "--image-size", "0"],
                 ["generate", "--sim", "metaworld", "--out", str(tmp_path / "g"), "--episodes", "1",
                  "--image-size", "100000"]):
        proc = _cli(*args)
        assert proc.returncode == 2 and "must be an integer" in proc.stderr, (args, proc.stderr[-500:])
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------------------------- 10. checksums
def test_checksum_manifest_cannot_point_outside_the_checkpoint_and_its_absence_is_logged(tmp_path, caplog):
    prior = random_prior(history_length=4)
    prior.save_pretrained(tmp_path)
    manifest = tmp_path / "weights_sha256.json"
    sums = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sums, "../../../../etc/hostname": "0" * 64}))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        ap.ActionPriorModel.from_pretrained(tmp_path)
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid checksum file"):
        ap.ActionPriorModel.from_pretrained(tmp_path)
    manifest.unlink()
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            ap.ActionPriorModel.from_pretrained(tmp_path)
    finally:
        hf_logging.disable_propagation()
    assert "verification off" in caplog.text


# --------------------------------------------------------------------------------------------- 9. stale cache
def test_a_data_file_rewritten_with_its_mtime_restored_is_not_served_from_the_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modeling_actprior.data import load_lerobot_dataset

    root = make_corpus(tmp_path / "c", embodiments=("sawyer",), n_episodes=3, length=12)[0]
    cache = str(tmp_path / "cache")
    first = load_lerobot_dataset(root, cache_dir=cache)
    path = next(p for p in first.meta.data_files())
    stat = os.stat(path)
    table = pq.read_table(path).to_pandas()
    row = table["action"].iloc[3].copy()
    row[0] = 1e6
    table.at[3, "action"] = row
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(Exception, match="corrupt value"):
        load_lerobot_dataset(root, cache_dir=cache)  # the new content is read, and validated
    again = load_lerobot_dataset(root, validate=False, cache_dir=cache)
    assert float(np.asarray(again.hf_dataset[3]["action"])[0]) == 1e6


# --------------------------------------------------------------------------------------------- 11. impossible values
def test_impossible_statistics_and_config_values_are_refused():
    from modeling_actprior.action_space import EmbodimentStats

    stats = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "q01": [-1.0, 2.0], "q99": [1.0, 1.0]}
    with pytest.raises(ValueError, match="dimension 1: q01=2"):
        EmbodimentStats.from_dict(stats)
    with pytest.raises(ValueError, match="logvar_min < logvar_max"):
        ap.ActionPriorConfig.from_preset("tiny", logvar_min=5.0, logvar_max=4.0)
    with pytest.raises(ValueError, match="kl_weight"):
        ap.ActionPriorConfig.from_preset("tiny", kl_weight=float("nan"))
    with pytest.raises(ValueError, match="history_token must be true or false"):
        ap.VLAWithPriorConfig.from_preset("tiny", history_token="yes")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['histroy_token'\]"):
        ap.VLAWithPriorConfig.from_preset("tiny", histroy_token=False)


def test_two_robots_under_one_name_with_other_definitions_are_not_pooled():
    from modeling_actprior.action_space import EmbodimentSpec, register_embodiment

    register_embodiment(EmbodimentSpec("test_arm_once", 2, ("a", "b"), "ee_delta", 10.0))
    register_embodiment(EmbodimentSpec("test_arm_once", 2, ("a", "b"), "ee_delta", 10.0, "same robot"))
    with pytest.raises(ValueError, match="differs in action_names, control_mode, fps"):
        register_embodiment(EmbodimentSpec("test_arm_once", 2, ("x", "y"), "joint_position", 30.0))


# --------------------------------------------------------------------------------------------- 12. messages
def test_model_arguments_accept_run_folders_and_explain_the_rest(tmp_path):
    from modeling_actprior.checkpoint_paths import resolve_model_path

    prior = random_prior(history_length=4)
    prior.save_pretrained(tmp_path / "run" / "final")
    assert resolve_model_path(str(tmp_path / "run"), "--prior", "actprior") == str(tmp_path / "run" / "final")
    with pytest.raises(ValueError, match="this is a actprior checkpoint; --model needs an actprior_vla one"):
        resolve_model_path(str(tmp_path / "run"), "--model", "actprior_vla")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nowhere"), "--model", "actprior_vla")
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no final/"):
        resolve_model_path(str(tmp_path / "half"), "--model")
    assert resolve_model_path("org/actprior-openvla", "--model") == "org/actprior-openvla"
    proc = _cli("evaluate", "--model", str(tmp_path / "run"), "--episodes", "1")
    assert proc.returncode != 0 and "needs an actprior_vla one" in proc.stderr


def test_an_instruction_holding_the_image_token_is_refused():
    vla, proc = _tiny_vla_and_processor()
    with pytest.raises(ValueError, match="special token '<image>'"):
        proc(images=[np.zeros((8, 8, 3), np.uint8)], text=["open the <image> drawer"])


def test_truncated_episode_metadata_and_a_dataset_without_episodes_are_named(tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from modeling_actprior.data import load_lerobot_dataset
    from modeling_actprior.data.lerobot import DatasetFormatError

    root = make_corpus(tmp_path / "c", embodiments=("sawyer",), n_episodes=2, length=12)[0]
    cut = tmp_path / "cut"
    shutil.copytree(root, cut)
    meta_file = next((cut / "meta" / "episodes").rglob("*.parquet"))
    meta_file.write_bytes(meta_file.read_bytes()[:200])
    with pytest.raises(DatasetFormatError, match=f"{meta_file.name} cannot be read as Parquet"):
        load_lerobot_dataset(str(cut))
    empty = tmp_path / "empty"
    shutil.copytree(root, empty)
    meta_file = next((empty / "meta" / "episodes").rglob("*.parquet"))
    pq.write_table(pq.read_table(meta_file).slice(0, 0), meta_file)
    info = json.loads((empty / "meta" / "info.json").read_text())
    info.update(total_episodes=0, total_frames=0)
    (empty / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="no episodes|episode metadata"):
        load_lerobot_dataset(str(empty))


def test_ragged_histories_and_damaged_processor_files_are_explained(tmp_path):
    prior = random_prior(history_length=4)
    with pytest.raises(ValueError, match="different lengths"):
        prior.predict_actions([np.zeros((3, 4)), np.zeros((2, 4))], "sawyer")
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny")
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["open the drawer"])
    proc.save_pretrained(tmp_path / "p")
    tok = tmp_path / "p" / "tokenizer.json"
    good = tok.read_bytes()
    tok.write_bytes(good[:100])
    with pytest.raises(ValueError, match="truncated or damaged"):
        ap.ActionPriorProcessor.from_pretrained(tmp_path / "p")
    tok.write_bytes(good)
    (tmp_path / "p" / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor_config.json is missing"):
        ap.ActionPriorProcessor.from_pretrained(tmp_path / "p")


def test_a_failed_write_of_a_final_folder_names_the_folder_and_the_free_space(tmp_path):
    from modeling_actprior.training import atomic_folder

    target = tmp_path / "final"
    target.mkdir()
    (target / "kept.txt").write_text("old")

    class SafetensorError(Exception):  # what safetensors raises when the disk is full
        pass

    with pytest.raises(OSError, match=r"Could not write .*final.*MiB free.*previous one is kept"):
        with atomic_folder(str(target)) as tmp:
            open(os.path.join(tmp, "model.safetensors"), "w").write("partial")
            raise SafetensorError("No space left on device (os error 28)")
    assert (target / "kept.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_mixed_resume_is_refused_through_the_command_line(corpus, tmp_path):
    script = os.path.join(ROOT, "training_scripts", "train_stage1.py")
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, script, "--dataset", corpus, "--output_dir", out, "--max_steps", "2",
                            "--checkpoint_every", "2", *TINY], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, script, "--dataset", corpus, "--output_dir", out, "--max_steps", "4",
                            "--resume_from_checkpoint", "latest", *TINY, "--batch_size", "4"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode != 0 and "--batch_size 8 -> 4" in again.stderr and "would mix two runs" in again.stderr
    assert not os.path.isdir(os.path.join(out, "checkpoints", "step-000004"))
