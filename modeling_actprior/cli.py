"""The ``actprior`` command line: ``actprior <command> --help`` for each command's options."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help). Each module defines `add_<name>_arguments(parser)` and `run_<name>(args)`;
# modules import lazily so `actprior --help` stays fast and simulators load only when asked for.
COMMANDS = {
    "quickstart": ("modeling_actprior.quickstart", "the main job: generate a corpus, train the prior, evaluate, report"),
    "generate": ("modeling_actprior.sim.generate", "generate a LeRobot v3 dataset with scripted experts in a simulator"),
    "info": ("modeling_actprior.cli", "summarize a dataset folder or a checkpoint"),
    "evaluate": ("modeling_actprior.rollout", "closed-loop success rate of a VLA checkpoint in a simulator"),
    "push": ("modeling_actprior.hub", "publish a checkpoint (and its dataset) to the Hugging Face Hub with cards"),
    "viz-latents": ("modeling_actprior.viz", "plot how the VLA's latents align with the prior's, per task, embodiment "
                    "and checkpoint"),
}


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a LeRobot dataset folder or a checkpoint folder")


def run_info(args: argparse.Namespace) -> int:
    import json
    import os

    if os.path.isfile(os.path.join(args.path, "meta", "info.json")):
        from modeling_actprior.data import LeRobotDatasetMeta

        meta = LeRobotDatasetMeta(args.path)
        spec = meta.embodiment
        print(f"dataset {args.path}: robot {spec.name} ({spec.action_dim}-D {spec.control_mode}: "
              f"{', '.join(spec.action_names)}), {meta.num_episodes} episodes, {meta.num_frames} frames at "
              f"{meta.fps} fps, cameras: {', '.join(meta.camera_keys) or 'none'}")
        return 0
    if os.path.isfile(os.path.join(args.path, "config.json")):
        from transformers import AutoModel

        import modeling_actprior  # noqa: F401  (registers the model types)

        model = AutoModel.from_pretrained(args.path)
        norm = getattr(model, "normalizer", None)
        print(json.dumps({
            "model_type": model.config.model_type,
            "parameters": model.num_parameters(),
            "embodiments": norm.embodiment_names if norm is not None else [],
            "chunk_size": model.config.chunk_size,
            "history_length": getattr(model.config, "history_length", None),
        }, indent=2))
        return 0
    print(f"error: {args.path} is neither a LeRobot dataset (meta/info.json) nor a checkpoint (config.json)",
          file=sys.stderr)
    return 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``actprior`` parser. Only ``command``'s module is imported to add its options, so one command
    never pays for (or breaks on) another's heavy imports."""
    parser = argparse.ArgumentParser(prog="actprior", description="Action priors for cross-embodiment robot learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(module), f"add_{name.replace('-', '_')}_arguments")(p)
        p.set_defaults(_module=module, _run=f"run_{name.replace('-', '_')}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    result = getattr(importlib.import_module(args._module), args._run)(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
