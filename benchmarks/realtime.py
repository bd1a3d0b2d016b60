#!/usr/bin/env python
"""Real-time control, proved in closed loop: few-step action generation and real-time chunking (RTC).

    python benchmarks/realtime.py                  # ~1 h on a 2-core CPU; resumable
    python benchmarks/realtime.py --update-docs  # and put the tables into docs/realtime.md

One run, the study's quickstart setting (the three easy MT10 tasks, 10 demonstrations per task, the Stage-1 corpus of
the quickstart, the ``decoder+kd+slowhead`` Stage-2 recipe), two Stage-2 training seeds, and two priors:

* ``shortcut``: Stage 1 trained as a shortcut model (``--shortcut_max_steps 16``); Stage 2 inherits the decoder and
  keeps its self-consistency loss, so the VLA samples in 1, 2, 4... steps with the ``"shortcut"`` solver;
* ``plain``: the same prior trained with plain flow matching (what the library did before), sampled with Euler at
  the same step counts: does few-step sampling need the shortcut training at all?

Measured on each Stage-2 run:

1. **Few-step generation.** Offline: the error of the predicted chunk to the true one (normalized units, fixed
   noise) on held-out demonstrations, at 1, 2, 4 and 10 steps; closed loop: success on the evaluation scenes. The
   reference is 10-step Euler on the instantaneous velocity (``d = 0``) of the same model. Paired over the same
   (seed, task, scene).
2. **Real-time chunking.** With 10-step Euler on the shortcut model, chunk latency simulated as ``D`` control steps
   (``actprior evaluate --inference-delay D``: the previous chunk keeps executing meanwhile), ``D`` in 0, 2, 4, 8,
   naive switching vs RTC: success and the mean squared action change at chunk switches (vs within chunks).

Writes ``--out``/``realtime.json`` and ``realtime.md``, copies both to ``benchmarks/results/``, the figure to
``docs/realtime.png``, and with ``--update-docs`` the tables into ``docs/realtime.md`` between the ``realtime`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK_START, MARK_END = "<!-- realtime:start -->", "<!-- realtime:end -->"
VARIANT = "decoder+kd+slowhead"
SHORTCUT_OPTIONS = ("--shortcut_max_steps", "16", "--num_inference_steps", "2")
STEP_COUNTS = (1, 2, 4, 10)
DELAYS = (0, 2, 4, 8)
#: Guidance caps (beta) tried besides the paper's 5, at the delays where RTC costs success.
BETA_SWEEP = ((4, (0.5, 1.0, 2.0)), (8, (0.5, 1.0, 2.0)))
HELDOUT_EPISODES = 3  # per task, from another generator seed than the demonstrations


def settings(prior: str) -> list[dict]:
    """The closed-loop settings rolled out for each run of ``prior``: ``{"name", "solver", "steps", "delay", "rtc"}``."""
    rows = [{"name": "euler10", "solver": "euler", "steps": 10, "delay": 0, "rtc": False, "beta": None}]
    if prior == "shortcut":
        rows += [{"name": f"shortcut{n}", "solver": "shortcut", "steps": n, "delay": 0, "rtc": False, "beta": None}
                 for n in STEP_COUNTS]
        for d in DELAYS:
            for rtc in (False, True):
                if d or rtc:  # delay 0 without RTC is euler10 itself
                    rows.append({"name": f"delay{d}_{'rtc' if rtc else 'naive'}", "solver": "euler", "steps": 10,
                                 "delay": d, "rtc": rtc, "beta": None})
        for d, betas in BETA_SWEEP:
            rows += [{"name": f"delay{d}_rtc_beta{b:g}", "solver": "euler", "steps": 10, "delay": d, "rtc": True,
                      "beta": b} for b in betas]
    else:
        rows += [{"name": f"euler{n}", "solver": "euler", "steps": n, "delay": 0, "rtc": False, "beta": None}
                 for n in STEP_COUNTS if n != 10]
    return rows


def _pipeline(final: str, solver: str):
    from transformers import pipeline

    from modeling_actprior.runs import load_vla
    from modeling_actprior.scheduling_flow_matching import FlowMatchingActionScheduler

    model, processor = load_vla(final)
    # The diffusers way of picking a sampler: a scheduler built from the saved one's config.
    model.scheduler = FlowMatchingActionScheduler.from_config(model.scheduler.config, solver=solver)
    return pipeline("robot-action", model=model, processor=processor, device="cpu")


def offline_errors(final: str, heldout: str, prior: str, windows: int = 192, seed: int = 0) -> dict:
    """Per sampler setting: the mean squared error of the chunk to the true chunk on ``windows`` held-out windows
    (normalized units, real steps and dimensions, the same noise for every setting), and to the reference's chunk."""
    import torch

    from modeling_actprior.data import IMAGE, VLAWindowDataset, collate_windows, load_lerobot_dataset
    from modeling_actprior.runs import load_vla
    from modeling_actprior.scheduling_flow_matching import FlowMatchingActionScheduler

    model, processor = load_vla(final)
    pc = model.config.prior_config
    data = VLAWindowDataset(load_lerobot_dataset(heldout), model.normalizer, history=pc.history_length,
                            chunk=pc.chunk_size)
    idx = np.random.default_rng(seed).choice(len(data), size=min(windows, len(data)), replace=False)
    samples = [data[int(i)] for i in idx]
    camera = next(iter(samples[0][IMAGE]))
    batch = collate_windows([{k: v for k, v in r.items() if k != IMAGE} for r in samples])
    batch.update(processor(images=[r[IMAGE][camera] for r in samples], text=[r["instruction"] for r in samples]))
    noise = torch.randn(len(samples), pc.chunk_size, pc.max_action_dim, generator=torch.Generator().manual_seed(seed))
    w = batch["action_mask"][..., None].float() * batch["dim_mask"][:, None, :].float()

    def mse(a, b):
        return float((((a - b) ** 2) * w).sum() / w.sum())

    chunks = {}
    for row in settings(prior):
        if row["delay"] or row["rtc"]:
            continue
        scheduler = FlowMatchingActionScheduler.from_config(model.scheduler.config, solver=row["solver"])
        with torch.no_grad():
            chunks[row["name"]] = model.predict_action(**batch, noise=noise, scheduler=scheduler,
                                                       num_inference_steps=row["steps"])
    ref = chunks["euler10"]
    return {name: {"mse_to_truth": mse(c, batch["actions"]), "mse_to_reference": mse(c, ref)}
            for name, c in chunks.items()} | {"windows": len(samples)}


