"""Nothing lost: a training run of either stage killed with SIGKILL at any moment resumes to the same weights and
never leaves a half-written checkpoint; checkpoints hold no pickle; a full disk or an unwritable output folder is a
clear error that keeps what was already saved."""

import errno
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from fault_injection import (
    checkpoint_problems,
    command,
    dataset_problems,
    fake_generate,
    final_weights,
    generate_command,
    kill_points,
    pickle_files,
    run,
    run_and_kill,
    same_weights,
    stage1_inputs,
    stage2_inputs,
)
from safetensors.torch import load_file
from synthetic import make_corpus

from modeling_actprior import ActionPriorModel
from modeling_actprior.training import (
    CHECKPOINT_DIR,
    atomic_folder,
    checkpointing,
    list_checkpoints,
    loop,
    verify_checkpoint,
    write_json,
)
from modeling_actprior.training import stage1 as train_stage1
from modeling_actprior.training import stage2 as train_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY1 = ["--model_preset", "tiny", "--chunk_size", "8", "--history_length", "4", "--batch_size", "16", "--log_every",
         "2", "--eval_every", "0", "--no_progress", "--eval_windows", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Inputs of a tiny Stage-1 run and the final weights of an uninterrupted one."""
    root = tmp_path_factory.mktemp("faults1")
    inputs = stage1_inputs(root)
    run(command(1, inputs, root / "reference"))
    return inputs, final_weights(root / "reference")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """Inputs of a tiny Stage-2 run (demonstrations with images, a tiny prior) and its uninterrupted final weights."""
    root = tmp_path_factory.mktemp("faults2")
    inputs = stage2_inputs(root)
    run(command(2, inputs, root / "reference"))
    return inputs, final_weights(root / "reference")


def _kill_then_resume(stage, inputs, expected, out, kill_point):
    cmd = command(stage, inputs, out)
    killed = run_and_kill(cmd, out / CHECKPOINT_DIR, kill_points(stage)[kill_point])
    assert killed, f"the run ended before the kill point {kill_point}"
    assert not (out / "final").exists()
    # Every visible checkpoint is complete: half-written ones only ever exist under a temporary name.
    assert list_checkpoints(str(out)), "no complete checkpoint survived"
    assert checkpoint_problems(out) == []

    run(cmd + ["--resume_from_checkpoint", "latest"])
    assert same_weights(final_weights(out), expected) == []
    assert checkpoint_problems(out) == []
    left = [p.name for p in (out / CHECKPOINT_DIR).iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert left == [], "a temporary or half-deleted checkpoint was left behind"
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-final", ".trash-final"))]


@pytest.mark.parametrize("kill_point", sorted(kill_points(1)))
def test_stage1_sigkill_at_any_point_then_resume_reaches_the_uninterrupted_weights(stage1, tmp_path, kill_point):
    _kill_then_resume(1, *stage1, tmp_path / "run", kill_point)


@pytest.mark.parametrize("kill_point", ["after_first_checkpoint", "mid_checkpoint_write"])
def test_stage2_sigkill_at_any_point_then_resume_reaches_the_uninterrupted_weights(stage2, tmp_path, kill_point):
    _kill_then_resume(2, *stage2, tmp_path / "run", kill_point)


# ------------------------------------------------------------------------------------------------ no pickle
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_episodes=6, length=30)


def test_checkpoints_hold_no_pickle_and_resume_without_torch_load(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--dataset", *corpus, "--output_dir", str(out), "--checkpoint_every", "2", *TINY1]
    train_stage1.main([*args, "--max_steps", "2"])
    ckpt = out / CHECKPOINT_DIR / "step-000002"
    names = set(os.listdir(ckpt))
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "lr_scheduler.json", "rng_state_0.json",
            "trainer_state.json", "sha256sums.json"} <= names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    assert pickle_files(out) == []
    # viz-latents and other readers load the weights with the model's own keys.
    model = ActionPriorModel.from_pretrained(out / "final")
    assert set(load_file(ckpt / "model.safetensors")) == set(model.state_dict())

    def refuse(*a, **k):
        raise AssertionError("torch.load was called while resuming")

    monkeypatch.setattr(torch, "load", refuse)
    assert train_stage1.main([*args, "--max_steps", "4", "--resume_from_checkpoint", "latest"])["step"] == 4
    assert pickle_files(out) == []


def test_tampered_checkpoint_is_refused_naming_the_file(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", *corpus, "--output_dir", str(out), "--checkpoint_every", "2", *TINY1]
    train_stage1.main([*args, "--max_steps", "2"])
    opt = out / CHECKPOINT_DIR / "step-000002" / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-1] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256") as err:
        train_stage1.main([*args, "--max_steps", "4", "--resume_from_checkpoint", "latest"])
    assert str(opt) in str(err.value)


# ------------------------------------------------------------------------------------------------ disk full
def test_disk_full_while_saving_keeps_earlier_checkpoints_and_says_so(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--dataset", *corpus, "--output_dir", str(out), "--checkpoint_every", "2", *TINY1]
    real = checkpointing._save_tensors
    checkpoints_started = set()

    def fills_the_disk(tensors, path):
        checkpoints_started.add(os.path.basename(os.path.dirname(path)))
        if len(checkpoints_started) == 2:  # the second checkpoint: half a file, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpointing, "_save_tensors", fills_the_disk)
    with pytest.raises(OSError, match="Could not write checkpoint") as err:
        train_stage1.main([*args, "--max_steps", "6"])
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert str(out / CHECKPOINT_DIR / "step-000004") in message and "MiB free" in message and "step-000002" in message
    assert sorted(os.listdir(out / CHECKPOINT_DIR)) == ["step-000002"]  # no temporary folder left
    verify_checkpoint(str(out / CHECKPOINT_DIR / "step-000002"))
    assert not (out / "final").exists()

    monkeypatch.setattr(checkpointing, "_save_tensors", real)
    assert train_stage1.main([*args, "--max_steps", "6", "--resume_from_checkpoint", "latest"])["step"] == 6


def test_unwritable_or_full_output_dir_fails_before_training(corpus, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="is not writable") as err:
        train_stage1.main(["--dataset", *corpus, "--output_dir", str(blocker / "run"), "--max_steps", "2", *TINY1])
    assert str(blocker / "run") in str(err.value)

    class Usage:
        free = 3 * 2**20

    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: Usage)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="only 3 MiB free"):
        train_stage1.main(["--dataset", *corpus, "--output_dir", str(out), "--max_steps", "2", *TINY1])
    assert not (out / CHECKPOINT_DIR).exists()


def test_stage2_checks_its_output_dir_before_training(tmp_path, monkeypatch):
    calls = []

    def refuse(path, *a, **k):
        calls.append(path)
        raise PermissionError(f"--output_dir {path} is not writable")

    monkeypatch.setattr(train_stage2, "check_output_dir_writable", refuse)
    monkeypatch.setattr(train_stage2, "load_prior", lambda path: None)
    monkeypatch.setattr(train_stage2, "build_data", lambda args, prior: ([], [], {}, {}))
    with pytest.raises(PermissionError, match="is not writable"):
        train_stage2.main(["--dataset", "x", "--output_dir", str(tmp_path / "o"), "--no_progress"])
    assert calls == [str(tmp_path / "o")]


# ------------------------------------------------------------------------------------------------ final/ folder
def test_final_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path):
    final = tmp_path / "final"
    with atomic_folder(str(final)) as folder:
        open(os.path.join(folder, "old.txt"), "w").write("old")
        assert not final.exists()
    assert os.listdir(final) == ["old.txt"]

    with pytest.raises(RuntimeError, match="crashed"), atomic_folder(str(final)) as folder:
        open(os.path.join(folder, "new.txt"), "w").write("new")
        raise RuntimeError("crashed while saving")
    assert os.listdir(final) == ["old.txt"]
    assert os.listdir(tmp_path) == ["final"]

    (tmp_path / ".tmp-final-99999").mkdir()  # left by a killed run
    with atomic_folder(str(final)) as folder:
        open(os.path.join(folder, "new.txt"), "w").write("new")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["final"]


def test_a_json_result_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Files whose presence means "done" (a study's closed_loop.json, run_summary.json) are written all or nothing."""
    path = tmp_path / "closed_loop.json"
    write_json(str(path), {"success": 0.5})
    assert json.loads(path.read_text()) == {"success": 0.5}
    with pytest.raises(TypeError):
        write_json(str(path), {"success": object()})  # fails halfway through serializing
    assert json.loads(path.read_text()) == {"success": 0.5}
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space"):
            write_json(str(path), {"success": 1.0})
    assert json.loads(path.read_text()) == {"success": 0.5}
    assert os.listdir(tmp_path) == ["closed_loop.json"]  # no temporary file left behind
    write_json(str(path), {"success": 1.0})
    assert json.loads(path.read_text()) == {"success": 1.0}


# ------------------------------------------------------------------------------------------------ generation
def _tables(root):
    return {str(p.relative_to(root)): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))}


