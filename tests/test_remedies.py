"""The options that the study measures against the full method's copycat failure and the distillation's early
dominance: corrective demonstrations (``generate --action-noise``), history-token augmentation, the teacher's
variance floor / temperature / means-only match, and the paired statistics and job plan that measure them."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from synthetic import random_prior

import modeling_actprior as ap
from modeling_actprior import study
from modeling_actprior.modeling_actprior_vla import gaussian_kl_between


def _tiny_vla(**overrides):
    return ap.VLAWithPriorForAction.from_prior(random_prior(history_length=6), "tiny", **overrides)


def _history(b=3, k=6):
    g = torch.Generator().manual_seed(0)
    history = torch.zeros(b, k, 32)
    history[..., :4] = torch.randn(b, k, 4, generator=g)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, :2] = False  # an episode start: the two oldest steps are padding
    history[0, :2] = 0
    dim_mask = torch.zeros(b, 32, dtype=torch.bool)
    dim_mask[:, :4] = True
    return history, mask, dim_mask


# --------------------------------------------------------------------------------------------- history token
def test_history_lag_drops_the_most_recent_steps_in_training_and_inference():
    vla = _tiny_vla(history_lag=2)
    history, mask, dim_mask = _history()
    for mode in (True, False):
        vla.train(mode)
        h, m = vla.token_history(history, mask, dim_mask)
        assert h.shape == history.shape
        assert torch.equal(h[:, 2:], history[:, :-2]) and torch.equal(m[:, 2:], mask[:, :-2])
        assert not m[:, :2].any() and not h[:, :2].any()
    assert vla.token_history_differs_from_teachers()


def test_history_shift_and_noise_apply_in_training_only_and_never_touch_padding():
    vla = _tiny_vla(history_shift=3, history_noise=0.5)
    history, mask, dim_mask = _history(b=64)
    vla.eval()
    h, m = vla.token_history(history, mask, dim_mask)
    assert torch.equal(h, history) and torch.equal(m, mask) and not vla.token_history_differs_from_teachers()
    vla.train()
    torch.manual_seed(3)
    h, m = vla.token_history(history, mask, dim_mask)
    dropped = (~m).sum(1) - (~mask).sum(1).clamp_max(0)  # steps hidden per sample, beyond its own padding
    assert set((~m[1:]).sum(1).tolist()) == {0, 1, 2, 3}  # every shift in U{0..3} is drawn
    assert not h[~m].any() and not h[..., 4:].any()  # padding and padded dims stay zero
    assert (h[m][:, :4] != 0).all() and dropped.min() >= 0
    assert vla.token_history_differs_from_teachers()


def test_teacher_reads_the_clean_history_when_the_token_reads_an_augmented_one():
    vla = _tiny_vla(history_noise=1.0, history_shift=2)
    history, mask, dim_mask = _history()
    vla.train()
    with torch.no_grad():
        clean = vla.teacher(history, mask, dim_mask)
    proc = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["open the drawer"])
    rng = np.random.default_rng(0)
    inputs = proc(images=[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] * 3, text=["open the drawer"] * 3,
                  history=[np.zeros((1, 4))] * 3, embodiment="sawyer")
    out = vla(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
              attention_mask=inputs["attention_mask"], history=history, history_mask=mask, dim_mask=dim_mask,
              actions=torch.zeros(3, 8, 32), step=0)
    assert torch.equal(out.prior_mean, clean[0]) and torch.equal(out.prior_logvar, clean[1])


def test_sampled_history_token_is_stochastic_in_training_and_the_mean_at_inference():
    vla = _tiny_vla(history_latent="sample")
    history, mask, dim_mask = _history()
    vla.train()
    a, b = vla.history_token(history, mask, dim_mask), vla.history_token(history, mask, dim_mask)
    assert not torch.equal(a, b)
    vla.eval()
    mean = vla.history_projection(vla.history_posterior(history, mask, dim_mask)[0])
    assert torch.equal(vla.history_token(history, mask, dim_mask), mean)


@pytest.mark.parametrize("field,value", [("history_lag", 6), ("history_shift", -1), ("history_noise", float("nan")),
                                         ("history_latent", "median"), ("distill_match", "l1"),
                                         ("distill_teacher_temperature", 0.0),
                                         ("distill_teacher_logvar_min", float("inf"))])
def test_impossible_remedy_values_are_refused(field, value):
    prior = ap.ActionPriorConfig.from_preset("tiny", chunk_size=8, history_length=6)
    with pytest.raises(ValueError, match=field):
        ap.VLAWithPriorConfig.from_preset("tiny", prior_config=prior, **{field: value})


# --------------------------------------------------------------------------------------------- distillation
def test_teacher_floor_temperature_and_means_only_match_hand_computed_losses():
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, -1.0]])
    t_mean, t_logvar = torch.tensor([[0.0, 0.0]]), torch.tensor([[-9.0, -2.0]])
    vla = _tiny_vla()
    assert vla.distillation_loss(mean, logvar, t_mean, t_logvar) == pytest.approx(
        float(gaussian_kl_between(mean, logvar, t_mean, t_logvar)))
    vla.config.distill_teacher_logvar_min = -4.0
    floored = torch.tensor([[-4.0, -2.0]])
    assert vla.distillation_loss(mean, logvar, t_mean, t_logvar) == pytest.approx(
        float(gaussian_kl_between(mean, logvar, t_mean, floored)))
    vla.config.distill_teacher_logvar_min, vla.config.distill_teacher_temperature = None, 2.0
    warm = t_logvar + 2 * math.log(2.0)
    assert vla.distillation_loss(mean, logvar, t_mean, t_logvar) == pytest.approx(
        float(gaussian_kl_between(mean, logvar, t_mean, warm)))
    vla.config.distill_match = "mean"
    assert vla.distillation_loss(mean, logvar, t_mean, t_logvar) == pytest.approx(0.25 + 1.0)
    # the floor bounds the KL of a sharp teacher against a unit-variance student: per dimension
    # 0.5 * (lv_t - 0 + 1 / e^lv_t - 1), i.e. ~11000 nats at -10 and 2.19 at -2
    sharp = torch.full((1, 64), -10.0)
    zeros = torch.zeros(1, 64)
    vla.config.distill_match, vla.config.distill_teacher_temperature = "kl", 1.0
    assert float(vla.distillation_loss(zeros, zeros, zeros, sharp)) == pytest.approx(64 * 0.5 * (-11 + math.e ** 10))
    vla.config.distill_teacher_logvar_min = -2.0
    assert float(vla.distillation_loss(zeros, zeros, zeros, sharp)) == pytest.approx(64 * 0.5 * (-3 + math.e ** 2))


# --------------------------------------------------------------------------------------------- corrective demos
def test_action_noise_is_reproducible_per_seed_and_keeps_the_experts_clean_labels():
    import importlib.util

    if importlib.util.find_spec("metaworld") is None:  # not imported here: MuJoCo must load after its GL choice
        pytest.skip("metaworld is not installed")
    from modeling_actprior.sim import metaworld_expert as mw

    clean = mw._rollout("reach-v3", 11, None)
    noisy = mw._rollout("reach-v3", 11, None, action_noise=0.3)
    again = mw._rollout("reach-v3", 11, None, action_noise=0.3)
    assert np.array_equal(noisy[1], again[1]) and np.array_equal(noisy[2], again[2])
    n = min(len(clean[1]), len(noisy[1]))
    assert np.array_equal(clean[1][0], noisy[1][0])  # same start, same first expert label
    assert not np.allclose(clean[2][1:n], noisy[2][1:n])  # the executed noise moved the arm elsewhere
    assert np.abs(noisy[1]).max() <= 1.0  # labels are the expert's clipped actions, not the perturbed ones


def test_action_noise_is_validated_and_refused_where_the_expert_cannot_correct(tmp_path):
    from modeling_actprior.sim.generate import add_generate_arguments, generate

    with pytest.raises(ValueError, match="action_noise"):
        generate("metaworld", str(tmp_path / "a"), episodes=1, tasks=["reach-v3"], action_noise=-0.1)
    with pytest.raises(ValueError, match="pybullet"):
        generate("pybullet", str(tmp_path / "b"), episodes=1, action_noise=0.1)
    import argparse

    args = add_generate_arguments(argparse.ArgumentParser()).parse_args(
        ["--sim", "metaworld", "--out", "x", "--episodes", "1", "--action-noise", "0.2"])
    assert args.action_noise == 0.2


# --------------------------------------------------------------------------------------------- statistics and plan
def test_paired_difference_on_a_hand_computed_example():
    a = {(0, "t", 0): True, (0, "t", 1): True, (0, "t", 2): False, (1, "t", 0): True, (9, "t", 9): True}
    b = {(0, "t", 0): False, (0, "t", 1): True, (0, "t", 2): False, (1, "t", 0): False, (8, "t", 8): False}
    d = study.paired_difference(a, b, resamples=4000)
    assert d["pairs"] == 4 and d["mean_difference"] == pytest.approx(0.5)
    assert d["a_only"] == 2 and d["b_only"] == 0
    assert 0.0 <= d["ci95"][0] < 0.5 < d["ci95"][1] <= 1.0
    same = study.paired_difference({k: True for k in a}, {k: True for k in a})
    assert same["mean_difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert study.paired_difference(a, {}) is None


def test_steps_to_reach_interpolates_between_checkpoints():
    curve = [{"step": 250, "success_rate": 0.2}, {"step": 500, "success_rate": 0.6}]
    assert study.steps_to_reach(curve, 0.4) == {"step": 375.0, "upper_bound": False}
    assert study.steps_to_reach(curve, 0.1) == {"step": 250.0, "upper_bound": True}
    assert study.steps_to_reach(curve, 0.7) is None


def test_medium_budget_plan_has_the_demonstrations_axis_and_scaling_for_the_named_variants_only(tmp_path):
    budget = study.BUDGETS["medium"]
    assert len(budget.tasks) >= 5 and len(budget.seeds) >= 3 and len(budget.stage1_sizes) >= 4
    assert budget.eval_episodes * len(budget.tasks) * len(budget.seeds) >= 150
    assert {5, 10, 25} <= set(budget.demos)
    data = {"stage1": {"metaworld": "d/mw"}, "demos": "d/demos", "demos_corrective": "d/dart"}
    _, jobs = study.plan_jobs(str(tmp_path), budget, data)
    main = budget.demos[0]
    others = [j for j in jobs if f"--demos {main} " not in " ".join(j.argv) + " "]
    assert {j.argv[j.argv.index("--variant") + 1] for j in others} == set(budget.demos_variants)
    assert all("--final-only" in j.argv for j in others)
    assert len(others) == (len(budget.demos) - 1) * len(budget.demos_variants) * len(budget.seeds)
    scaling = [j for j in jobs if "_prior" in j.name]
    assert len(scaling) == (len(budget.stage1_sizes) - 1) * len(budget.seeds)
    assert len(jobs) == len(budget.variants) * len(budget.seeds) + len(others) + len(scaling)


def test_variant_options_come_after_the_budgets_so_they_override_them(tmp_path, monkeypatch):
    import json

    budget = dataclasses.replace(study.BUDGETS["remedies"], variants=("full+dart+aug",))
    (tmp_path / "budget.json").write_text(json.dumps(dataclasses.asdict(budget)))
    seen = {}

    def main(argv):
        seen["argv"] = argv
        raise SystemExit(0)

    monkeypatch.setattr("modeling_actprior.training.stage2.main", main)
    args = study.argparse.Namespace(out=str(tmp_path), budget_json=str(tmp_path / "budget.json"),
                                    run=str(tmp_path / "run"), prior="p", demos=10, variant="full+dart+aug", seed=0,
                                    final_only=True)
    with pytest.raises(SystemExit):
        study._stage2_job(args)
    argv = seen["argv"]
    assert argv[argv.index("--dataset") + 1].endswith("demos_corrective")
    assert argv[-len(study.VARIANT_OPTIONS["full+dart+aug"]):] == list(study.VARIANT_OPTIONS["full+dart+aug"])
    assert "--history_noise 0.3" in study.variant_command("full+dart+aug")


def test_the_full_baseline_trains_on_augmented_histories_and_the_papers_variant_spells_out_its_own():
    full = ap.VLAWithPriorConfig.from_preset("tiny", baseline="full")
    assert (full.history_noise, full.history_shift, full.history_latent) == (0.3, 8, "sample")
    from modeling_actprior.training import stage2 as train_stage2

    args = train_stage2.build_parser().parse_args(["--dataset", "d", "--baseline", "full",
                                                   *study.VARIANT_OPTIONS["full"]])
    assert (args.history_noise, args.history_shift, args.history_latent, args.history_dropout) == (0.0, 0, "mean", 0.0)
    assert study.BUDGETS["quickstart"].variants == ("scratch", "decoder+kd+slowhead")
