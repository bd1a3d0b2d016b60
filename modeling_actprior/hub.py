"""Publishing to the Hugging Face Hub: ``actprior push``.

``actprior push --model RUN/final --repo-id org/actprior-vla [--results results.json] [--dataset DATA
--dataset-repo-id org/actprior-demos]``

A model repo holds everything to run the checkpoint without this package: weights (safetensors), ``config.json``
with ``auto_map`` and ``custom_pipelines`` (the ``robot-action`` pipeline), the code files, the processor
(image processor, tokenizer), ``scheduler/``, ``action_normalizer.json``, and a card rendered from
``model_cards/actprior_vla.md`` whose YAML metadata carries a ``model-index`` with the closed-loop success rates
of ``results.json`` (``actprior evaluate``), next to its success chart and one rollout GIF.

A dataset repo holds a LeRobot v3 dataset (or one per embodiment) and a card rendered from
``model_cards/dataset_card.md`` from ``meta/info.json`` (embodiments, tasks, episodes, frames, fps, provenance).

Pushing is idempotent: the folder is staged deterministically and ``upload_folder`` skips files whose content the
repo already has, so pushing the same folder twice makes no second commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

PIPELINE_FILE = "robot_action.py"
PIPELINE_TASK = "robot-action"
#: transformers' own format (``Pipeline.save_pretrained`` writes the same): "module.Class" inside the repo.
CUSTOM_PIPELINES = {PIPELINE_TASK: {"impl": "robot_action.RobotActionPipeline", "pt": ["AutoModel"],
                                    "type": "multimodal"}}
EVAL_FOLDER = "eval"
# Never staged from a checkpoint folder: training state, pickles, the old card and eval files (rebuilt here).
MODEL_IGNORE = ["checkpoints", "*.bin", "*.pt", "*.pth", "optimizer*", "README.md", EVAL_FOLDER]
LICENSE = "apache-2.0"


# ------------------------------------------------------------------------------------------ export
def pipeline_source_file() -> str:
    """Path of the ``robot-action`` pipeline module (copied beside exported weights)."""
    from pipelines import robot_action

    return os.path.abspath(robot_action.__file__)


def add_pipeline_files(folder: str | os.PathLike) -> None:
    """Copy the pipeline file into a saved checkpoint ``folder`` and name it in ``config.json`` (``custom_pipelines``),
    so ``pipeline("robot-action", model=folder, trust_remote_code=True)`` works where actprior is not installed."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no config.json; save the model there first (model.save_pretrained).")
    with open(config_path) as f:
        config = json.load(f)
    if not config.get("auto_map"):
        raise ValueError(
            f"{config_path} has no auto_map, so the checkpoint would not load without actprior installed. Save it with "
            "this package's save_pretrained (`import modeling_actprior` registers the code files)."
        )
    target = os.path.join(folder, PIPELINE_FILE)
    if os.path.lexists(target):  # never write through a hard link into the folder it was staged from
        os.remove(target)
    shutil.copyfile(pipeline_source_file(), target)
    config["custom_pipelines"] = json.loads(json.dumps(CUSTOM_PIPELINES))
    os.remove(config_path)
    with open(config_path, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_for_hub(model, processor, out_dir: str | os.PathLike) -> str:
    """``save_pretrained`` of the VLA and its processor into ``out_dir``, plus the pipeline file and
    ``custom_pipelines``: a self-contained folder for ``trust_remote_code=True`` loading (model and pipeline)."""
    out_dir = os.fspath(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    add_pipeline_files(out_dir)
    return out_dir


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _stage_tree(src: str, dst: str, ignore: list[str] | None = None) -> None:
    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(*(ignore or []), "__pycache__", ".cache"))


# ------------------------------------------------------------------------------------------ model card
def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _count_parameters(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in f.keys():
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


def _base_models(prior: str | None, vlm: str | None) -> str | list[str] | None:
    """The card's ``base_model``: the prior's Hub id and the pretrained VLM's (local folders name nothing)."""
    found = [m for m in (prior, vlm) if m and not os.path.isdir(m)]
    return found[0] if len(found) == 1 else found or None


def _preset_name(config: dict) -> str:
    from .configuration_actprior_vla import VLA_PRESETS

    vision = config.get("vlm_config", {}).get("vision_config", {})
    text = config.get("vlm_config", {}).get("text_config", {})
    for name, (v, t, _, _) in VLA_PRESETS.items():
        if all(vision.get(k) == val for k, val in v.items() if k != "model_type") and \
                text.get("hidden_size") == t.get("hidden_size") and text.get("num_hidden_layers") == t.get("num_hidden_layers"):
            return name
    return "custom"


def _baseline_name(config: dict) -> str:
    from .configuration_actprior_vla import VLA_BASELINES

    def matches(switches):
        return all(config.get(k) == v for k, v in switches.items())

    # Most specific first: "full" only fixes two switches.
    for name in sorted(VLA_BASELINES, key=lambda n: -len(VLA_BASELINES[n])):
        if matches(VLA_BASELINES[name]) and (name != "kd_only" or config.get("distill_weight", 0) > 0):
            return name
    return "custom"


def rollout_rows(results: dict) -> list[dict]:
    """Per-task rows (and ``overall``) of an ``actprior evaluate`` results dict, for tables."""
    rows = []
    for r in [*results["tasks"], {"task": "overall", **results["overall"]}]:
        steps = r.get("mean_steps_to_success")
        rows.append({"task": r["task"], "episodes": r["episodes"], "successes": r["successes"],
                     "success rate": f"{r['success_rate']:.3f}",
                     "95% CI": f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]",
                     "mean steps to success": f"{steps:.1f}" if steps is not None else "-"})
    return rows


def eval_results_for_card(results: dict) -> list:
    """``model-index`` entries: the success rate per task and overall, with the interval in the metric name."""
    from huggingface_hub import EvalResult

    sim = results["sim"]
    out = []
    for r in [*results["tasks"], {"task": "all tasks", **results["overall"]}]:
        out.append(EvalResult(
            task_type="robotics", task_name="Closed-loop robot manipulation",
            dataset_type=sim, dataset_name=f"{sim} {r['task']}", dataset_config=r["task"], dataset_split="eval",
            metric_type="success_rate", metric_value=round(float(r["success_rate"]), 4),
            metric_name=f"success rate ({r['episodes']} episodes, 95% CI [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}])",
        ))
    return out


def build_model_card(folder: str, repo_id: str | None = None, results: dict | None = None,
                     dataset_repo_id: str | None = None, base_model: str | None = None,
                     success_chart: str | None = None, rollout_gif: str | None = None, license: str = LICENSE,
                     command: str | None = None, prior: str | None = None):
    """The VLA's card (``huggingface_hub.ModelCard``) from ``model_cards/actprior_vla.md``, for checkpoint ``folder``:
    the one renderer of that card, for the training script's ``final/`` and for the Hub.

    Training facts come from the folder (``config.json``, ``action_normalizer.json``, the training script's
    ``eval_results.json`` and card); closed-loop numbers from ``results`` (an ``actprior evaluate`` dict).
    ``command``: the training command (default: the one the folder's card records); ``prior``: where the Stage-1
    prior came from (default ``base_model``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .training import markdown_table, model_card_template

    config = _read_json(os.path.join(folder, "config.json")) or {}
    norm = _read_json(os.path.join(folder, "action_normalizer.json")) or {}
    training = _read_json(os.path.join(folder, "eval_results.json")) or {}
    embodiments = sorted(norm.get("stats", {})) or ["(none)"]
    vlm_type = config.get("vlm_config", {}).get("model_type", "unknown")
    data = ModelCardData(
        library_name="transformers", pipeline_tag="robotics", license=license,
        tags=["robotics", "vision-language-action", "action-prior", "flow-matching", "actprior", vlm_type,
              *[e for e in embodiments if e != "(none)"]],
        datasets=[dataset_repo_id] if dataset_repo_id else None,
        # The prior and, when Stage 2 started from one, the pretrained VLM (a Hub id; a local folder names nothing).
        base_model=_base_models(base_model, config.get("base_vlm")),
        model_name=repo_id.split("/")[-1] if results and repo_id else None,
        eval_results=eval_results_for_card(results) if results else None,
    )
    switches = {k: config.get(k) for k in ("use_prior_decoder", "history_token", "freeze_history_encoder",
                                           "distill_weight", "distill_hold_steps", "distill_decay_steps",
                                           "distill_decay", "latent_conditioning", "action_head_lr_multiplier")}
    corpus, evaluation, history = training.get("corpus") or {}, training.get("evaluation") or {}, training.get("history") or []
    adapters = _read_json(os.path.join(folder, "lora_adapters", "adapter_config.json"))
    old_card = os.path.join(folder, "README.md")
    if command is None and os.path.isfile(old_card):  # the training command, as the training script wrote it
        found = re.search(r"```bash\n(accelerate launch [^\n]*)\n```", open(old_card).read())
        command = found.group(1) if found else None
    kwargs: dict[str, Any] = dict(
        embodiments=embodiments, vlm_type=vlm_type, baseline=_baseline_name(config),
        preset=f"pretrained VLM `{config['base_vlm']}`" if config.get("base_vlm") else _preset_name(config),
        prior=prior or base_model or "a Stage-1 ActionPriorModel",
        switches_table=markdown_table([{"switch": k, "value": v} for k, v in switches.items()], ["switch", "value"]),
        corpus_table=markdown_table(corpus["datasets"], ["embodiment", "episodes", "frames", "train_episodes",
                                                         "val_episodes", "weight"])
        if corpus.get("datasets") else "_not recorded with this checkpoint_",
        camera=corpus.get("camera", "front"),
        eval_table=markdown_table([{"embodiment": e, **evaluation[e]} for e in sorted(evaluation)],
                                  ["embodiment", "windows", "vla_mse", "repeat_last_mse"])
        if evaluation else "_no held-out episodes_",
        parameters=_count_parameters(folder),
        lora=(f"LoRA r={adapters.get('r')} (merged into the exported weights; adapters in `lora_adapters/`)"
              if adapters else "full fine-tuning (no LoRA)"),
        steps=history[-1]["step"] if history else 0,
        final_loss=history[-1]["loss"] if history else float("nan"),
        final_bc_loss=history[-1]["bc_loss"] if history else float("nan"),
        loss_curve="loss_curve.png" if os.path.isfile(os.path.join(folder, "loss_curve.png")) else None,
        command=command or "accelerate launch training_scripts/train_stage2.py ...  # (arguments not recorded)",
    )
    if results:
        s = results["settings"]
        kwargs.update(
            rollout_sim=results["sim"], rollout_episodes=s["episodes_per_task"], rollout_execute_steps=s["execute_steps"],
            rollout_table=markdown_table(rollout_rows(results), ["task", "episodes", "successes", "success rate",
                                                                 "95% CI", "mean steps to success"]),
            success_chart=success_chart, rollout_gif=rollout_gif,
            rollout_command=(f"actprior evaluate --model {repo_id} --sim {results['sim']} --tasks "
                             f"{','.join(t['task'] for t in results['tasks'])} --episodes {s['episodes_per_task']} "
                             f"--seed {s['seed']} --execute-steps {s['execute_steps']} --image-size {s['image_size']}"
                             + (f" --max-steps {s['max_steps']}" if s.get("max_steps") else "")),
        )
    return ModelCard.from_template(data, template_path=model_card_template("actprior_vla.md"), **kwargs)


def stage_model_folder(model_dir: str, out_dir: str, repo_id: str, results_path: str | None = None,
                       dataset_repo_id: str | None = None, base_model: str | None = None,
                       license: str = LICENSE) -> str:
    """Lay out the repo for ``model_dir`` in ``out_dir``: the checkpoint (files linked, not rewritten), the pipeline
    file and ``custom_pipelines``, ``eval/`` (results, chart, one GIF) and the rendered ``README.md``."""
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")) and not any(
            n.endswith(".safetensors") for n in os.listdir(model_dir)):
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights; point --model at a saved checkpoint.")
    # Files are hard-linked; the few rewritten here (config.json, the pipeline file) are replaced, never written through.
    _stage_tree(model_dir, out_dir, ignore=MODEL_IGNORE)
    add_pipeline_files(out_dir)
    results, chart, gif = None, None, None
    if results_path:
        results = _read_json(results_path)
        if results is None:
            raise FileNotFoundError(f"No results file at {results_path} (write one with `actprior evaluate --out`).")
        os.makedirs(os.path.join(out_dir, EVAL_FOLDER), exist_ok=True)
        base = os.path.dirname(os.path.abspath(results_path))
        if results.get("chart") and os.path.isfile(os.path.join(base, results["chart"])):
            chart = f"{EVAL_FOLDER}/success.png"
            shutil.copyfile(os.path.join(base, results["chart"]), os.path.join(out_dir, chart))
        videos = [v for v in results.get("videos", []) if v.endswith((".gif", ".mp4")) and os.path.isfile(v)]
        shared = []
        if videos:
            gif = f"{EVAL_FOLDER}/rollout.gif"
            if videos[0].endswith(".mp4"):  # the MP4 ships as is; the card shows a GIF of it (markdown plays no MP4)
                shared.append(f"{EVAL_FOLDER}/rollout.mp4")
                shutil.copyfile(videos[0], os.path.join(out_dir, shared[0]))
                _mp4_to_gif(videos[0], os.path.join(out_dir, gif))
            else:
                shutil.copyfile(videos[0], os.path.join(out_dir, gif))
            shared.append(gif)
        public = {**results, "model": repo_id, "chart": chart, "videos": shared}
        with open(os.path.join(out_dir, EVAL_FOLDER, "results.json"), "w") as f:
            f.write(json.dumps(public, indent=2) + "\n")
    card = build_model_card(model_dir, repo_id, results, dataset_repo_id, base_model, chart, gif, license)
    card.save(os.path.join(out_dir, "README.md"))
    return out_dir


def _mp4_to_gif(mp4: str, gif: str, max_frames: int = 300) -> str:
    """A GIF of an evaluation MP4 (its first ``max_frames`` frames), for the model card."""
    from PIL import Image

    from .data.video import decode_span, probe_video

    probe = probe_video(mp4)
    _, frames = decode_span(mp4, 0.0, min(probe.duration_s, max_frames / probe.fps))
    images = [Image.fromarray(f) for f in frames[:max_frames]]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=max(20, int(1000 / probe.fps)), loop=0)
    return gif


# ------------------------------------------------------------------------------------------ dataset card
def _dataset_roots(dataset_dir: str) -> list[str]:
    if os.path.isfile(os.path.join(dataset_dir, "meta", "info.json")):
        return [dataset_dir]
    roots = sorted(os.path.join(dataset_dir, d) for d in os.listdir(dataset_dir)
                   if os.path.isfile(os.path.join(dataset_dir, d, "meta", "info.json")))
    if not roots:
        raise FileNotFoundError(f"{dataset_dir} is not a LeRobot dataset (no meta/info.json) nor a folder of them.")
    return roots


def _tasks_of(root: str) -> list[str]:
    import pyarrow.parquet as pq

    path = os.path.join(root, "meta", "tasks.parquet")
    if not os.path.isfile(path):
        return []
    table = pq.read_table(path).to_pydict()
    for key in ("task", "__index_level_0__"):
        if key in table:
            return [str(t) for t in table[key]]
    return []


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def build_dataset_card(dataset_dir: str, repo_id: str, license: str = LICENSE):
    """The dataset's card (``huggingface_hub.DatasetCard``) from ``model_cards/dataset_card.md``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .training import markdown_table, model_card_template

    roots = _dataset_roots(dataset_dir)
    rel = [os.path.relpath(r, dataset_dir).replace(os.sep, "/") for r in roots]
    infos = [_read_json(os.path.join(r, "meta", "info.json")) for r in roots]
    emb_rows, task_rows, generation, cameras, sims, commands = [], [], [], set(), set(), []
    for root, sub, info in zip(roots, rel, infos):
        block = info.get("actprior", {})
        spec, gen = block.get("embodiment", {}), block.get("generator", {}) or {}
        name = spec.get("name", info.get("robot_type", "unknown"))
        emb_rows.append({"embodiment": name, "folder": sub if sub != "." else "(root)",
                         "action_dim": spec.get("action_dim", "?"),
                         "actions": ", ".join(spec.get("action_names", [])), "control": spec.get("control_mode", "?"),
                         "fps": info.get("fps"), "episodes": info.get("total_episodes"),
                         "frames": info.get("total_frames")})
        instructions = gen.get("instructions", {})
        by_text = {v: k for k, v in instructions.items()}
        for t in _tasks_of(root):
            task_rows.append({"embodiment": name, "task": by_text.get(t, "-"), "instruction": t})
        cameras.update(k.split(".")[-1] for k in info.get("features", {}) if k.startswith("observation.images."))
        if gen.get("sim"):
            sims.add(gen["sim"])
            success = block.get("success") or []
            generation.append(
                f"* `{name}`: scripted experts in **{gen['sim']}** ({', '.join(f'{k} {v}' for k, v in sorted(gen.get('versions', {}).items()))}), "
                f"{gen.get('episodes_per_task', '?')} episodes per task, base seed {gen.get('seed', '?')}, images "
                f"{gen.get('image_size') or 'none'}; only successful episodes are kept ({sum(map(bool, success))} of "
                f"{len(success)} recorded episodes succeeded).")
            if gen.get("command"):
                commands.append(gen["command"])
        else:
            generation.append(f"* `{name}`: no generator provenance recorded in `meta/info.json`.")
    frames = sum(int(i.get("total_frames", 0)) for i in infos)
    names = [r["embodiment"] for r in emb_rows]
    data = DatasetCardData(
        license=license, task_categories=["robotics"], size_categories=_size_category(frames),
        tags=["LeRobot", "actprior", "robotics", *sorted(sims), *names],
        pretty_name=repo_id.split("/")[-1],
        configs=[{"config_name": "default", "data_files": [
            {"split": "train", "path": (f"{s}/" if s != "." else "") + "data/*/*.parquet"} for s in rel]}],
    )
    return DatasetCard.from_template(
        data, template_path=model_card_template("dataset_card.md"),
        pretty_name=repo_id.split("/")[-1], repo_id=repo_id,
        description=("Robot demonstrations in the LeRobot v3 format for action-prior (actprior) training: "
                     f"{len(roots)} embodiment{'s' if len(roots) > 1 else ''} ({', '.join(names)})."),
        codebase_version=infos[0].get("codebase_version", "v3.0"),
        embodiments=names, episodes=sum(int(i.get("total_episodes", 0)) for i in infos), frames=frames,
        cameras=sorted(cameras),
        embodiment_table=markdown_table(emb_rows, ["embodiment", "folder", "action_dim", "actions", "control", "fps",
                                                   "episodes", "frames"]),
        task_table=markdown_table(task_rows, ["embodiment", "task", "instruction"]) if task_rows else "_no tasks recorded_",
        generation="\n".join(generation),
        command="\n".join(dict.fromkeys(commands)) or None,
    )


# ------------------------------------------------------------------------------------------ push
def _api(token=None, endpoint=None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _upload(api, folder: str, repo_id: str, repo_type: str, private: bool, message: str) -> dict:
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    before = api.repo_info(repo_id, repo_type=repo_type).sha
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type, commit_message=message)
    return {"repo_id": repo_id, "repo_type": repo_type, "commit": info.oid, "changed": info.oid != before,
            "url": info.commit_url}


def push_model(model_dir: str, repo_id: str, private: bool = False, results_path: str | None = None,
               dataset_repo_id: str | None = None, base_model: str | None = None, token: str | None = None,
               endpoint: str | None = None, license: str = LICENSE) -> dict:
    """Create ``repo_id`` (if needed) and upload the staged checkpoint; ``changed`` is False for a no-op push."""
    with tempfile.TemporaryDirectory(prefix="actprior-push-") as tmp:
        stage = stage_model_folder(model_dir, os.path.join(tmp, "repo"), repo_id, results_path, dataset_repo_id,
                                   base_model, license)
        return _upload(_api(token, endpoint), stage, repo_id, "model", private, "Upload actprior VLA checkpoint")


def push_dataset(dataset_dir: str, repo_id: str, private: bool = False, token: str | None = None,
                 endpoint: str | None = None, license: str = LICENSE) -> dict:
    """Create the dataset repo (if needed) and upload the LeRobot dataset(s) with a rendered card."""
    _dataset_roots(dataset_dir)  # fails early on a folder that is no dataset
    with tempfile.TemporaryDirectory(prefix="actprior-push-") as tmp:
        stage = os.path.join(tmp, "repo")
        _stage_tree(dataset_dir, stage, ignore=["README.md"])
        build_dataset_card(dataset_dir, repo_id, license).save(os.path.join(stage, "README.md"))
        return _upload(_api(token, endpoint), stage, repo_id, "dataset", private, "Upload actprior dataset")


# ------------------------------------------------------------------------------------------ CLI
def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="checkpoint folder to publish (a VLA's final/)")
    parser.add_argument("--repo-id", default=None, help="model repo, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repos private")
    parser.add_argument("--results", default=None, help="results.json of `actprior evaluate` for the card's model-index")
    parser.add_argument("--dataset", default=None, help="LeRobot dataset folder (or a folder of them) to publish")
    parser.add_argument("--dataset-repo-id", default=None, help="dataset repo, ORG/NAME")
    parser.add_argument("--base-model", default=None, help="Hub id of the Stage-1 prior (card metadata)")
    parser.add_argument("--license", default=LICENSE)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    return parser


