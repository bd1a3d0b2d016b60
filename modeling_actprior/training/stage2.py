"""Stage 2: align a vision-language model to a trained action prior (VLA training).

    accelerate launch training_scripts/train_stage2.py --dataset data/demos --prior runs/prior/final \
        --output_dir runs/vla --max_steps 2000 --model_preset tiny --vlm_family llava
    actprior-train-stage2 --config my_stage2.yaml

The action head starts as the prior's decoder, the history token and the distillation teacher use the prior's
encoder, and the prior's normalization statistics are the VLA's (a dataset of an embodiment the prior has no
statistics for is an error). Baselines run through the same file: ``--baseline no_prior|decoder_only|kd_only|
no_history_token|full``, or the switches one by one (``--use_prior_decoder false``, ``--distill_weight 0``,
``--history_token false``...). The loss is ``bc_loss + lambda(step) * kd_loss``; the three are logged separately.

What it leaves in ``--output_dir`` (the same layout as Stage 1):

* ``checkpoints/step-XXXXXX/``: model, optimizer, schedule and random states (safetensors + JSON, no pickle) and
  ``trainer_state.json``, written atomically;
  ``--resume_from_checkpoint latest`` continues with the same data order and schedules;
* ``final/``: the VLA (``save_pretrained``: safetensors, config, scheduler, normalization stats, remote-code
  files), its processor (image processor, tokenizer), ``eval_results.json``, ``loss_curve.png``, a model card
  ``README.md`` and, with LoRA, the adapters in ``lora_adapters/`` (the exported weights are merged).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

import modeling_actprior as ap
from modeling_actprior.argtypes import MAX_SEED, int_at_least
from modeling_actprior.checkpoint_paths import resolve_model_path
from modeling_actprior.configuration_actprior_vla import VLA_BASELINES, VLA_PRESETS, VLM_FAMILIES
from modeling_actprior.data import (
    IMAGE,
    INSTRUCTION,
    MixtureDataset,
    VLAWindowDataset,
    collate_windows,
    load_lerobot_dataset,
    select_episodes,
    split_episodes,
)
from modeling_actprior.evaluation import repeat_last_action
from modeling_actprior.inputs import HISTORY, HISTORY_MASK
from modeling_actprior.training import (
    add_config_field_arguments,
    add_training_arguments,
    atomic_folder,
    check_chunk_fits,
    check_output_dir_writable,
    config_field_names,
    parse_dataset_specs,
    parse_with_yaml,
    plot_curves,
)
from modeling_actprior.training.loop import end_run, global_batch, make_accelerator, to_device, train

logger = logging.getLogger("actprior.stage2")

LOGGED = ("loss", "bc_loss", "kd_loss", "kd_weight", "shortcut_loss")


CONFIG_SKIP = ("base_vlm",)  # config fields without their own option: base_vlm is set by --vlm_name_or_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of options (same names as below); the command line overrides it")
    p.add_argument("--dataset", nargs="+", default=None,
                   help="LeRobot dataset folders with camera images (or folders of them), each optionally PATH:WEIGHT")
    p.add_argument("--prior", default=None, help="a trained Stage-1 prior (train_stage1.py's final/ folder or a Hub id)")
    p.add_argument("--output_dir", default="runs/stage2")
    p.add_argument("--max_steps", type=int_at_least(1), default=1000)
    p.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0)
    p.add_argument("--model_preset", choices=sorted(VLA_PRESETS), default="tiny", help="size of the VLM backbone")
    p.add_argument("--vlm_family", choices=VLM_FAMILIES, default="llava")
    p.add_argument("--vlm_name_or_path", default=None,
                   help="start from this pretrained VLM (local folder or Hub id of a LLaVA or PaliGemma checkpoint with "
                        "its processor) instead of a randomly initialized --model_preset / --vlm_family")
    p.add_argument("--baseline", choices=sorted(VLA_BASELINES), default=None,
                   help="a named set of the switches below (explicit switches override it)")
    p.add_argument("--camera", default=None, help="camera the VLM sees (default: the dataset's first camera)")
    add_training_arguments(p, batch_size=8, learning_rate=1e-4, warmup_steps=50, eval_windows=256, val_loss="BC loss")
    add_config_field_arguments(p, ap.VLAWithPriorConfig, "model config overrides (default: the preset's / baseline's value)",
                               skip=CONFIG_SKIP)
    return p


class VLACollator:
    """Window samples -> one batch: action windows stacked by ``collate_windows``; the chosen camera's images and
    the instructions turned into ``pixel_values`` / ``input_ids`` / ``attention_mask`` by the processor."""

    def __init__(self, processor: ap.ActionPriorProcessor, camera: str):
        self.processor, self.camera = processor, camera

    def __call__(self, samples: Sequence[dict]) -> dict:
        images = [s[IMAGE][self.camera] for s in samples]
        texts = [s[INSTRUCTION] for s in samples]
        batch = collate_windows([{k: v for k, v in s.items() if k != IMAGE} for s in samples])
        batch.update(self.processor(images=images, text=texts))
        return batch


def load_prior(path: str | None):
    """The Stage-1 prior with its statistics, or an error saying how to get one."""
    if not path:
        raise ValueError("--prior is required: the Stage-1 prior to build on (train one with train_stage1.py; "
                         "pass its final/ folder).")
    path = resolve_model_path(path, "--prior", "actprior", "train_stage1.py makes one")
    try:
        prior = ap.ActionPriorModel.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"--prior {path}: no prior there ({e.__class__.__name__}). Train one with "
                                "train_stage1.py and pass its final/ folder.") from None
    if prior.normalizer is None:
        raise ValueError(f"--prior {path} has no action_normalizer.json, so its action space is unknown. Use a prior "
                         "trained by train_stage1.py (it saves the statistics beside the weights).")
    return prior


def build_data(args, prior):
    """Demonstration datasets (with images), split by episode, windowed with the prior's normalizer."""
    specs = parse_dataset_specs(args.dataset)
    corpora = [(load_lerobot_dataset(path), w) for path, w in specs]
    check_chunk_fits([ds for ds, _ in corpora], prior.config.chunk_size, f"the prior's chunk_size (from {args.prior})")
    known = prior.normalizer.embodiment_names
    for ds, _ in corpora:
        if ds.embodiment.name not in known:
            raise ap.UnknownEmbodimentError(
                f"Dataset {ds.root} is of embodiment {ds.embodiment.name!r}, but the prior {args.prior} has statistics "
                f"only for: {', '.join(known)}. Train (or fine-tune) the prior on this robot's actions first."
            )
        if not ds.meta.camera_keys:
            raise ValueError(f"Dataset {ds.root} has no camera images; Stage 2 needs observations to train a VLA.")
    camera = args.camera or VLAWindowDataset.camera_name(corpora[0][0].meta.camera_keys[0])
    splits = [split_episodes(ds.num_episodes, args.val_fraction, args.seed,
                             episodes=select_episodes(ds, args.max_episodes_per_task)) for ds, _ in corpora]
    pc = prior.config
    window_kw = dict(normalizer=prior.normalizer, history=pc.history_length, chunk=pc.chunk_size, cameras=[camera])
    train_sets, weights, val_sets = [], [], {}
    for (ds, w), (train_eps, val_eps) in zip(corpora, splits):
        train_sets.append(VLAWindowDataset(ds, episodes=train_eps, **window_kw))
        weights.append(w)
        if len(val_eps):
            val_sets.setdefault(ds.embodiment.name, []).append(VLAWindowDataset(ds, episodes=val_eps, **window_kw))
    instructions = sorted({t for ds, _ in corpora for t in ds.meta.tasks if t})
    summary = {
        "datasets": [{"path": ds.root, "embodiment": ds.embodiment.name, "episodes": len(tr) + len(va),
                      "frames": int(ds.episode_lengths[list(tr) + list(va)].sum()), "weight": w, "train_episodes": len(tr), "val_episodes": len(va)}
                     for (ds, w), (tr, va) in zip(corpora, splits)],
        "camera": camera, "instructions": instructions,
    }
    return train_sets, weights, val_sets, summary


