"""Command-line options both training stages share: the argument groups, YAML config files (``--config``), the
model-config override fields (an explicit list, returned to the caller) and ``--dataset`` specs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Sequence

from ..argtypes import float_in, int_at_least


def parse_with_yaml(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.yaml`` act as defaults that the command line overrides.

    Unknown keys in the YAML file are an error naming them, so a typo never silently trains something else.
    """
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        import yaml

        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"{pre.config} must hold a mapping of option: value; got {type(values).__name__}.")
        known = set(vars(pre))  # every option's destination, with its default (argparse's public result)
        unknown = sorted(k for k in values if k.replace("-", "_") not in known)
        if unknown:
            parser.error(f"{pre.config}: unknown option(s) {unknown}. Valid options: {sorted(known - {'help', 'config'})}.")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


def add_training_arguments(parser: argparse.ArgumentParser, *, batch_size: int, learning_rate: float,
                           warmup_steps: int, eval_windows: int, val_loss: str) -> None:
    """The options both training stages share: resume/overwrite, optimization, precision, evaluation and
    checkpoint intervals, logging. Stage-specific defaults are passed in."""
    p = parser
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh even if --output_dir holds checkpoints of an earlier run (they are deleted)")
    p.add_argument("--batch_size", type=int_at_least(1), default=batch_size, help="windows per process per optimizer step")
    p.add_argument("--learning_rate", type=float_in(0, low_open=True), default=learning_rate)
    p.add_argument("--weight_decay", type=float_in(0), default=1e-4)
    p.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    p.add_argument("--warmup_steps", type=int_at_least(0), default=warmup_steps)
    p.add_argument("--gradient_accumulation_steps", type=int_at_least(1), default=1)
    p.add_argument("--max_grad_norm", type=float_in(0), default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: what `accelerate config` says (fp32 is fastest on CPU)")
    p.add_argument("--val_fraction", type=float_in(0, 1, high_open=True), default=0.1,
                   help="share of episodes held out, per dataset")
    p.add_argument("--max_episodes_per_task", type=int_at_least(0), default=0,
                   help="use only the first N episodes of each task of each dataset (0: all); for data-size studies")
    p.add_argument("--eval_every", type=int_at_least(0), default=250, help=f"validation {val_loss} every N steps (0: off)")
    p.add_argument("--checkpoint_every", type=int_at_least(1), default=500, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep_last", type=int_at_least(1), default=3, help="checkpoints kept on disk")
    p.add_argument("--eval_windows", type=int_at_least(1), default=eval_windows,
                   help="held-out windows per embodiment in the final evaluation")
    p.add_argument("--num_workers", type=int_at_least(0), default=0)
    p.add_argument("--log_every", type=int_at_least(1), default=10)
    p.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (accelerate trackers)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--allow_changed_options", default="", metavar="NAMES",
                   help="comma-separated options a resumed run may change on purpose (others are refused)")


def config_field_names(config_cls, skip: Sequence[str] = ()) -> list[str]:
    """The fields of a dataclass-style transformers config that get a ``--<field>`` override on the command line:
    its own plain fields (int, float, str, bool, or an optional number), not the base class's, not private ones, not
    its version tag, nor those in ``skip`` (set by other options)."""
    base = config_cls.__mro__[1]
    base_fields = {f.name for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else set()
    names = []
    for f in dataclasses.fields(config_cls):
        # "float | None" (an optional number) takes a number on the command line like "float" does.
        ftype = f.type.removesuffix(" | None") if isinstance(f.type, str) else f.type
        if (f.name in base_fields or f.name in skip or f.name.startswith("_") or f.name.endswith("_config_version")
                or ftype not in ("int", "float", "str", "bool", int, float, str, bool)):
            continue
        names.append(f.name)
    return names


def add_config_field_arguments(parser: argparse.ArgumentParser, config_cls, group_title: str,
                               skip: Sequence[str] = ()) -> list[str]:
    """One ``--<field>`` option per name of ``config_field_names(config_cls, skip)`` (default None: keep the
    preset's value); returns those names."""
    group = parser.add_argument_group(group_title)
    types = {f.name: (f.type.removesuffix(" | None") if isinstance(f.type, str) else f.type)
             for f in dataclasses.fields(config_cls)}
    names = config_field_names(config_cls, skip)
    for name in names:
        ftype = types[name]
        typ = {"int": int, "float": float, "str": str, "bool": str2bool}.get(ftype, ftype if ftype is not bool else str2bool)
        group.add_argument(f"--{name}", type=typ, default=None, help=f"override {config_cls.__name__}.{name}")
    return names


def str2bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_dataset_specs(specs: Sequence[str]) -> list[tuple]:
    """``["path", "path2:3.0"]`` -> ``[(path, 1.0), (path2, 3.0)]``. A folder holding several datasets
    (one per robot, as ``actprior generate`` writes) expands to each of them with the same weight."""
    out = []
    for spec in specs:
        path, weight = spec, 1.0
        m = re.match(r"^(.*):([0-9]*\.?[0-9]+)$", spec)
        if m and not os.path.exists(spec):
            path, weight = m.group(1), float(m.group(2))
        if weight <= 0:
            raise ValueError(f"Dataset weight must be positive; got {weight} in {spec!r}.")
        if os.path.isfile(os.path.join(path, "meta", "info.json")):
            out.append((path, weight))
            continue
        from ..sim.generate import INCOMPLETE_MARKER  # no simulator is imported with it

        marker = os.path.join(path, INCOMPLETE_MARKER)
        if os.path.isfile(marker):
            try:
                with open(marker) as f:
                    command = json.load(f).get("command", "the same `actprior generate` command")
            except (OSError, ValueError):
                command = "the same `actprior generate` command"
            raise ValueError(
                f"--dataset {spec!r}: this corpus is incomplete: the `actprior generate` run writing it was interrupted "
                f"before every robot was written ({marker}). Rerun the same generate command to finish it: {command}")
        # Hidden folders and a killed writer's leftovers (``<name>.tmp-<pid>``, ``<name>.old-<pid>``) are no datasets.
        subs = sorted(os.path.join(path, d) for d in (os.listdir(path) if os.path.isdir(path) else [])
                      if os.path.isfile(os.path.join(path, d, "meta", "info.json"))
                      and not d.startswith(".") and not re.search(r"\.(tmp|old)-\d+$", d))
        if not subs:
            raise FileNotFoundError(
                f"--dataset {spec!r}: no LeRobot dataset there (expected {path}/meta/info.json, or sub-folders that "
                "have one). Generate one with `actprior generate --sim metaworld --out DIR --episodes 5`."
            )
        out.extend((s, weight) for s in subs)
    return out


def jsonable(d: dict) -> dict:
    """The JSON-serializable plain values of ``d`` (e.g. parsed options for a trainer state)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