def evaluate_run(run: str, prior: str, budget, heldout: str, out: str) -> dict:
    """Roll one Stage-2 run out at every setting (resumable: one JSON per setting), plus its offline errors."""
    from modeling_actprior.rollout import evaluate
    from modeling_actprior.training import write_json

    final = os.path.join(run, "final")
    os.makedirs(out, exist_ok=True)
    offline_path = os.path.join(out, "offline.json")
    if not os.path.isfile(offline_path):
        write_json(offline_path, offline_errors(final, heldout, prior))
    results = {"offline": json.load(open(offline_path)), "closed_loop": {}}
    pipes = {}
    for row in settings(prior):
        path = os.path.join(out, f"{row['name']}.json")
        if not os.path.isfile(path):
            robot = pipes.get(row["solver"]) or pipes.setdefault(row["solver"], _pipeline(final, row["solver"]))
            t0 = time.perf_counter()
            evaluate(f"{run}:{row['name']}", sim="metaworld", tasks=budget.tasks, episodes=budget.eval_episodes,
                     out=path, seed=budget.eval_seed, max_steps=budget.eval_max_steps, image_size=budget.image_size,
                     progress=False, robot_pipeline=robot, num_inference_steps=row["steps"],
                     inference_delay=row["delay"], rtc=row["rtc"], max_guidance_weight=row["beta"])
            logging.info("%s %s: %.0f s", run, row["name"], time.perf_counter() - t0)
        with open(path) as f:
            res = json.load(f)
        o = res["overall"]
        results["closed_loop"][row["name"]] = {
            **row, "successes": o["successes"], "episodes": o["episodes"], "success_rate": o["success_rate"],
            "boundary_jump": o.get("mean_boundary_jump"), "within_step": o.get("mean_within_step"),
            "outcomes": {t["task"]: [bool(e["success"]) for e in t["episodes_detail"]] for t in res["tasks"]},
            "seconds": res["seconds"]}
    write_json(os.path.join(out, "run.json"), results)
    return results