def build_optimizer(model: ap.VLAWithPriorForAction, args) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; the action head's learning rate is scaled by action_head_lr_multiplier."""
    head = {id(p) for p in model.action_head_parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    groups = [{"params": rest, "lr": args.learning_rate}]
    if head:
        groups.append({"params": model.action_head_parameters(),
                       "lr": args.learning_rate * model.config.action_head_lr_multiplier})
    return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_with_yaml(parser, argv)
    if not args.dataset:
        parser.error("--dataset is required (on the command line or in --config).")
    field_names = config_field_names(ap.VLAWithPriorConfig, CONFIG_SKIP)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Fail on a missing prior or unmatched data before any machinery starts.
    prior = load_prior(args.prior)
    train_sets, weights, val_sets, corpus = build_data(args, prior)

    accelerator = make_accelerator(args)
    if accelerator.is_main_process:
        check_output_dir_writable(args.output_dir)
    set_seed(args.seed, device_specific=False)

    # ---------------------------------------------------------------- build
    overrides = {k: getattr(args, k) for k in field_names if getattr(args, k, None) is not None}
    if args.vlm_name_or_path:
        model = ap.VLAWithPriorForAction.from_prior(prior, vlm=args.vlm_name_or_path, baseline=args.baseline,
                                                    **overrides)
        processor = ap.ActionPriorProcessor.from_vlm(args.vlm_name_or_path, model.config, model.normalizer)
    else:
        model = ap.VLAWithPriorForAction.from_prior(prior, args.model_preset, vlm_family=args.vlm_family,
                                                    baseline=args.baseline, **overrides)
        processor = ap.ActionPriorProcessor.from_config(model.config, model.normalizer,
                                                        instructions=corpus["instructions"])
    config = model.config
    per_step, total_windows = global_batch(args, accelerator, train_sets, "record more episodes")
    train_data = MixtureDataset(train_sets, weights, num_samples=total_windows // per_step * per_step, seed=args.seed)
    optimizer = build_optimizer(model, args)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                                 num_training_steps=args.max_steps)
    # The LR scheduler is stepped once per optimizer step by the loop (not by accelerate, which would step it once
    # per process), and saved with the model and optimizer in every checkpoint.
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        logger.info("corpus: %s", json.dumps(corpus["datasets"]))
        logger.info("model: %d parameters, %d trainable (%s %s, lora_r=%d); %d training windows",
                    unwrapped.num_parameters(), unwrapped.num_trainable_parameters(), args.model_preset,
                    args.vlm_family, config.lora_r, total_windows)

    # ---------------------------------------------------------------- train
    # The distillation weight lambda(step) follows the optimizer step, inside the model (saved with it).
    result, history = train(args, accelerator, stage="stage2", model=model, optimizer=optimizer,
                            lr_scheduler=lr_scheduler, train_data=train_data,
                            collate=VLACollator(processor, corpus["camera"]), val_sets=val_sets, val_loss="bc_loss",
                            logged=LOGGED, forward_kwargs=lambda step: {"step": step},
                            after_step=lambda step: unwrapped.training_step.fill_(step), postfix=("loss", "kd_weight"))
    if not result["interrupted"]:
        result.update(_finish(args, accelerator, model, processor, corpus, history, val_sets))
    return end_run(args, accelerator, result)


@torch.no_grad()
def evaluate_vla(model, val_sets, collate, max_windows: int, seed: int, batch_size: int) -> dict[str, dict]:
    """Held-out action error per embodiment (normalized units, masked MSE over real dims and steps) of the VLA's
    sampled chunks, next to holding the last past action."""
    model.eval()
    dev = model.device
    results = {}
    for emb in sorted(val_sets):
        ds = torch.utils.data.ConcatDataset(val_sets[emb])
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(ds), size=min(max_windows, len(ds)), replace=False)
        gen = torch.Generator(device=dev).manual_seed(seed)
        sums = {"vla": 0.0, "repeat_last": 0.0}
        count = 0.0
        for lo in range(0, len(idx), batch_size):
            b = collate([ds[int(i)] for i in idx[lo:lo + batch_size]])
            b = to_device(b, dev)
            pred = model.predict_action(**b, generator=gen)
            hold = repeat_last_action(b[HISTORY], b[HISTORY_MASK],
                                      model.config.prior_config.chunk_size)
            w = b["dim_mask"][:, None, :].float() * b["action_mask"][..., None].float()
            for name, p in (("vla", pred), ("repeat_last", hold)):
                sums[name] += float(((p.float() - b["actions"]) ** 2 * w).sum())
            count += float(w.sum())
        results[emb] = {"windows": int(len(idx)), **{f"{k}_mse": v / max(count, 1.0) for k, v in sums.items()}}
    return results


