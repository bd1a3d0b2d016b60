"""``actprior viz-latents``: how closely a Stage-2 VLA's latent follows the prior's latent on the same windows.

Stage 2 distills the frozen prior encoder's ``p_prior(z | a_<t)`` into the VLM's ``p_VLM(z | o, l, z_hist)`` while
``lambda(step) > 0``. This module reads both latent means, each ``(N, d_z)``, on ``N`` held-out windows and draws

(a) the cosine-similarity matrix ``C[i, j] = cos(mu_VLM(window i), mu_prior(window j))`` ``(N, N)``, windows sorted
    by embodiment, then task, with the groups' boundaries drawn and labeled; and its block means task x task and
    embodiment x embodiment. The diagonal pairs a window with itself; the off-diagonal entries are the contrast:
    a VLM latent that points at *its own* window's prior latent has a diagonal above its off-diagonal;
(b) over a run's checkpoints, the mean diagonal and mean off-diagonal cosine against the training step, with
    ``lambda(step)`` on a twin axis and the step where it reaches 0 marked, so a reader sees whether the alignment
    distillation created survives once the KD weight is gone.

Written to ``--out``: ``cosine_matrix.png``, ``cosine_per_task.png``, ``cosine_per_embodiment.png``,
``alignment_over_training.png`` (with checkpoints), ``latent_alignment.json`` (every number) and ``index.html``
(one self-contained page: images embedded as base64, no external scripts or styles).

Windows are those ``train_stage2.py`` holds out: the same ``split_episodes`` with the run's ``val_fraction`` and
seed (read from the run's ``trainer_state.json``), the same camera, history length and processor. They are drawn
balanced over (embodiment, task) groups with a fixed seed, so two runs on the same data are compared on the same
windows.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .action_space import UnknownEmbodimentError
from .data import (
    DIM_MASK,
    HISTORY,
    HISTORY_MASK,
    IMAGE,
    INSTRUCTION,
    VLAWindowDataset,
    collate_windows,
    load_lerobot_dataset,
    select_episodes,
    split_episodes,
)
from .inputs import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES
from .modeling_actprior_vla import gaussian_kl_between
from .runs import VLARun, find_run, load_checkpoint_weights, load_vla

REPORT_JSON, REPORT_HTML = "latent_alignment.json", "index.html"
FIGURES = {
    "cosine_matrix": "cosine_matrix.png",
    "per_task": "cosine_per_task.png",
    "per_embodiment": "cosine_per_embodiment.png",
    "over_training": "alignment_over_training.png",
}
# train_stage2.py's defaults, used when the run folder does not record its own.
DEFAULT_VAL_FRACTION, DEFAULT_SPLIT_SEED = 0.1, 0


# --------------------------------------------------------------------------------------------- windows
@dataclass
class Windows:
    """Windows chosen for the plots, sorted by embodiment, then task, then dataset, episode and frame.

    Every list has one entry per window; ``batches`` are the processed model inputs in the same order (collated
    windows plus the processor's ``pixel_values`` / ``input_ids`` / ``attention_mask``).
    """

    embodiment: list[str]
    task: list[str]
    dataset: list[str]
    episode: list[int]
    frame: list[int]
    batches: list[dict]
    held_out: bool
    camera: str

    def __len__(self) -> int:
        return len(self.embodiment)

    def groups(self) -> list[tuple[str, str, int, int]]:
        """Contiguous ``(embodiment, task, start, stop)`` runs of windows."""
        out: list[tuple[str, str, int, int]] = []
        for i, key in enumerate(zip(self.embodiment, self.task)):
            if out and out[-1][:2] == key:
                out[-1] = (*key, out[-1][2], i + 1)
            else:
                out.append((*key, i, i + 1))
        return out


def allocate(sizes: Sequence[int], n: int) -> list[int]:
    """Split ``n`` draws over groups of ``sizes`` as evenly as they allow: a group smaller than its share gives
    the rest to the others (earlier groups take the remainder)."""
    take = [0] * len(sizes)
    left = min(int(n), int(sum(sizes)))
    while left > 0:
        open_groups = [g for g, s in enumerate(sizes) if take[g] < s]
        share = max(1, left // len(open_groups))
        for g in open_groups:
            add = min(share, sizes[g] - take[g], left)
            take[g] += add
            left -= add
            if not left:
                break
    return take


def held_out_windows(model, processor, dataset_paths: Sequence[str], num_windows: int = 128, seed: int = 0,
                     val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED,
                     camera: str | None = None, batch_size: int = 16, max_episodes_per_task: int = 0) -> Windows:
    """``num_windows`` windows of the held-out episodes of ``dataset_paths``, balanced over (embodiment, task).

    The split is ``split_episodes(num_episodes, val_fraction, split_seed)`` per dataset (restricted to the first
    ``max_episodes_per_task`` episodes of each task when the run used that option), as in train_stage2.py;
    with no held-out episode (``val_fraction`` 0) all episodes are used and ``held_out`` is False. Windows are
    ``VLAWindowDataset`` samples (history ``K = prior.history_length``, normalized with the model's statistics) of
    ``camera`` (default: the first dataset's first camera). Deterministic in ``seed``.
    """
    if num_windows < 2 or batch_size < 1:
        raise ValueError(f"--windows must be at least 2 (a diagonal and an off-diagonal) and --batch-size at least 1; "
                         f"got {num_windows} and {batch_size}.")
    pc = model.config.prior_config
    known = model.normalizer.embodiment_names
    corpora = [load_lerobot_dataset(p) for p in dataset_paths]
    for ds in corpora:
        if ds.embodiment.name not in known:
            raise UnknownEmbodimentError(
                f"Dataset {ds.root} is of embodiment {ds.embodiment.name!r}, but the model has statistics only for: "
                f"{', '.join(known)}. Pass datasets of the robots this VLA was trained on.")
        if not ds.meta.camera_keys:
            raise ValueError(f"Dataset {ds.root} has no camera images; the VLM's latent needs observations.")
    camera = camera or VLAWindowDataset.camera_name(corpora[0].meta.camera_keys[0])
    splits = [split_episodes(ds.num_episodes, val_fraction, split_seed,
                             episodes=select_episodes(ds, max_episodes_per_task))[1] if val_fraction > 0 else []
              for ds in corpora]
    held_out = all(len(v) for v in splits)
    # Window contents as train_stage2.py builds them (no state: the training script feeds none).
    sets = []
    for ds, val in zip(corpora, splits):
        try:
            sets.append(VLAWindowDataset(ds, model.normalizer, history=pc.history_length, chunk=pc.chunk_size,
                                         episodes=val if held_out else None, cameras=[camera]))
        except KeyError as e:
            raise ValueError(f"{e.args[0]} Pass --camera with the camera the VLA was trained on.") from None

    # Candidates per (embodiment, task): (dataset, sample index, episode, frame).
    groups: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
    for d, ws in enumerate(sets):
        start = 0
        for ep in ws.episodes:
            length = int(ws.dataset.episode_lengths[ep])
            task = ws.dataset.meta.episode_task(int(ep)) or "(no task)"
            groups.setdefault((ws.embodiment, task), []).extend(
                (d, start + t, int(ep), t) for t in range(length))
            start += length
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    chosen = []
    for key, k in zip(keys, allocate([len(groups[key]) for key in keys], num_windows)):
        picks = rng.choice(len(groups[key]), size=k, replace=False)
        chosen.extend((*key, *groups[key][i]) for i in sorted(picks))

    samples = [sets[d][i] for *_, d, i, _, _ in chosen]
    batches = []
    for lo in range(0, len(samples), batch_size):
        part = samples[lo:lo + batch_size]
        batch = collate_windows([{k: v for k, v in s.items() if k != IMAGE} for s in part])
        batch.update(processor(images=[s[IMAGE][camera] for s in part], text=[s[INSTRUCTION] for s in part]))
        batches.append(batch)
    return Windows(embodiment=[c[0] for c in chosen], task=[c[1] for c in chosen],
                   dataset=[sets[c[2]].dataset.root for c in chosen], episode=[c[4] for c in chosen],
                   frame=[c[5] for c in chosen], batches=batches, held_out=held_out,
                   camera=camera)


# --------------------------------------------------------------------------------------------- latents
@torch.no_grad()
def collect_latents(model, windows: Windows) -> dict[str, np.ndarray]:
    """Both latents of every window: ``vlm_mean`` / ``vlm_logvar`` from ``model.encode`` (``p_VLM(z | o, l,
    z_hist)``) and ``prior_mean`` / ``prior_logvar`` from the frozen teacher on the window's past actions
    (``p_prior(z | a_<t)``, the KD target), each ``(N, d_z)`` float64, in ``windows`` order."""
    model.eval()
    dev = model.device
    vlm_dtype = model.base_vlm.dtype
    teacher_dtype = next(model.teacher.parameters()).dtype
    out: dict[str, list] = {"vlm_mean": [], "vlm_logvar": [], "prior_mean": [], "prior_logvar": []}
    for batch in windows.batches:
        b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        mean, logvar = model.encode(b[INPUT_IDS], b[PIXEL_VALUES].to(vlm_dtype), b[ATTENTION_MASK], b[HISTORY],
                                    b[HISTORY_MASK], b[DIM_MASK])
        p_mean, p_logvar = model.teacher(b[HISTORY].to(teacher_dtype), b[HISTORY_MASK], b[DIM_MASK])
        for k, v in zip(out, (mean, logvar, p_mean, p_logvar)):
            out[k].append(v.detach().double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def cosine_matrix(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(N, d)`` x ``(M, d)`` -> ``(N, M)`` cosine similarities (a zero vector has cosine 0 with everything)."""
    a = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    b = cols / np.maximum(np.linalg.norm(cols, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def alignment_stats(latents: dict[str, np.ndarray]) -> dict:
    """Summary of one model's latents: mean diagonal / off-diagonal cosine, their gap, top-1 retrieval (the share
    of VLM latents whose most similar prior latent is their own window's) and mean ``KL(p_VLM || p_prior)``."""
    cos = cosine_matrix(latents["vlm_mean"], latents["prior_mean"])
    n = cos.shape[0]
    diag = np.diag(cos)
    off = (cos.sum() - diag.sum()) / (n * n - n)
    kl = gaussian_kl_between(*(torch.from_numpy(latents[k]) for k in ("vlm_mean", "vlm_logvar", "prior_mean",
                                                                       "prior_logvar")))
    return {"diagonal_mean": float(diag.mean()), "off_diagonal_mean": float(off), "gap": float(diag.mean() - off),
            "top1_retrieval": float((cos.argmax(axis=1) == np.arange(n)).mean()), "mean_kl": float(kl.mean()),
            "cosine": cos}


def block_means(cos: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean of ``cos`` over each (row group, column group) block, groups given by a label per window:
    ``(sorted labels, (G, G) matrix)``. Diagonal blocks include the same-window pairs."""
    names = sorted(set(labels))
    idx = [np.flatnonzero(np.asarray(labels) == n) for n in names]
    return names, np.array([[cos[np.ix_(r, c)].mean() for c in idx] for r in idx])


def distillation_schedule(config) -> dict:
    """The KD schedule of a ``VLAWithPriorConfig``: its fields and ``zero_step``, the first step with
    ``lambda = 0`` (0 when there is no distillation at all)."""
    zero = config.distill_hold_steps + config.distill_decay_steps if config.distill_weight > 0 else 0
    return {"distill_weight": config.distill_weight, "hold_steps": config.distill_hold_steps,
            "decay_steps": config.distill_decay_steps, "decay": config.distill_decay, "zero_step": zero}


# --------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_cosine_matrix(cos: np.ndarray, windows: Windows, path: str, title: str) -> str:
    """Heatmap of ``cos`` ``(N, N)`` (rows: VLM latents, columns: prior latents); thin lines between tasks, thick
    lines between embodiments, one tick label per (embodiment, task) group."""
    plt = _pyplot()
    groups = windows.groups()
    fig, ax = plt.subplots(figsize=(9.0, 8.0), dpi=110)
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    n = cos.shape[0]
    for g, (emb, _, start, _) in enumerate(groups):
        if start == 0:
            continue
        thick = emb != groups[g - 1][0]
        for line in (ax.axhline, ax.axvline):
            line(start - 0.5, color="black", lw=1.6 if thick else 0.6, alpha=0.9 if thick else 0.6)
    centers = [(a + b - 1) / 2 for *_, a, b in groups]
    labels = [f"{emb} | {_short(task)}" for emb, task, _, _ in groups]
    ax.set_yticks(centers, labels, fontsize=7)
    ax.set_xticks(centers, labels, fontsize=7, rotation=60, ha="right")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_ylabel("VLM latent mean  μ_VLM(z | o, l, z_hist)  (window)")
    ax.set_xlabel("prior latent mean  μ_prior(z | a_<t)  (window)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_block_means(names: Sequence[str], mat: np.ndarray, path: str, title: str, what: str) -> str:
    """Annotated heatmap of a ``(G, G)`` block-mean matrix (rows: VLM latents of group, columns: prior latents)."""
    plt = _pyplot()
    g = len(names)
    side = min(3.0 + 0.7 * g, 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=110)
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
    if g <= 20:
        for i in range(g):
            for j in range(g):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(mat[i, j]) > 0.6 else "black")
    labels = [_short(s, 32) for s in names]
    ax.set_yticks(range(g), labels, fontsize=8)
    ax.set_xticks(range(g), labels, fontsize=8, rotation=45, ha="right")
    ax.set_ylabel(f"VLM latents ({what})")
    ax.set_xlabel(f"prior latents ({what})")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="mean cosine similarity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_over_training(rows: Sequence[dict], config, path: str, title: str) -> str:
    """Mean diagonal and off-diagonal cosine against step (left axis), ``lambda(step)`` (right axis), and a line
    where ``lambda`` reaches 0."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    sched = distillation_schedule(config)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.plot(steps, [r["diagonal_mean"] for r in rows], "o-", color="C0", label="same window (diagonal)")
    ax.plot(steps, [r["off_diagonal_mean"] for r in rows], "s--", color="C1", label="other windows (off-diagonal)")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean cosine(μ_VLM, μ_prior)")
    ax.grid(alpha=0.3)
    last = max([*steps, sched["zero_step"], 1])
    twin = ax.twinx()
    grid = np.unique(np.linspace(0, last, num=min(400, last + 1)).round().astype(int))
    twin.plot(grid, [config.distill_lambda(int(s)) for s in grid], color="0.45", lw=1.2, label="λ(step) (KD weight)")
    twin.set_ylabel("λ(step)", color="0.35")
    twin.set_ylim(bottom=0, top=max(config.distill_weight, 1e-3) * 1.1)
    if sched["distill_weight"] > 0:
        ax.axvline(sched["zero_step"], color="0.2", ls=":", lw=1.2, label=f"λ = 0 from step {sched['zero_step']}")
    else:
        ax.text(0.5, 0.02, "no distillation (distill_weight = 0)", transform=ax.transAxes, ha="center", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- report
def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(report: dict, out_dir: str) -> str:
    """``index.html``: the figures base64-embedded, the numbers as tables; nothing loaded from elsewhere."""
    def img(name):
        with open(os.path.join(out_dir, name), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    final = report["final"]
    metrics = ["diagonal_mean", "off_diagonal_mean", "gap", "top1_retrieval", "mean_kl"]
    parts = [
        f"<h1>Latent alignment: {html.escape(os.path.basename(os.path.abspath(report['model'])))}</h1>",
        "<p>Cosine similarity between the VLM's latent mean μ_VLM(z | o, l, z_hist) and the prior's latent mean "
        "μ_prior(z | a_&lt;t) (the frozen teacher on the window's past actions) on the same "
        f"{report['windows']['count']} {'held-out' if report['windows']['held_out'] else ''} windows, sorted by "
        "embodiment then task. The diagonal pairs a window with itself; off-diagonal entries are the contrast.</p>",
        "<h2>(a) Final model</h2>",
        _table([{"model": f"final (step {final['step']})", "λ": final["lambda"], **final}], ["model", "λ", *metrics]),
        img(report["figures"]["cosine_matrix"]),
        img(report["figures"]["per_task"]), img(report["figures"]["per_embodiment"]),
        "<h3>Per (embodiment, task) group</h3>",
        _table(report["groups"], ["embodiment", "task", "windows", "diagonal_mean", "off_diagonal_mean"]),
        "<h2>(b) Over training</h2>",
    ]
    if report["checkpoints"]:
        z = report["distillation"]["zero_step"]
        parts += [f"<p>λ(step) reaches 0 at step {z}.</p>" if report["distillation"]["distill_weight"] > 0
                  else "<p>This run has no distillation (distill_weight = 0).</p>",
                  img(report["figures"]["over_training"]),
                  _table(report["checkpoints"], ["step", "lambda", *metrics])]
    parts += [f"<p class=note>{html.escape(n)}</p>" for n in report["notes"]]
    parts.append("<h2>Inputs</h2>" + _table(
        [{"model": report["model"], "datasets": ", ".join(report["datasets"]), "camera": report["camera"],
          "split": f"val_fraction {report['split']['val_fraction']}, seed {report['split']['seed']}",
          "window seed": report["windows"]["seed"]}], ["model", "datasets", "camera", "split", "window seed"]))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>actprior latent alignment</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px}"
            "th{background:#eee}img{max-width:100%;display:block;margin:1em 0}.note{color:#555;font-style:italic}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = os.path.join(out_dir, REPORT_HTML)
    with open(path, "w") as f:
        f.write(page)
    return path


def visualize_latents(model: str, datasets: Sequence[str], out: str, num_windows: int = 128, batch_size: int = 16,
                      seed: int = 0, val_fraction: float | None = None, split_seed: int | None = None,
                      camera: str | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Draw (a) the latent cosine matrix of ``model``'s final VLA and (b) its diagonal over the run's checkpoints.

    Args:
        model: a train_stage2.py run folder (``final/`` + ``checkpoints/``) or a VLA model folder (then (b) is
            skipped with a note).
        datasets: LeRobot dataset folders (or folders of them) of robots the model has statistics for.
        out: folder for the PNGs, ``latent_alignment.json`` and ``index.html``.
        num_windows: windows drawn, balanced over (embodiment, task) groups, with ``seed``.
        val_fraction / split_seed / camera: the held-out split and camera; default: what the run recorded (else
            train_stage2.py's defaults).
    Returns:
        The report written to ``latent_alignment.json``.
    """
    from tqdm.auto import tqdm

    from .training import parse_dataset_specs

    run = find_run(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vla, processor = load_vla(run.final, device)
    if camera is None:
        camera = run.train_args.get("camera")
        recorded = os.path.join(run.final, "eval_results.json")
        if camera is None and os.path.isfile(recorded):
            with open(recorded) as f:
                camera = json.load(f).get("corpus", {}).get("camera")
    val_fraction = run.train_args.get("val_fraction", DEFAULT_VAL_FRACTION) if val_fraction is None else val_fraction
    split_seed = run.train_args.get("seed", DEFAULT_SPLIT_SEED) if split_seed is None else split_seed
    paths = [p for p, _ in parse_dataset_specs(list(datasets))]
    windows = held_out_windows(vla, processor, paths, num_windows, seed, val_fraction, split_seed, camera, batch_size,
                               int(run.train_args.get("max_episodes_per_task") or 0))
    notes = list(run.notes)
    if not windows.held_out:
        notes.append("Some dataset has no held-out episodes under this split (val_fraction "
                     f"{val_fraction}): windows are drawn from all episodes, including training ones.")
    os.makedirs(out, exist_ok=True)
    config = vla.config

    final_stats = alignment_stats(collect_latents(vla, windows))
    cos = final_stats.pop("cosine")
    final_step = _final_step(run.final)
    if final_step is None and run.checkpoints:
        final_step = run.checkpoints[-1][0]
    final_stats = {"step": final_step, "lambda": config.distill_lambda(final_step) if final_step is not None else None,
                   **final_stats}
    label = os.path.basename(os.path.abspath(model))
    step_text = f"step {final_step}" if final_step is not None else "final"
    figures = {"cosine_matrix": FIGURES["cosine_matrix"], "per_task": FIGURES["per_task"],
               "per_embodiment": FIGURES["per_embodiment"]}
    plot_cosine_matrix(cos, windows, os.path.join(out, FIGURES["cosine_matrix"]),
                       f"{label} ({step_text}): cosine(μ_VLM, μ_prior), {len(windows)} windows; "
                       f"diagonal {final_stats['diagonal_mean']:.3f} vs off-diagonal "
                       f"{final_stats['off_diagonal_mean']:.3f}")
    task_names, task_mat = block_means(cos, windows.task)
    emb_names, emb_mat = block_means(cos, windows.embodiment)
    plot_block_means(task_names, task_mat, os.path.join(out, FIGURES["per_task"]),
                     f"{label} ({step_text}): mean cosine per task", "task")
    plot_block_means(emb_names, emb_mat, os.path.join(out, FIGURES["per_embodiment"]),
                     f"{label} ({step_text}): mean cosine per embodiment", "embodiment")
    groups = []
    for emb, task, a, b in windows.groups():
        rows = cos[a:b]
        diag = np.diag(cos)[a:b]
        groups.append({"embodiment": emb, "task": task, "start": a, "stop": b, "windows": b - a,
                       "diagonal_mean": float(diag.mean()),
                       "off_diagonal_mean": float((rows.sum() - diag.sum()) / (rows.size - (b - a)))})

    over_training = []
    for step, folder in tqdm(run.checkpoints, desc="checkpoints", unit="ckpt", disable=not progress):
        load_checkpoint_weights(vla, folder)
        stats = alignment_stats(collect_latents(vla, windows))
        stats.pop("cosine")
        # lambda(step): the KD weight of the step after this checkpoint (steps 0..step-1 made it).
        over_training.append({"step": step, "lambda": config.distill_lambda(step), "checkpoint": folder, **stats})
    if over_training:
        figures["over_training"] = FIGURES["over_training"]
        plot_over_training(over_training, config, os.path.join(out, FIGURES["over_training"]),
                           f"{label}: latent alignment over training ({len(windows)} windows)")

    report = {
        "model": model, "final_dir": run.final, "datasets": paths, "camera": windows.camera,
        "split": {"val_fraction": val_fraction, "seed": split_seed},
        "windows": {"count": len(windows), "seed": seed, "held_out": windows.held_out,
                    "embodiment": windows.embodiment, "task": windows.task, "dataset": windows.dataset,
                    "episode": windows.episode, "frame": windows.frame},
        "final": final_stats,
        "diagonal": [round(float(x), 6) for x in np.diag(cos)],
        "cosine_matrix": [[round(float(x), 5) for x in row] for row in cos],
        "per_task": {"labels": task_names, "matrix": task_mat.round(6).tolist()},
        "per_embodiment": {"labels": emb_names, "matrix": emb_mat.round(6).tolist()},
        "groups": groups,
        "checkpoints": over_training,
        "distillation": distillation_schedule(config),
        "notes": notes,
        "figures": figures,
    }
    with open(os.path.join(out, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=1)
    write_html(report, out)
    return report


def _final_step(final: str) -> int | None:
    """The last logged step of a final/ folder (its eval_results.json history), or None."""
    path = os.path.join(final, "eval_results.json")
    if os.path.isfile(path):
        with open(path) as f:
            history = json.load(f).get("history") or []
        if history:
            return int(history[-1]["step"])
    return None


# --------------------------------------------------------------------------------------------- CLI
def add_viz_latents_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True,
                        help="a train_stage2.py run folder (final/ + checkpoints/) or a VLA folder (final/ alone)")
    parser.add_argument("--dataset", required=True, nargs="+",
                        help="LeRobot dataset folders with camera images (or folders of them)")
    parser.add_argument("--out", required=True, help="folder for the PNGs, latent_alignment.json and index.html")
    parser.add_argument("--windows", type=int, default=128, help="held-out windows, balanced over embodiment x task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the window draw")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"held-out share of episodes (default: the run's, else {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--split-seed", type=int, default=None,
                        help=f"seed of the episode split (default: the run's --seed, else {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--camera", default=None, help="camera the VLM sees (default: the run's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_viz_latents(args: argparse.Namespace) -> int:
    try:
        report = visualize_latents(args.model, args.dataset, args.out, args.windows, args.batch_size, args.seed,
                                   args.val_fraction, args.split_seed, args.camera, args.device, not args.no_progress)
    except (FileNotFoundError, ValueError, UnknownEmbodimentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = report["final"]
    print(f"final: diagonal {f['diagonal_mean']:.3f} | off-diagonal {f['off_diagonal_mean']:.3f} | top-1 "
          f"{f['top1_retrieval']:.2f} | KL {f['mean_kl']:.3g} over {report['windows']['count']} windows")
    for r in report["checkpoints"]:
        print(f"step {r['step']:>7} (λ {r['lambda']:.3g}): diagonal {r['diagonal_mean']:.3f} | off-diagonal "
              f"{r['off_diagonal_mean']:.3f}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"-> {os.path.join(args.out, REPORT_HTML)}")
    return 0


__all__ = ["Windows", "VLARun", "alignment_stats", "allocate", "block_means", "collect_latents", "cosine_matrix",
           "find_run", "held_out_windows", "load_checkpoint_weights", "load_vla", "visualize_latents"]
