"""Reports of the study and the quickstart: figures (success against steps, final success, Stage-1 scaling, Stage-1
errors), markdown tables and the quickstart's report.md, and copying it into the README."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .study import VARIANT_LABELS
from .training.atomic_io import write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_success_curves(summary: dict, path: str) -> str:
    """Success rate against Stage-2 steps, one line per variant, pooled Wilson 95% band; a panel per demo count."""
    plt = _plt()
    demos = list(summary["demos"])
    fig, axes = plt.subplots(1, len(demos), figsize=(5.2 * len(demos), 3.6), dpi=110, squeeze=False)
    for ax, d in zip(axes[0], demos):
        for variant, v in summary["demos"][d].items():
            steps = [c["step"] for c in v["curve"]]
            rate = [c["success_rate"] for c in v["curve"]]
            line, = ax.plot(steps, rate, marker="o", label=VARIANT_LABELS.get(variant, variant))
            ax.fill_between(steps, [c["ci95_low"] for c in v["curve"]], [c["ci95_high"] for c in v["curve"]],
                            color=line.get_color(), alpha=0.12)
        ax.set_title(f"{d} demonstrations per task")
        ax.set_xlabel("Stage-2 training step")
        ax.set_ylabel("closed-loop success (95% CI)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_final(summary: dict, path: str) -> str:
    """Final success per variant (pooled over seeds and tasks) with Wilson whiskers and each seed's rate as dots."""
    plt = _plt()
    demos = list(summary["demos"])
    fig, axes = plt.subplots(1, len(demos), figsize=(4.8 * len(demos), 3.6), dpi=110, squeeze=False)
    for ax, d in zip(axes[0], demos):
        names = list(summary["demos"][d])
        finals = [summary["demos"][d][n]["final"] for n in names]
        rate = np.array([f["success_rate"] for f in finals])
        err = np.stack([rate - [f["ci95_low"] for f in finals], np.array([f["ci95_high"] for f in finals]) - rate])
        ax.bar(range(len(names)), rate, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))], alpha=0.8)
        for i, f in enumerate(finals):
            ax.scatter([i] * len(f["seed_rates"]), f["seed_rates"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("final success (95% CI; dots: seeds)")
        ax.set_title(f"{d} demonstrations per task")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(summary: dict, path: str) -> str | None:
    """Downstream success of the scaling variant against Stage-1 corpus frames."""
    if not summary["scaling"]:
        return None
    plt = _plt()
    rows = sorted(summary["scaling"].values(), key=lambda r: r.get("frames", 0))
    x = [r.get("frames", 0) for r in rows]
    rate = np.array([r["success_rate"] for r in rows])
    err = np.stack([rate - [r["ci95_low"] for r in rows], np.array([r["ci95_high"] for r in rows]) - rate])
    fig, ax = plt.subplots(figsize=(5.0, 3.5), dpi=110)
    ax.errorbar(x, rate, yerr=err, marker="o", capsize=4)
    ax.set_xscale("log")
    ax.set_xlabel("Stage-1 corpus (frames of actions)")
    ax.set_ylabel("closed-loop success (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(f"More Stage-1 data -> downstream success ({summary['budget']['scaling_variant']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_summary(summary: dict) -> str:
    """The README / report tables of a summary."""
    from modeling_actprior.training import markdown_table

    b = summary["budget"]
    lines = []
    for d, per_variant in summary["demos"].items():
        if not per_variant:  # no finished run at this demonstration count yet
            continue
        rows = []
        for variant, v in per_variant.items():
            f = v["final"]
            paired = v.get("paired_vs_scratch")
            reach = v.get("steps_to_baseline_final_interpolated")
            rows.append({
                "variant": VARIANT_LABELS.get(variant, variant),
                "final success": f"{f['success_rate']:.2f} [{f['ci95_low']:.2f}, {f['ci95_high']:.2f}]",
                "paired Δ vs scratch": "—" if not paired else
                f"{paired['mean_difference']:+.2f} [{paired['ci95'][0]:+.2f}, {paired['ci95'][1]:+.2f}]",
                "per seed": " / ".join(f"{r:.2f}" for r in f["seed_rates"]),
                "success by step": " → ".join(f"{c['success_rate']:.2f}" for c in v["curve"]),
                "steps to scratch's final": "—" if reach is None else
                f"{'≤ ' if reach['upper_bound'] else ''}{reach['step']:.0f}",
            })
        steps = sorted({c["step"] for v in per_variant.values() for c in v["curve"]})
        n_eps = next(iter(per_variant.values()))["final"]["episodes"]
        lines += [f"**{d} demonstrations per task** ({len(b['tasks'])} tasks: {', '.join(b['tasks'])}; "
                  f"{b['eval_episodes']} closed-loop episodes per task per seed per checkpoint ({n_eps} per variant "
                  f"at the last), checkpoints at steps {', '.join(str(x) for x in steps)}; Wilson 95% intervals; "
                  "paired Δ: mean success difference to scratch over the same seed, task and scene, with a 95% "
                  "bootstrap interval; steps to scratch's final success interpolated between checkpoints):", "",
                  markdown_table(rows, ["variant", "final success", "paired Δ vs scratch", "per seed",
                                        "success by step", "steps to scratch's final"]), ""]
        sens = [{"variant": VARIANT_LABELS.get(v, v), "offline MSE": f"{x['sensitivity']['mse_to_truth']:.3f}",
                 "change when the image is swapped": f"{x['sensitivity']['change_when_image_swapped']:.3f}",
                 "change when the history is swapped": f"{x['sensitivity']['change_when_history_swapped']:.3f}"}
                for v, x in per_variant.items() if "sensitivity" in x]
        if sens:
            lines += ["What each final policy's chunk depends on (offline, 96 demonstration windows, mean over seeds; "
                      "mean squared change of the normalized chunk when the window's image, or its history, is "
                      "swapped with another window's; `study.input_sensitivity`):", "",
                      markdown_table(sens, ["variant", "offline MSE", "change when the image is swapped",
                                            "change when the history is swapped"]), ""]
    if summary["scaling"]:
        rows = [{"Stage-1 episodes per task": size, "corpus frames": r.get("frames", "?"),
                 "prior held-out MSE": f"{r['prior_mse']:.3f}" if "prior_mse" in r else "?",
                 "downstream success": f"{r['success_rate']:.2f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"}
                for size, r in sorted(summary["scaling"].items(), key=lambda kv: int(kv[0]))]
        lines += [f"**Stage-1 data scaling** ({b['scaling_variant']}, {b['demos'][0]} demonstrations per task):", "",
                  markdown_table(rows, ["Stage-1 episodes per task", "corpus frames", "prior held-out MSE",
                                        "downstream success"]), ""]
    return "\n".join(lines)


def write_figures(out: str, summary: dict) -> dict[str, str]:
    figs = {"curves": plot_success_curves(summary, os.path.join(out, "success_vs_steps.png")),
            "final": plot_final(summary, os.path.join(out, "final_success.png"))}
    scaling = plot_scaling(summary, os.path.join(out, "stage1_scaling.png"))
    if scaling:
        figs["scaling"] = scaling
    return figs


# --------------------------------------------------------------------------------------------- quickstart
README_START, README_END = "<!-- quickstart-results:start -->", "<!-- quickstart-results:end -->"


def update_readme(page: str, report: str, command: str) -> None:
    """Put ``report`` (markdown) between the quickstart-results markers of ``page`` (``docs/quickstart.md``, the
    page the README links; a page that does not exist yet is created with them); its images are copied into
    ``quickstart/`` beside the page and the links rewritten, so the page shows this run's figures. The report's own ``##`` headings become ``###`` (the page has one title)."""
    import re

    text = None
    if os.path.exists(page):  # refuse a page without the markers before anything is written beside it
        with open(page) as f:
            text = f.read()
        first, last = text.find(README_START), text.find(README_END)
        if first < 0 or last < first:
            raise ValueError(f"{page} has no {README_START} ... {README_END} block, so --update-readme would "
                             "overwrite what is there: add the two markers where the results belong, or pass a new "
                             "file.")
    root, out = os.path.dirname(os.path.abspath(page)), os.path.dirname(os.path.abspath(report))
    figures = os.path.join(root, "quickstart")
    os.makedirs(figures, exist_ok=True)
    with open(report) as f:
        body = f.read().split("\n", 1)[1].strip()  # drop the report's title

    def copy(m):
        src = os.path.join(out, m.group(2))
        if not m.group(2).endswith(".png") or not os.path.isfile(src):
            return m.group(0)
        name = m.group(2).replace("/", "_")
        shutil.copy(src, os.path.join(figures, name))
        return f"{m.group(1)}(quickstart/{name})"

    body = re.sub(r"(!\[[^\]]*\])\(([^)]+)\)", copy, body)
    body = re.sub(r"\[([^\]]+)\]\((latents/index\.html)\)", r"`\1` (in the run folder)", body)
    body = re.sub(r"(?m)^## ", "### ", body)
    block = f"{README_START}\nFrom `{command}`, copied from its `report.md` by `--update-readme`:\n\n{body}\n{README_END}"
    if text is None:  # a new page: its title and the block
        write_text(page, f"# What the quickstart measured\n\n{block}\n")
        return
    write_text(page, text[:first] + block + text[last + len(README_END):])


def plot_stage1_errors(evaluation: dict, path: str) -> str:
    """Grouped bars: per-embodiment held-out MSE of the prior and both baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    embs = sorted(evaluation)
    x = np.arange(len(embs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(embs)), 3.6), dpi=120)
    for i, (key, label) in enumerate([("prior_mse", "action prior (sampled)"), ("repeat_last_mse", "repeat last action"),
                                      ("mean_chunk_mse", "mean chunk")]):
        ax.bar(x + (i - 1) * 0.27, [evaluation[e][key] for e in embs], width=0.27, label=label)
    ax.set_xticks(x, embs, rotation=20)
    ax.set_ylabel("held-out MSE (normalized units)")
    ax.set_title("Stage 1: predicting the next chunk from the past")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: str, final: str, timings: dict, summary: dict | None = None, figures: dict | None = None,
                 latents: str | None = None) -> str:
    """``out/report.md``: the Stage-1 corpus and prior evaluation, then (with ``summary``) the VLA trained from
    scratch vs with the prior in closed loop, and (with ``latents``) the latent alignment; all from this run."""
    from modeling_actprior.training import markdown_table

    with open(os.path.join(final, "eval_results.json")) as f:
        results = json.load(f)
    evaluation, corpus = results["evaluation"], results["corpus"]
    shutil.copy(os.path.join(final, "loss_curve.png"), os.path.join(out, "stage1_loss_curve.png"))
    plot_stage1_errors(evaluation, os.path.join(out, "stage1_errors.png"))
    rows = [{"embodiment": e, **{k: v for k, v in r.items() if k != "beats_baselines"},
             "beats both": "yes" if r["beats_baselines"] else "no"} for e, r in sorted(evaluation.items())]
    lines = [
        "# actprior quickstart report",
        "",
        "Everything below was produced by this run (`actprior quickstart`), on data generated on this machine.",
        "",
    ]
    if summary is not None:
        lines += _stage2_section(out, summary, figures or {}, latents)
    lines += [
        "## Stage-1 corpus",
        "",
        markdown_table(corpus["datasets"], ["embodiment", "episodes", "frames", "train_episodes", "val_episodes"]),
        "",
        "## Stage 1: the action prior on held-out episodes",
        "",
        "Masked MSE / L1 in normalized units between the true next chunk and: a chunk sampled by the prior from its",
        "latent of the past actions; the last action repeated; the embodiment's mean training chunk.",
        "",
        markdown_table(rows, ["embodiment", "windows", "prior_mse", "repeat_last_mse", "mean_chunk_mse", "prior_l1",
                              "repeat_last_l1", "mean_chunk_l1", "active_dims", "beats both"]),
        "",
        "![stage-1 errors](stage1_errors.png)",
        "",
        "![stage-1 loss](stage1_loss_curve.png)",
        "",
        f"Checkpoint: `{os.path.relpath(final, out)}` (load with `AutoModel.from_pretrained`).",
        "",
        "Timings (s; phases reused from an earlier run of the same folder keep that run's time): "
        + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()) if timings else "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _stage2_section(out: str, summary: dict, figures: dict, latents: str | None) -> list[str]:
    from modeling_actprior.study import stage2_name, variant_command
    from modeling_actprior.training import markdown_table

    b = summary["budget"]
    lines = [
        "## Stage 2: the VLA from scratch vs with the action prior, in closed loop",
        "",
        f"Both VLAs ({b['stage2_preset']} preset) train for {b['stage2_steps']} steps on the same "
        f"{b['demos'][0]} demonstrations per task, with the same seed, optimizer and data order; the only "
        "difference is the prior: "
        + "; ".join(f"{VARIANT_LABELS.get(v, v)} (`train_stage2.py {variant_command(v)}`)" for v in b["variants"])
        + ". The full method's history token is measured in `benchmarks/prior_vs_scratch.py` (see the README). "
        "Each checkpoint is "
        f"rolled out {b['eval_episodes']} times per task in Meta-World on evaluation seeds the demonstrations never "
        "used. Intervals are 95% Wilson intervals over episodes.",
        "",
        markdown_summary(summary),
    ]
    for key, title in (("curves", "success vs steps"), ("final", "final success")):
        if key in figures:
            lines += [f"![{title}]({os.path.relpath(figures[key], out)})", ""]
    offline = []
    for demos, per_variant in summary["demos"].items():
        for variant, v in per_variant.items():
            for seed in v["seeds"]:
                size = b["stage1_sizes"][-1]
                res = os.path.join(out, "stage2", stage2_name(int(demos), variant, size, seed, size), "final",
                                   "eval_results.json")
                if os.path.isfile(res):
                    with open(res) as f:
                        ev = json.load(f)["evaluation"]
                    for emb, r in ev.items():
                        offline.append({"variant": VARIANT_LABELS.get(variant, variant), "seed": seed,
                                        "embodiment": emb, "held-out MSE": r["vla_mse"],
                                        "repeat-last MSE": r["repeat_last_mse"]})
    if offline:
        lines += ["Offline, on held-out demonstration episodes (normalized units):", "",
                  markdown_table(offline, ["variant", "seed", "embodiment", "held-out MSE", "repeat-last MSE"]), ""]
    for demos, per_variant in summary["demos"].items():
        for variant, v in per_variant.items():
            size = b["stage1_sizes"][-1]
            for seed in v["seeds"]:
                curve = os.path.join("stage2", stage2_name(int(demos), variant, size, seed, size), "final",
                                     "loss_curve.png")
                if os.path.isfile(os.path.join(out, curve)):
                    lines += [f"Training losses, {VARIANT_LABELS.get(variant, variant)} (seed {seed}):", "",
                              f"![stage-2 loss, {variant}]({curve})", ""]
    if latents:
        with open(os.path.join(latents, "latent_alignment.json")) as f:
            lat = json.load(f)
        fin = lat.get("final", {})
        rel = os.path.relpath(latents, out)
        lines += [
            "### Latent alignment (`actprior viz-latents`)",
            "",
            "Cosine similarity between the VLA's latent and the prior's latent of the same held-out window (diagonal) "
            "and of other windows (off-diagonal), for the VLA trained with the prior"
            + (f": diagonal {fin['diagonal_mean']:.3f}, off-diagonal {fin['off_diagonal_mean']:.3f} at the end."
               if "diagonal_mean" in fin else "."),
            "",
            f"![cosine matrix]({rel}/cosine_matrix.png)",
            "",
        ]
        if os.path.isfile(os.path.join(latents, "alignment_over_training.png")):
            lines += [f"![alignment over training]({rel}/alignment_over_training.png)", ""]
        lines += [f"All of it, with the per-task view: [{rel}/index.html]({rel}/index.html).", ""]
    return lines