def _pairs(runs: dict, name: str) -> dict:
    """``{(seed, task, scene): success}`` of setting ``name`` over the runs ``{seed: results}``."""
    return {(seed, task, i): ok for seed, r in runs.items() for task, oks in r["closed_loop"][name]["outcomes"].items()
            for i, ok in enumerate(oks)}


def summarize(results: dict) -> dict:
    """``results``: ``{prior: {seed: evaluate_run(...)}}`` -> the tables' numbers."""
    from modeling_actprior.success_stats import paired_difference

    out = {"few_step": [], "rtc": []}
    for prior, runs in results.items():
        ref = _pairs(runs, "euler10")
        names = ["euler10"] + [n for n in next(iter(runs.values()))["closed_loop"] if n != "euler10"]
        for name in names:
            rows = [r["closed_loop"][name] for r in runs.values()]
            row = rows[0]
            k, n = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
            entry = {"prior": prior, "setting": name, "solver": row["solver"], "steps": row["steps"],
                     "delay": row["delay"], "rtc": row["rtc"], "beta": row.get("beta"), "successes": k,
                     "episodes": n, "success_rate": k / n,
                     "vs_euler10": paired_difference(_pairs(runs, name), ref) if name != "euler10" else None}
            jumps = [(r["boundary_jump"], r["within_step"]) for r in rows if r["boundary_jump"] is not None]
            entry["boundary_jump"] = float(np.mean([j for j, _ in jumps])) if jumps else None
            entry["within_step"] = float(np.mean([w for _, w in jumps if w is not None])) if jumps else None
            if not row["delay"] and not row["rtc"]:
                off = [r["offline"][name] for r in runs.values()]
                entry["offline_mse"] = float(np.mean([o["mse_to_truth"] for o in off]))
                refs = [r["offline"]["euler10"]["mse_to_truth"] for r in runs.values()]
                entry["offline_vs_euler10"] = float(np.mean([o["mse_to_truth"] for o in off]) / np.mean(refs) - 1.0)
                entry["offline_mse_to_euler10"] = float(np.mean([o["mse_to_reference"] for o in off]))
                out["few_step"].append(entry)
            if prior == "shortcut" and (row["delay"] or row["rtc"] or name == "euler10"):
                out["rtc"].append(entry)
    # RTC vs naive at each delay, paired
    runs = results.get("shortcut", {})
    out["rtc_vs_naive"] = {}
    for d in DELAYS:
        naive = "euler10" if d == 0 else f"delay{d}_naive"
        out["rtc_vs_naive"][d] = paired_difference(_pairs(runs, f"delay{d}_rtc"), _pairs(runs, naive)) if runs else None
    return out


