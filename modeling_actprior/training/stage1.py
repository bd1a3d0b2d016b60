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
import time
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
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
    PreemptionGuard,
    add_config_field_arguments,
    add_training_arguments,
    atomic_folder,
    check_chunk_fits,
    check_finite_loss,
    check_output_dir_writable,
    close_distributed,
    config_field_names,
    endless_batches,
    fixed_val_batches,
    jsonable,
    markdown_table,
    model_card_template,
    parse_dataset_specs,
    parse_with_yaml,
    plot_curves,
    ranks_agree,
    save_checkpoint,
    start_or_resume,
    to_device,
    validation_loss,
    write_json,
)

logger = logging.getLogger("actprior.stage1")


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

    accelerator = Accelerator(
        # Without any accelerator device, say so: then `--multi_gpu --num_processes N` is real DDP over gloo.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if accelerator.is_main_process:
        check_output_dir_writable(args.output_dir)

    # ---------------------------------------------------------------- build
    per_step = args.batch_size * accelerator.num_processes
    total_windows = sum(len(t) for t in train_sets)
    if per_step * args.gradient_accumulation_steps > total_windows:
        raise ValueError(
            f"A global batch of {per_step * args.gradient_accumulation_steps} windows (batch_size {args.batch_size} x "
            f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation) exceeds the "
            f"{total_windows} training windows of the corpus. Lower --batch_size or generate more episodes."
        )
    # An epoch is a whole number of global batches, drawn from the datasets with the mixture weights.
    train_data = MixtureDataset(train_sets, weights, num_samples=total_windows // per_step * per_step, seed=args.seed)
    model = ap.ActionPriorModel(config)
    model.normalizer = normalizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                                 num_training_steps=args.max_steps)
    # The LR scheduler is stepped once per optimizer step by us (not by accelerate, which would step it once per
    # process), and saved with the model and optimizer in every checkpoint.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)

    step, history = start_or_resume(accelerator, args.output_dir, args.resume_from_checkpoint,
                                    args.overwrite_output_dir, **state, options=jsonable(vars(args)))

    consumed = step * args.gradient_accumulation_steps * per_step
    batches = endless_batches(train_data, args.batch_size, consumed, accelerator.process_index,
                              accelerator.num_processes, collate_windows, args.num_workers)
    val_batches = fixed_val_batches(val_sets, args.batch_size, collate_windows, seed=args.seed)

    if accelerator.is_main_process:
        accelerator.init_trackers("actprior-stage1", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})
        logger.info("corpus: %s", json.dumps(corpus["datasets"]))
        logger.info("model: %d parameters (%s preset); %d training windows", model.num_parameters()
                    if hasattr(model, "num_parameters") else 0, args.model_preset, total_windows)

    # ---------------------------------------------------------------- train
    guard = PreemptionGuard()
    start_step = step
    bar = tqdm(total=args.max_steps, initial=step, desc="stage1", disable=args.no_progress or not accelerator.is_main_process)
    model.train()
    data_wait = compute = 0.0
    running: dict[str, float] = {}
    interrupted = False
    while step < args.max_steps:
        for _ in range(args.gradient_accumulation_steps):
            t0 = time.perf_counter()
            batch = to_device(next(batches), accelerator.device)
            t1 = time.perf_counter()
            with accelerator.accumulate(model):
                out = model(**batch)
                check_finite_loss(out.loss, step, batch, args.output_dir)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            data_wait += t1 - t0
            compute += time.perf_counter() - t1
            for k in ("loss", "flow_loss", "kl_loss", "shortcut_loss"):
                if getattr(out, k) is not None:  # shortcut_loss: shortcut models only
                    running[k] = running.get(k, 0.0) + getattr(out, k).item() / args.gradient_accumulation_steps
        lr_scheduler.step()
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            logs = {k: v / args.log_every if step % args.log_every == 0 else v / (step % args.log_every)
                    for k, v in running.items()}
            logs.update(lr=lr_scheduler.get_last_lr()[0], data_wait_fraction=data_wait / max(1e-9, data_wait + compute))
            running = {}
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps) and val_batches:
                logs["val_flow_loss"] = validation_loss(model, val_batches, accelerator.device, args.seed, "flow_loss")
            accelerator.log(logs, step=step)
            history.append({"step": step, **{k: float(v) for k, v in logs.items()}})
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if bar.disable and accelerator.is_main_process:
                logger.info("step %d/%d %s", step, args.max_steps, " ".join(f"{k}={v:.4g}" for k, v in logs.items()))

        stop_now = guard.requested
        if step % args.checkpoint_every == 0 or step == args.max_steps or stop_now:
            save_checkpoint(accelerator, args.output_dir, step, {"history": history, "args": jsonable(vars(args))},
                            keep_last=args.keep_last, **state)
        if stop_now:
            logger.warning("SIGTERM received: checkpoint written at step %d; resume with --resume_from_checkpoint latest", step)
            interrupted = True
            break
    bar.close()
    guard.close()

    identical = ranks_agree(accelerator, model)
    steps_run = step - start_step
    result = {"step": step, "interrupted": interrupted, "ranks_identical": identical,
              "num_processes": accelerator.num_processes,
              "windows_per_second": steps_run * per_step * args.gradient_accumulation_steps / max(1e-9, data_wait + compute),
              "data_wait_fraction": data_wait / max(1e-9, data_wait + compute)}
    if not interrupted:
        result.update(_finish(args, accelerator, model, config, corpus, history, val_sets, train_sets))
    if accelerator.is_main_process:
        write_json(os.path.join(args.output_dir, "run_summary.json"), result)
    close_distributed(accelerator)
    return result


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
