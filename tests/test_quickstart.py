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
    small = ["--stage1-episodes", "1", "--stage1-steps", "4", "--stage1-preset", "tiny", "--batch-size", "8",
             "--tasks", "drawer-close-v3", "--demos", "2", "--stage2-steps", "4", "--eval-every", "2",
             "--eval-episodes", "1"]
    assert main(["quickstart", "--out", str(out), *small]) == 0
    report = (out / "report.md").read_text()
    assert "Stage 1: the action prior on held-out episodes" in report and "| sawyer |" in report
    assert "from scratch vs with the action prior, in closed loop" in report
    assert "no prior (random action head)" in report and "decoder reuse + early latent distillation" in report
    for png in ("stage1_errors.png", "success_vs_steps.png", "final_success.png", "latents/cosine_matrix.png"):
        assert (out / png).stat().st_size > 0, png
    stage1 = json.loads((out / "stage1" / "final" / "eval_results.json").read_text())
    assert {"sawyer", "panda", "kuka_iiwa"} <= {d["embodiment"] for d in stage1["corpus"]["datasets"]}
    assert {"sawyer", "kuka_iiwa"} <= set(stage1["evaluation"])  # one robosuite episode: none held out
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["demos"]["2"]["decoder+kd+slowhead"]["curve"]
    assert [c["step"] for c in curve] == [2, 4] and all(c["episodes"] == 1 for c in curve)
    # a rerun reuses everything it already has
    weights = [out / "stage1" / "final" / "model.safetensors",
               *sorted((out / "stage2").glob("*/final/model.safetensors"))]
    assert len(weights) == 3
    mtimes = [w.stat().st_mtime_ns for w in weights]
    assert main(["quickstart", "--out", str(out), *small]) == 0
    assert [w.stat().st_mtime_ns for w in weights] == mtimes
    assert json.loads((out / "summary.json").read_text())["demos"] == summary["demos"]


def test_the_report_page_gets_the_run_report_and_its_figures(tmp_path):
    from modeling_actprior.reports import README_END, README_START, update_readme

    run = tmp_path / "run"
    (run / "fig").mkdir(parents=True)
    (run / "fig" / "curve.png").write_bytes(b"\x89PNG fake")
    (run / "report.md").write_text("# title\n\n## Stage 1\n\n![curve](fig/curve.png)\n\n[latents](latents/index.html)\n")
    page = tmp_path / "docs" / "quickstart.md"
    page.parent.mkdir()
    page.write_text(f"# What the quickstart measured\n\n{README_START}\nold\n{README_END}\n\nkept\n")
    update_readme(str(page), str(run / "report.md"), "actprior quickstart (seed 0)")
    text = page.read_text()
    assert "\nold\n" not in text and text.endswith("kept\n") and "### Stage 1" in text and "\n## Stage 1" not in text
    assert "![curve](quickstart/fig_curve.png)" in text and (page.parent / "quickstart" / "fig_curve.png").is_file()
    assert "`latents` (in the run folder)" in text


def test_the_report_page_is_created_when_new_and_a_page_without_markers_is_refused(tmp_path):
    from modeling_actprior.reports import README_END, README_START, update_readme

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# title\n\n## Stage 1\n\nnumbers\n")
    page = tmp_path / "new.md"
    update_readme(str(page), str(run / "report.md"), "actprior quickstart (seed 0)")
    text = page.read_text()
    assert text.startswith("# What the quickstart measured") and README_START in text and README_END in text
    assert "### Stage 1" in text and "numbers" in text
    (tmp_path / "other").mkdir()
    mine = tmp_path / "other" / "README.md"
    mine.write_text("# my own page\n")
    with pytest.raises(ValueError, match="no <!-- quickstart-results:start -->"):
        update_readme(str(mine), str(run / "report.md"), "actprior quickstart (seed 0)")
    assert mine.read_text() == "# my own page\n" and os.listdir(mine.parent) == ["README.md"]  # nothing written