def _finish(args, accelerator, model, processor, corpus, history, val_sets) -> dict:
    """Evaluate on held-out episodes; save the VLA, its processor, card and plots into final/ (main process)."""
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(model)
    final = os.path.join(args.output_dir, "final")
    collate = VLACollator(processor, corpus["camera"])
    evaluation = evaluate_vla(model, val_sets, collate, args.eval_windows, args.seed, args.batch_size) if val_sets else {}
    lora_r = model.config.lora_r
    with atomic_folder(final) as folder:  # all or nothing: an earlier final/ is replaced once this one is complete
        if lora_r:
            # Adapters alone for further fine-tuning; merged weights in final/ so it loads without PEFT wrapping.
            model.save_lora_adapters(os.path.join(folder, "lora_adapters"))
            model.merge_lora()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        # A zero KD loss (after the schedule, or a baseline without KD) has no place on a log axis.
        plot_curves([{k: v for k, v in h.items() if not (k in ("kd_loss", "kd_weight") and v <= 0)}
                     for h in history], ["loss", "bc_loss", "kd_loss", "kd_weight", "val_bc_loss"],
                    os.path.join(folder, "loss_curve.png"), "Stage 2 VLA with action prior")
        with open(os.path.join(folder, "eval_results.json"), "w") as f:
            json.dump({"evaluation": evaluation, "corpus": corpus, "history": history}, f, indent=2)
        _write_card(folder, args)
    for emb, row in evaluation.items():
        logger.info("%s: VLA MSE %.4f | repeat-last %.4f", emb, row["vla_mse"], row["repeat_last_mse"])
    return {"final": final, "evaluation": evaluation}


def _write_card(final, args) -> None:
    """The model card of ``final/`` (the same renderer as the Hub's, from what the folder holds)."""
    from modeling_actprior.hub import build_model_card

    card = build_model_card(final, prior=args.prior,
                            command="accelerate launch training_scripts/train_stage2.py " + " ".join(sys.argv[1:]))
    card.save(os.path.join(final, "README.md"))


def cli() -> int:
    """The console script ``actprior-train-stage2`` (exit status 0; errors raise)."""
    main()
    return 0


if __name__ == "__main__":
    main()