def _ci(diff: dict | None) -> str:
    if not diff:
        return ""
    lo, hi = diff["ci95"]
    return f"{diff['mean_difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(summary: dict, command: str, minutes: float, machine: str) -> str:
    lines = [f"`{command}` ({machine}; {minutes:.0f} min). Three easy MT10 tasks, {summary['episodes_per_setting']} "
             "closed-loop episodes per setting (2 training seeds x 3 tasks x the same evaluation scenes); intervals "
             "are paired bootstrap 95% over (seed, task, scene) against 10-step Euler of the same model.", "",
             "**Few-step generation** (offline: chunk MSE to the truth on held-out demonstrations, normalized units)", "",
             "| prior | sampler | steps | offline MSE | vs 10-step | MSE to the 10-step chunk | success "
             "| vs 10-step Euler (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary["few_step"]:
        lines.append(f"| {e['prior']} | {e['solver']} | {e['steps']} | {e['offline_mse']:.4f} | "
                     f"{e['offline_vs_euler10']:+.1%} | {e['offline_mse_to_euler10']:.4f} | {e['success_rate']:.2f} "
                     f"({e['successes']}/{e['episodes']}) | {_ci(e['vs_euler10']) or 'reference'} |")
    lines += ["", "**Real-time chunking** (shortcut prior, 10-step Euler, 8 actions executed per chunk; action change: "
              "mean squared change between consecutive executed actions, raw units)", "",
              "| delay (steps) | switching | success | vs delay 0 (paired) | change at chunk switch | within a chunk |",
              "|---|---|---|---|---|---|"]
    for e in sorted(summary["rtc"], key=lambda e: (e["delay"], e["rtc"], -(e["beta"] or 5.0))):
        how = "naive" if not e["rtc"] else "RTC" if e["beta"] is None else f"RTC, β = {e['beta']:g}"
        lines.append(f"| {e['delay']} | {how} | {e['success_rate']:.2f} "
                     f"({e['successes']}/{e['episodes']}) | {_ci(e['vs_euler10']) or 'reference'} | "
                     f"{e['boundary_jump']:.4f} | {e['within_step']:.4f} |")
    lines += ["", "RTC (β = 5) minus naive switching, paired: " + "; ".join(
        f"delay {d}: {_ci(v)}" for d, v in summary["rtc_vs_naive"].items() if v)]
    return "\n".join(lines)


def plot(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for prior, marker in (("shortcut", "o"), ("plain", "s")):
        rows = sorted([e for e in summary["few_step"] if e["prior"] == prior and (prior == "plain"
                                                                                  or e["solver"] == "shortcut")],
                      key=lambda e: e["steps"])
        if rows:
            a.plot([e["steps"] for e in rows], [e["success_rate"] for e in rows], marker=marker,
                   label=f"{prior} prior ({rows[0]['solver']})")
    ref = [e for e in summary["few_step"] if e["prior"] == "shortcut" and e["setting"] == "euler10"]
    if ref:
        a.axhline(ref[0]["success_rate"], color="gray", ls="--", label="shortcut prior, 10-step Euler")
    a.set_xscale("log", base=2)
    a.set_xlabel("flow steps")
    a.set_ylabel("closed-loop success")
    a.set_ylim(0, 1)
    a.legend(fontsize=8)
    for rtc, color in ((False, "tab:red"), (True, "tab:green")):
        rows = sorted([e for e in summary["rtc"] if e["rtc"] == rtc and e["beta"] is None], key=lambda e: e["delay"])
        b.plot([e["delay"] for e in rows], [e["boundary_jump"] for e in rows], marker="o", color=color,
               label="RTC" if rtc else "naive switching")
    b.set_xlabel("inference delay (control steps)")
    b.set_ylabel("mean squared action change at switch")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _eval_job(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--prior", required=True)
    p.add_argument("--budget-json", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from modeling_actprior.study import Budget

    with open(args.budget_json) as f:
        budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    evaluate_run(args.run, args.prior, budget, args.heldout, args.out)
    return 0


def main(argv=None) -> int:
    from modeling_actprior.sim.generate import generate
    from modeling_actprior.study import BUDGETS, Job, run_jobs, run_study
    from modeling_actprior.training import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "realtime"))
    p.add_argument("--seeds", default="0,1", help="Stage-2 training seeds")
    p.add_argument("--episodes", type=int, default=10, help="closed-loop episodes per task and setting")
    p.add_argument("--jobs", type=int, default=None, help="processes in parallel (default: CPU cores)")
    p.add_argument("--update-docs", "--update-readme", dest="update_readme", action="store_true",
                   help="put the tables into docs/realtime.md (the report page the README links)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = os.path.abspath(args.out)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    jobs = args.jobs or os.cpu_count() or 1
    base = dataclasses.replace(BUDGETS["quickstart"], name="realtime", variants=(VARIANT,), seeds=seeds, eval_every=0,
                               eval_episodes=args.episodes, closed_loop=False)
    t0 = time.time()
    # Both priors read the same corpus and demonstrations: the plain study generates them, the other links them.
    budgets = {"plain": base, "shortcut": dataclasses.replace(base, stage1_options=SHORTCUT_OPTIONS)}
    for prior, budget in budgets.items():
        folder = os.path.join(out, prior)
        os.makedirs(folder, exist_ok=True)
        if prior != "plain" and not os.path.exists(os.path.join(folder, "data")):
            os.symlink(os.path.join(out, "plain", "data"), os.path.join(folder, "data"))
        run_study(folder, budget, jobs=jobs, threads=1)
    heldout = os.path.join(out, "plain", "data", "heldout")
    if not os.path.isdir(heldout):
        generate("metaworld", heldout, episodes=HELDOUT_EPISODES, tasks=base.tasks, image_size=base.image_size,
                 workers=2, seed=1)
    train_s = time.time() - t0

    eval_jobs = []
    for prior in budgets:
        for seed in seeds:
            run = os.path.join(out, prior, "stage2", f"demos{base.demos[0]:03d}_{VARIANT.replace('+', '_')}_seed{seed}")
            target = os.path.join(out, "eval", f"{prior}_seed{seed}")
            eval_jobs.append(Job(f"eval/{prior}/seed{seed}", [
                sys.executable, os.path.abspath(__file__), "_eval_job", "--run", run, "--prior", prior,
                "--budget-json", os.path.join(out, prior, "budget.json"), "--heldout", heldout, "--out", target],
                os.path.join(target, "run.json"), os.path.join(out, "logs", f"eval_{prior}_seed{seed}.log")))
    failed = run_jobs(eval_jobs, jobs, 1, "closed-loop settings")
    if failed:
        raise SystemExit(f"evaluation jobs failed: {failed}; see {out}/logs/.")
    results = {prior: {seed: json.load(open(os.path.join(out, "eval", f"{prior}_seed{seed}", "run.json")))
                       for seed in seeds} for prior in budgets}
    summary = summarize(results)
    summary["episodes_per_setting"] = len(seeds) * len(base.tasks) * args.episodes
    # Minutes of work over every invocation that did some (a rerun that only reads finished results adds nothing).
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {"train_s": 0.0, "eval_s": 0.0}
    if train_s > 60:
        timings["train_s"] += train_s
    if time.time() - t0 - train_s > 60:
        timings["eval_s"] += time.time() - t0 - train_s
    write_json(timings_path, timings)
    summary["timings"] = timings
    summary["wall_s"] = timings["train_s"] + timings["eval_s"]
    import platform

    summary["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    command = "python benchmarks/realtime.py"
    text = markdown(summary, command, summary["wall_s"] / 60, f"{os.cpu_count()} CPU cores")
    write_json(os.path.join(out, "realtime.json"), summary)
    with open(os.path.join(out, "realtime.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    figure = plot(summary, os.path.join(out, "realtime.png"))
    results_dir = os.path.join(HERE, "results")
    shutil.copy(os.path.join(out, "realtime.json"), os.path.join(results_dir, "realtime.json"))
    shutil.copy(os.path.join(out, "realtime.md"), os.path.join(results_dir, "realtime.md"))
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    shutil.copy(figure, os.path.join(ROOT, "docs", "realtime.png"))
    if args.update_readme:
        from docs_page import replace_block

        replace_block(os.path.join(ROOT, "docs", "realtime.md"), MARK_START, MARK_END, text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_eval_job":
        sys.exit(_eval_job(sys.argv[2:]))
    sys.exit(main())
