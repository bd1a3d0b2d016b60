"""The prior-vs-scratch study's plumbing (planning, aggregation, figures) and the options it relies on
(episode subsets, history-token dropout). The study itself runs simulators: see benchmarks/prior_vs_scratch.py and
the slow quickstart test."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

import modeling_actprior as ap
from modeling_actprior import reports, study
from modeling_actprior.data import load_lerobot_dataset, select_episodes, split_episodes


# --------------------------------------------------------------------------------------------- episode subsets
def test_first_n_episodes_per_task_are_selected_and_split_within_the_subset(tmp_path):
    from synthetic import make_corpus

    path = make_corpus(tmp_path, embodiments=("sawyer",), n_episodes=9, length=12)[0]
    ds = load_lerobot_dataset(path)
    tasks = [ds.task(e) for e in range(ds.num_episodes)]
    chosen = select_episodes(ds, 2)
    per_task = {t: [e for e in range(ds.num_episodes) if tasks[e] == t][:2] for t in set(tasks)}
    assert chosen == sorted(e for eps in per_task.values() for e in eps)
    assert select_episodes(ds, 0) is None and select_episodes(ds, None) is None
    train, val = split_episodes(ds.num_episodes, 0.25, seed=0, episodes=chosen)
    assert sorted(train + val) == chosen and len(val) >= 1
    with pytest.raises(ValueError, match="subset of range"):
        split_episodes(3, 0.1, episodes=[1, 5])
    with pytest.raises(ValueError, match="positive"):
        select_episodes(ds, -1)


# --------------------------------------------------------------------------------------------- history dropout
def _tiny_vla(**overrides):
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=4))
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    norm.add_embodiment(ap.get_embodiment("sawyer"), np.random.default_rng(0).normal(size=(100, 4)))
    prior.normalizer = norm
    return ap.VLAWithPriorForAction.from_prior(prior, "tiny", **overrides)


def _prefix_inputs(vla, b=64):
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["open the drawer"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(b)]
    return proc(images=images, text=["open the drawer"] * b, history=[rng.normal(size=(3, 4))] * b,
                embodiment="sawyer")


def test_history_dropout_hides_the_token_from_a_share_of_training_samples_only():
    vla = _tiny_vla(history_dropout=0.5)
    inputs = _prefix_inputs(vla)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], inputs["history"],
            inputs["history_mask"], inputs["dim_mask"])
    seq = inputs["input_ids"].shape[1]  # the history token sits right after the prompt, before the query
    vla.train()
    torch.manual_seed(1)
    _, mask = vla.prefix_embeddings(*args)
    shown = mask[:, seq].float().mean().item()
    assert 0.25 < shown < 0.75 and mask[:, -1].all()  # the latent query is always visible
    vla.eval()
    _, mask = vla.prefix_embeddings(*args)
    assert mask[:, seq].all()
    with pytest.raises(ValueError, match="history_dropout"):
        ap.VLAWithPriorConfig.from_preset("tiny", history_dropout=1.0)


# --------------------------------------------------------------------------------------------- planning
def test_budgets_keep_mt10_out_of_the_stage1_corpus_and_evaluate_the_last_step():
    for budget in study.BUDGETS.values():
        for sim, kw in study.stage1_corpus_plan(budget):
            if sim == "metaworld":
                assert not set(kw["tasks"]) & set(study.MT10)
        assert set(budget.tasks) <= set(study.MT10)
        assert budget.eval_steps[-1] == budget.stage2_steps
        assert set(budget.variants) <= set(study.VARIANTS)
    assert study.BUDGETS["small"].seeds == (0, 1, 2) and len(study.BUDGETS["small"].stage1_sizes) >= 3
    assert study.BUDGETS["full"].demos == (10, 50) and study.BUDGETS["full"].tasks == study.MT10
    assert dataclasses.replace(study.BUDGETS["small"], stage2_steps=500, eval_every=200).eval_steps == [200, 400, 500]
    with pytest.raises(ValueError, match="exclude MT10"):
        study.stage1_corpus_plan(dataclasses.replace(study.BUDGETS["small"], stage1_metaworld_tasks=("reach-v3",)))


def test_plan_has_a_prior_per_corpus_size_and_a_run_per_variant_seed_and_scaling_point(tmp_path):
    budget = study.BUDGETS["small"]
    data = {"stage1": {"metaworld": "d/mw", "pybullet": "d/pb"}, "demos": "d/demos"}
    s1, s2 = study.plan_jobs(str(tmp_path), budget, data)
    assert len(s1) == len(budget.stage1_sizes)
    assert all("--max_episodes_per_task" in j.argv and "d/mw" in j.argv for j in s1)
    scaling = (len(budget.stage1_sizes) - 1) * len(budget.seeds)
    assert len(s2) == len(budget.variants) * len(budget.seeds) * len(budget.demos) + scaling
    assert len({j.done for j in s1 + s2}) == len(s1) + len(s2)


def test_run_jobs_skips_finished_jobs_and_reports_failures(tmp_path):
    done = tmp_path / "a.done"
    done.write_text("x")
    ok = study.Job("ok", [sys.executable, "-c", f"open({str(tmp_path / 'b.done')!r}, 'w').write('1')"],
                   str(tmp_path / "b.done"), str(tmp_path / "logs" / "b.log"))
    bad = study.Job("bad", [sys.executable, "-c", "raise SystemExit('boom')"], str(tmp_path / "c.done"),
                    str(tmp_path / "logs" / "c.log"))
    skipped = study.Job("skip", [sys.executable, "-c", "raise SystemExit(3)"], str(done), str(tmp_path / "a.log"))
    assert study.run_jobs([skipped, ok, bad], parallel=2, threads=1, desc="t") == ["bad"]
    assert (tmp_path / "b.done").exists() and "boom" in (tmp_path / "logs" / "c.log").read_text()
    assert not (tmp_path / "a.log").exists()


# --------------------------------------------------------------------------------------------- aggregation
def _fake_results(out, budget, successes):
    """successes[variant][seed] = successes per eval step (of budget.eval_episodes x tasks episodes)."""
    largest = max(budget.stage1_sizes)
    n = budget.eval_episodes * len(budget.tasks)
    for variant, per_seed in successes.items():
        for seed, ks in per_seed.items():
            run = out / "stage2" / study.stage2_name(budget.demos[0], variant, largest, seed, largest)
            run.mkdir(parents=True)
            steps = [{"step": s, "successes": k, "episodes": n,
                      "tasks": {t: [k // len(budget.tasks), budget.eval_episodes] for t in budget.tasks}}
                     for s, k in zip(budget.eval_steps, ks)]
            (run / "closed_loop.json").write_text(json.dumps({"steps": steps}))


def test_summary_pools_seeds_with_wilson_intervals_and_finds_steps_to_the_baseline(tmp_path):
    budget = dataclasses.replace(study.BUDGETS["small"], tasks=("drawer-close-v3", "window-open-v3"), seeds=(0, 1),
                                 variants=("scratch", "full"), stage2_steps=300, eval_every=100, eval_episodes=5,
                                 scaling_variant=None)
    _fake_results(tmp_path, budget, {"scratch": {0: [1, 3, 5], 1: [0, 2, 3]}, "full": {0: [4, 6, 9], 1: [2, 5, 7]}})
    summary = study.summarize(str(tmp_path), budget)
    scratch, full = summary["demos"]["10"]["scratch"], summary["demos"]["10"]["full"]
    assert scratch["final"]["successes"] == 8 and scratch["final"]["episodes"] == 20
    assert scratch["final"]["success_rate"] == pytest.approx(0.4)
    from modeling_actprior.rollout import wilson_interval

    assert (full["final"]["ci95_low"], full["final"]["ci95_high"]) == pytest.approx(wilson_interval(16, 20))
    assert full["final"]["seed_rates"] == pytest.approx([0.9, 0.7])
    # scratch ends at 8/20 = 0.4; full is at 6/20 = 0.3 at step 100 and 11/20 at step 200
    assert full["steps_to_baseline_final"] == 200 and scratch["steps_to_baseline_final"] == 300
    table = reports.markdown_summary(summary)
    assert "0.80 [" in table and "0.40 [" in table and "| full method (+ history token) |" in table
    figs = reports.write_figures(str(tmp_path), summary)
    assert set(figs) == {"curves", "final"} and all(os.path.getsize(p) > 0 for p in figs.values())


def test_a_study_folder_refuses_another_budget(tmp_path):
    (tmp_path / "budget.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(ValueError, match="another budget"):
        study.run_study(str(tmp_path), study.BUDGETS["small"])
