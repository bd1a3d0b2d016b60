"""Stage 1: train the action prior on action trajectories alone, across embodiments.

    accelerate launch training_scripts/train_stage1.py --dataset data/corpus --output_dir runs/prior \
        --max_steps 2000 --model_preset small
    actprior-train-stage1 --config training_scripts/configs/stage1_small.yaml

The same file runs on one CPU process or on many GPUs (see ``training_scripts/configs/`` for accelerate
configs). What it leaves in ``--output_dir``:

* ``checkpoints/step-XXXXXX/``: model, optimizer, schedule and random states (safetensors + JSON, no pickle) and
  ``trainer_state.json``, written atomically;
  ``--resume_from_checkpoint latest`` continues with the same data order and learning-rate schedule;
* ``final/``: the trained prior (``save_pretrained``: safetensors, config, scheduler, normalization stats,
  remote-code files), ``eval_results.json``, ``loss_curve.png`` and a model card ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

import modeling_actprior as ap
from modeling_actprior.argtypes import MAX_SEED, int_at_least
from modeling_actprior.data import (
    ActionWindowDataset,
    MixtureDataset,
    collate_windows,
    fit_normalizer,
    load_lerobot_dataset,
    select_episodes,
    split_episodes,
)
from modeling_actprior.evaluation import evaluate_prior, mean_chunk
from modeling_actprior.training import (
    add_config_field_arguments,
    add_training_arguments,
    atomic_folder,
    check_chunk_fits,
    check_output_dir_writable,
    config_field_names,
    markdown_table,
    model_card_template,
    parse_dataset_specs,
    parse_with_yaml,
    plot_curves,
)
from modeling_actprior.training.loop import end_run, global_batch, make_accelerator, train

logger = logging.getLogger("actprior.stage1")

LOGGED = ("loss", "flow_loss", "kl_loss", "shortcut_loss")  # outputs averaged into the logs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of options (same names as below); the command line overrides it")
    p.add_argument("--dataset", nargs="+", required=False, default=None,
                   help="LeRobot dataset folders (or folders of them), each optionally PATH:WEIGHT for the mixture")
    p.add_argument("--output_dir", default="runs/stage1")
    p.add_argument("--max_steps", type=int_at_least(1), default=1000)
    p.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0)
    p.add_argument("--model_preset", choices=sorted(ap.ACTPRIOR_PRESETS), default="small")
    add_training_arguments(p, batch_size=64, learning_rate=3e-4, warmup_steps=100, eval_windows=1024,
                           val_loss="flow loss")
    p.add_argument("--normalization", choices=["quantile", "mean_std"], default="quantile")
    add_config_field_arguments(p, ap.ActionPriorConfig, "model config overrides (default: the preset's value)")
    return p


def build_config(args, field_names: Sequence[str]) -> ap.ActionPriorConfig:
    overrides = {k: getattr(args, k) for k in field_names if getattr(args, k, None) is not None}
    return ap.ActionPriorConfig.from_preset(args.model_preset, **overrides)


def build_data(args, config: ap.ActionPriorConfig):
    """Load corpora, split each by episode; normalization statistics come from each dataset's meta/stats.json
    (pooled per embodiment), as LeRobot does."""
    specs = parse_dataset_specs(args.dataset)
    corpora = [(load_lerobot_dataset(path), w) for path, w in specs]
    check_chunk_fits([ds for ds, _ in corpora], config.chunk_size, "--chunk_size")
    splits = [split_episodes(ds.num_episodes, args.val_fraction, args.seed,
                             episodes=select_episodes(ds, args.max_episodes_per_task)) for ds, _ in corpora]

    normalizer = fit_normalizer([ds for ds, _ in corpora], config.max_action_dim, mode=args.normalization)

    window_kw = dict(normalizer=normalizer, history=config.history_length, chunk=config.chunk_size,
                     include_state=config.max_state_dim > 0, max_state_dim=config.max_state_dim)
    train_sets, weights, val_sets = [], [], {}
    for (ds, w), (train_eps, val_eps) in zip(corpora, splits):
        train_sets.append(ActionWindowDataset(ds, episodes=train_eps, **window_kw))
        weights.append(w)
        if len(val_eps):
            val_sets.setdefault(ds.embodiment.name, []).append(ActionWindowDataset(ds, episodes=val_eps, **window_kw))
    summary = {
        "datasets": [{"path": ds.root, "embodiment": ds.embodiment.name, "episodes": len(tr) + len(va),
                      "frames": int(ds.episode_lengths[list(tr) + list(va)].sum()), "weight": w, "train_episodes": len(tr), "val_episodes": len(va)}
                     for (ds, w), (tr, va) in zip(corpora, splits)],
    }
    return train_sets, weights, val_sets, normalizer, summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_with_yaml(parser, argv)
    if not args.dataset:
        parser.error("--dataset is required (on the command line or in --config).")
    field_names = config_field_names(ap.ActionPriorConfig)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # An impossible config or unusable data fails here, before anything is written to --output_dir.
    set_seed(args.seed, device_specific=False)
    config = build_config(args, field_names)
    train_sets, weights, val_sets, normalizer, corpus = build_data(args, config)

    accelerator = make_accelerator(args)
    if accelerator.is_main_process:
        check_output_dir_writable(args.output_dir)

    # ---------------------------------------------------------------- build
    per_step, total_windows = global_batch(args, accelerator, train_sets, "generate more episodes")
    # An epoch is a whole number of global batches, drawn from the datasets with the mixture weights.
    train_data = MixtureDataset(train_sets, weights, num_samples=total_windows // per_step * per_step, seed=args.seed)
    model = ap.ActionPriorModel(config)
    model.normalizer = normalizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                                 num_training_steps=args.max_steps)
    # The LR scheduler is stepped once per optimizer step by the loop (not by accelerate, which would step it once
    # per process), and saved with the model and optimizer in every checkpoint.
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        logger.info("corpus: %s", json.dumps(corpus["datasets"]))
        logger.info("model: %d parameters (%s preset); %d training windows",
                    accelerator.unwrap_model(model).num_parameters(), args.model_preset, total_windows)

    # ---------------------------------------------------------------- train
    result, history = train(args, accelerator, stage="stage1", model=model, optimizer=optimizer,
                            lr_scheduler=lr_scheduler, train_data=train_data, collate=collate_windows,
                            val_sets=val_sets, val_loss="flow_loss", logged=LOGGED)
    if not result["interrupted"]:
        result.update(_finish(args, accelerator, model, config, corpus, history, val_sets, train_sets))
    return end_run(args, accelerator, result)


def _finish(args, accelerator, model, config, corpus, history, val_sets, train_sets) -> dict:
    """Evaluate on held-out episodes, save the final model with its card and plots (main process)."""
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(model)
    final = os.path.join(args.output_dir, "final")
    by_emb: dict[str, list] = {}
    for ds in train_sets:
        by_emb.setdefault(ds.embodiment, []).append(ds)
    mean_chunks = {emb: mean_chunk(torch.utils.data.ConcatDataset(sets), collate_windows, seed=args.seed)
                   for emb, sets in by_emb.items()}
    evaluation = evaluate_prior(model, val_sets, mean_chunks, collate_windows, max_windows=args.eval_windows,
                                seed=args.seed, progress=not args.no_progress) if val_sets else {}
    with atomic_folder(final) as folder:  # all or nothing: an earlier final/ is replaced once this one is complete
        model.save_pretrained(folder)
        curve = plot_curves(history, ["loss", "flow_loss", "val_flow_loss"], os.path.join(folder, "loss_curve.png"),
                            "Stage 1 action prior")
        with open(os.path.join(folder, "eval_results.json"), "w") as f:
            json.dump({"evaluation": evaluation, "corpus": corpus, "history": history}, f, indent=2)
        _write_card(folder, model, config, corpus, evaluation, history, args, curve)
    for emb, row in evaluation.items():
        logger.info("%s: prior MSE %.4f | repeat-last %.4f | mean-chunk %.4f | active dims %d",
                    emb, row["prior_mse"], row["repeat_last_mse"], row["mean_chunk_mse"], row["active_dims"])
    return {"final": final, "evaluation": evaluation}


def _write_card(final, model, config, corpus, evaluation, history, args, curve) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    embodiments = sorted({d["embodiment"] for d in corpus["datasets"]})
    rows = [{"embodiment": e, **{k: evaluation[e][k] for k in ("windows", "prior_mse", "repeat_last_mse",
                                                               "mean_chunk_mse", "prior_l1", "active_dims")}}
            for e in sorted(evaluation)]
    data = ModelCardData(library_name="transformers", pipeline_tag="robotics", license="apache-2.0",
                         tags=["robotics", "action-prior", "flow-matching", "actprior", *embodiments])
    card = ModelCard.from_template(
        data, template_path=model_card_template("actprior_prior.md"),
        embodiments=embodiments,
        corpus_table=markdown_table(corpus["datasets"], ["embodiment", "episodes", "frames", "train_episodes",
                                                         "val_episodes", "weight"]),
        total_episodes=sum(d["episodes"] for d in corpus["datasets"]),
        total_frames=sum(d["frames"] for d in corpus["datasets"]),
        eval_table=markdown_table(rows, ["embodiment", "windows", "prior_mse", "repeat_last_mse", "mean_chunk_mse",
                                         "prior_l1", "active_dims"]) if rows else "_no held-out episodes_",
        config_json=json.dumps({k: v for k, v in config.to_diff_dict().items() if k not in ("auto_map",)}, indent=2),
        parameters=model.num_parameters(),
        steps=history[-1]["step"] if history else 0,
        final_loss=history[-1]["loss"] if history else float("nan"),
        loss_curve="loss_curve.png" if curve else None,
        command="accelerate launch training_scripts/train_stage1.py " + " ".join(sys.argv[1:]),
    )
    card.save(os.path.join(final, "README.md"))


def cli() -> int:
    """The console script ``actprior-train-stage1`` (exit status 0; errors raise)."""
    main()
    return 0


if __name__ == "__main__":
    main()
