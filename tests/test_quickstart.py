import json
import os

import pytest

from modeling_actprior.cli import main


def test_cli_lists_its_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("quickstart", "generate", "info"):
        assert cmd in out


def test_info_summarizes_a_dataset_and_refuses_other_folders(tmp_path, capsys):
    from synthetic import make_corpus

    path = make_corpus(tmp_path, embodiments=("xarm6",), n_episodes=2, length=10)[0]
    assert main(["info", path]) == 0
    assert "robot xarm6 (7-D joint_position" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_writes_a_report(tmp_path):
    pytest.importorskip("metaworld")
    pytest.importorskip("pybullet")
    pytest.importorskip("robosuite")
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--metaworld-episodes", "1", "--pybullet-episodes", "1",
                 "--robosuite-episodes", "1", "--stage1-steps", "4", "--stage1-preset", "tiny", "--batch-size", "8"]) == 0
    report = (out / "report.md").read_text()
    assert "Stage 1: the action prior on held-out episodes" in report and "| sawyer |" in report
    assert (out / "stage1_errors.png").stat().st_size > 0
    ev = json.loads((out / "stage1" / "final" / "eval_results.json").read_text())["evaluation"]
    assert {"sawyer", "panda", "kuka_iiwa"} <= set(ev)
    # a rerun reuses everything it already has
    assert main(["quickstart", "--out", str(out), "--stage1-preset", "tiny"]) == 0
    assert os.path.isdir(out / "data" / "stage1" / "metaworld")