def run_push(args: argparse.Namespace) -> int:
    if not args.model and not args.dataset:
        raise SystemExit("actprior push: give --model (with --repo-id) and/or --dataset (with --dataset-repo-id).")
    if args.model and not args.repo_id:
        raise SystemExit("actprior push: --model needs --repo-id ORG/NAME.")
    if args.dataset and not args.dataset_repo_id:
        raise SystemExit("actprior push: --dataset needs --dataset-repo-id ORG/NAME.")
    done = []
    if args.dataset:
        done.append(push_dataset(args.dataset, args.dataset_repo_id, args.private, args.token, args.endpoint,
                                 args.license))
    if args.model:
        from .checkpoint_paths import resolve_model_path

        model = resolve_model_path(args.model, "--model", None, "train_stage1.py or train_stage2.py makes one")
        if not os.path.isdir(model):
            raise SystemExit(f"actprior push: --model {args.model} must be a local folder to upload.")
        done.append(push_model(model, args.repo_id, args.private, args.results, args.dataset_repo_id,
                               args.base_model, args.token, args.endpoint, args.license))
    for d in done:
        print(f"{d['repo_type']} {d['repo_id']}: {'new commit ' + d['commit'] if d['changed'] else 'unchanged'} "
              f"({d['url']})")
    return 0


__all__ = ["CUSTOM_PIPELINES", "add_pipeline_files", "build_dataset_card", "build_model_card", "export_for_hub",
           "push_dataset", "push_model", "stage_model_folder"]