def test_interrupted_generation_reruns_to_the_uninterrupted_datasets(tmp_path):
    reference = tmp_path / "reference"
    fake_generate(str(reference))
    out = tmp_path / "cut"
    # Killed while the second robot is being written: the first one is complete.
    second_in_progress = lambda d: (d / "sawyer" / "meta" / "info.json").is_file() and any(d.glob("xarm6.tmp-*"))  # noqa: E731
    assert run_and_kill(generate_command(out, delay=0.05), out, second_in_progress)
    marker = ".actprior-generate-incomplete.json"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("xarm6.tmp-")) == [marker, "sawyer"]
    assert dataset_problems(out / "sawyer") == []
    kept = (out / "sawyer" / "meta" / "info.json").stat().st_mtime_ns
    # The parent folder says it is incomplete, and training refuses it rather than train on one robot.
    from modeling_actprior.training import parse_dataset_specs

    with pytest.raises(ValueError, match="incomplete.*Rerun the same generate command"):
        parse_dataset_specs([str(out)])

    # The rerun keeps the complete robot, writes the other, and clears what the killed writer left.
    assert fake_generate(str(out)) == [str(out / "sawyer"), str(out / "xarm6")]
    assert sorted(os.listdir(out)) == ["sawyer", "xarm6"]
    assert (out / "sawyer" / "meta" / "info.json").stat().st_mtime_ns == kept
    for robot in ("sawyer", "xarm6"):
        assert dataset_problems(out / robot) == []
        got, expected = _tables(out / robot), _tables(reference / robot)
        assert got.keys() == expected.keys() and all(got[k].equals(expected[k]) for k in got)

    # A different request over existing datasets is refused, not mixed in.
    with pytest.raises(FileExistsError, match="not generated by this request"):
        fake_generate(str(out), episodes=2)


def test_generation_killed_while_writing_its_only_dataset_reruns_cleanly(tmp_path):
    out = tmp_path / "one"
    started = lambda d: any(d.glob("one.tmp-*"))  # noqa: E731
    cmd = generate_command(out, delay=0.05)
    cmd[-1] = cmd[-1].replace(")", ", robots=['xarm6'])")
    assert run_and_kill(cmd, tmp_path, started)
    assert not out.exists()
    fake_generate(str(out), robots=["xarm6"])
    assert sorted(os.listdir(tmp_path)) == ["one"] and dataset_problems(out) == []
