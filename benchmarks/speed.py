#!/usr/bin/env python
"""Speed of actprior: inference latency against transformers' PI0 at matched size, where the time goes, the cost
of the history token, training throughput against the data loader, and the machine's own limit.

    python benchmarks/speed.py --quick                 # tiny preset, 64 px, chunk 16 (a few minutes on 2 cores)
    python benchmarks/speed.py                         # tiny + small, 64 + 96 px, chunk 16 + 50
    python benchmarks/speed.py --update-docs           # ... and copy the report into docs/performance.md
    python benchmarks/speed.py --gpu-7b                # the openvla-7b section on a CUDA GPU (benchmarks/gpu_check.sh)

Sections (CPU, one process, threads pinned with --threads):

1. ``pipeline("robot-action")`` end to end, batch 1, one camera, 10 flow steps, per (preset, image size, chunk).
2. ``PI0ForConditionalGeneration`` (transformers) built from a tiny config at the same size: the same VLM towers
   (PaliGemma: SigLIP + Gemma, the dimensions of our preset) and a Gemma action expert sized so the parameters used at
   inference match ours. Timed model-only (``sample_actions``) and end to end (the same processor for image and text,
   ``sample_actions``, unnormalization: everything our pipeline does except what is ours alone).
3. Where our pipeline's time goes: processor (``pipeline.preprocess``), the VLM prefix (``model.encode``: one VLM
   forward), the flow loop (``model.sample_actions``: action head only), postprocessing (unnormalize).
4. History token on vs off: pipeline latency and a Stage-2 training step (forward, backward, clip, AdamW; batch 8);
   and ``predict_action`` on vs off as the language model grows (``HISTORY_VLM_SCALES``), the prior unchanged.
5. Training throughput: Stage 1 (``ActionPriorModel``, batch 64) and Stage 2 (VLA, batch 8) against the rate of the
   data loader over a synthetic corpus (``tests/synthetic.py``), in the same run.
6. fp32 matmul GFLOP/s of this machine and the model's achieved GFLOP/s (``FlopCounterMode``); and the rate at which
   batch-1 matrix-vector products stream float32 weights (GB/s), the bound of a flow step, which reads every weight of
   the action head once: section 3 reports the flow steps against that floor.

Variants compared are interleaved within each repetition (their order rotates), warm-up calls are not timed, and
every figure is a median with its interquartile range; ratios are medians of per-repetition (paired) ratios.
Contention: every repetition of every comparison also times a fixed probe (16 small linear layers); the probe's
median over its best time ("inflation") says how much other work on the machine slowed that comparison, and a run
whose worst inflation exceeds 1.3 is flagged as contended (rerun it when the machine is quieter).
Writes JSON (default ``benchmarks/results/speed.json``; ``speed_quick.json`` with ``--quick``; ``speed_gpu.json`` with
``--gpu-7b``) and the same report as a markdown file beside it (``speed.md``...: command, machine, threads, then the
tables, fit to include verbatim in the README), and prints the tables and the goals as PASS/FAIL lines. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "benchmarks", ROOT / "tests", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

INSTRUCTIONS = ["put the block in the bowl", "open the drawer", "reach the goal"]
EMBODIMENT = "xarm6"  # 7-D actions, a robot of the synthetic corpus
FLOW_STEPS = 10
FEW_STEPS = 2  # our few-step setting: a shortcut-trained action head (ActionPriorConfig.shortcut_max_steps)
PI0_FEW_STEPS = 3  # the step count transformers' PI0 docs sample with
SHORTCUT_MAX_STEPS = 16
D_MAX = 32

# The goals.
GOAL_PI0_RATIO = 0.5
GOAL_FLOW_SHARE = 0.20
GOAL_FEW_STEP_FLOW_SHARE = 0.08
GOAL_FEW_STEP_PI0_RATIO = 0.5
GOAL_HISTORY_OVERHEAD = 0.03
GOAL_LOADER_RATIO = 10.0

#: A run whose contention probe's median exceeds its best time by more than this factor is flagged as contended.
CONTENTION_LIMIT = 1.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, 64 px, chunk 16 only; fewer repetitions")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--presets", nargs="+", default=None, help="VLA presets for sections 1-3 (default tiny small)")
    p.add_argument("--image-sizes", nargs="+", type=int, default=None, help="default 64 96")
    p.add_argument("--chunks", nargs="+", type=int, default=None, help="default 16 50")
    p.add_argument("--vlm-family", default="paligemma", choices=["paligemma", "llava"],
                   help="our VLM family; paligemma (default) gives exactly PI0's VLM towers")
    p.add_argument("--train-preset", default="small", help="VLA preset of sections 4-5 (Stage-1 prior: same name)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per comparison (default 30; 12 quick)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["latency", "training"], choices=["latency", "training"],
                   help="latency: sections 1-3; training: sections 4-5 (6 always runs)")
    p.add_argument("--out", default=None)
    p.add_argument("--update-docs", "--update-readme", dest="update_readme", action="store_true",
                   help="copy the report into docs/performance.md (linked from the README) between <!-- speed:start --> "
                        "and <!-- speed:end -->")
    g = p.add_argument_group("GPU section (--gpu-7b)")
    g.add_argument("--gpu-7b", action="store_true", help="run only the GPU section (bf16, openvla-7b, LoRA)")
    g.add_argument("--device", default="cuda", help="device of the GPU section (cpu only for a dry run)")
    g.add_argument("--gpu-preset", default="openvla-7b", help="preset of the GPU section (tiny for a CPU dry run)")
    g.add_argument("--gpu-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--gpu-batch", type=int, default=8)
    g.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="measure nothing: rewrite the report (and with --update-docs the docs page) from a results "
                        "file of an earlier CPU run, its goals re-evaluated")
    args = p.parse_args(argv)
    if args.quick:
        args.presets = args.presets or ["tiny"]
        args.image_sizes = args.image_sizes or [64]
        args.chunks = args.chunks or [16]
        args.reps = args.reps or 12
    args.presets = args.presets or ["tiny", "small"]
    args.image_sizes = args.image_sizes or [64, 96]
    args.chunks = args.chunks or [16, 50]
    args.reps = args.reps or 30
    if args.out is None:
        name = "speed_gpu.json" if args.gpu_7b else "speed_quick.json" if args.quick else "speed.json"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    return args


# ------------------------------------------------------------------------------------------------ timing
def summarize(seconds) -> dict:
    a = np.asarray(seconds, dtype=float) * 1e3
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_ms": round(float(med), 3), "iqr_ms": round(float(q3 - q1), 3), "q1_ms": round(float(q1), 3),
            "q3_ms": round(float(q3), 3), "n": int(a.size)}


def paired_ratio(a, b) -> dict:
    """Median and IQR of per-repetition ratios a_i / b_i (the two were timed back to back in repetition i), and a
    bootstrap 95% interval of that median: how finely the run resolves the ratio."""
    r = np.asarray(a, dtype=float) / np.asarray(b, dtype=float)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    boot = np.median(np.random.default_rng(0).choice(r, size=(2000, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": round(float(med), 4), "iqr": round(float(q3 - q1), 4), "q1": round(float(q1), 4),
            "q3": round(float(q3), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "n": int(r.size)}


#: Probe timings per comparison (``interleave(..., label=...)``), summarized into the result's ``contention``.
PROBES: dict[str, list[float]] = {}


def _probe_workload():
    """A fixed CPU workload shaped like the models' (16 small linear + GELU + LayerNorm layers: short kernels, each a
    parallel region on all threads): its time varies only with what else the machine runs."""
    import torch
    import torch.nn.functional as F

    x, w = torch.ones(32, 256), torch.full((256, 256), 1.0 / 256)

    def probe():
        with torch.inference_mode():
            y = x
            for _ in range(16):
                y = F.layer_norm(F.gelu(F.linear(y, w)), (256,))
        return y

    return probe


def interleave(fns: dict, reps: int, warmup: int, sync=None, label: str | None = None) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, all variants once per repetition, rotating their order; ``warmup``
    untimed calls of each first. Returns ``{name: [seconds, ...]}``. With a ``label`` (CPU runs), the contention
    probe is timed once per repetition too and kept in ``PROBES[label]``."""
    names = list(fns)
    probe = _probe_workload() if label else None
    for _ in range(warmup):
        for n in names:
            fns[n]()
        if probe:
            probe()
    if sync:
        sync()
    times = {n: [] for n in names}
    probes = PROBES.setdefault(label, []) if label else None
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            if sync:
                sync()
            times[n].append(time.perf_counter() - t0)
        if probe:
            t0 = time.perf_counter()
            probe()
            probes.append(time.perf_counter() - t0)
    return times


def contention_summary() -> dict:
    """Per labelled comparison: the probe's median and best time (ms) and their ratio ("inflation")."""
    out = {}
    for label, t in PROBES.items():
        a = np.asarray(t) * 1e3
        out[label] = {"median_ms": round(float(np.median(a)), 4), "min_ms": round(float(a.min()), 4),
                      "inflation": round(float(np.median(a) / a.min()), 3), "n": int(a.size)}
    return out


def fmt(s: dict) -> str:
    return f"{s['median_ms']:.2f} ± {s['iqr_ms']:.2f}"


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f} [{r['q1']:.2f}, {r['q3']:.2f}]"


def fmt_ci(r: dict) -> str:
    lo, hi = r.get("ci95", (float("nan"), float("nan")))
    return f"[{lo:.3f}, {hi:.3f}]"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ models
def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def vla_dims(preset: str, image_size: int | None, image_token_id: int | None = None):
    """``(vision dict, text dict, image token id, prior preset)`` of a VLA preset, at ``image_size``."""
    from modeling_actprior.configuration_actprior_vla import VLA_PRESETS

    vision, text, tok, prior_preset = VLA_PRESETS[preset]
    vision = dict(vision, image_size=image_size or vision["image_size"])
    return vision, dict(text), tok if image_token_id is None else image_token_id, prior_preset


def vla_config(preset, family, image_size, chunk, image_token_id=None, text_overrides=None, prior_overrides=None,
               **overrides):
    """The VLA config of ``preset`` at ``image_size`` / ``chunk``; ``text_overrides`` change its language model (the
    history-token scaling of section 4 widens and deepens it), ``prior_overrides`` its prior (the few-step section's
    shortcut head), ``overrides`` the VLA config's own fields."""
    import modeling_actprior as ap
    from modeling_actprior.configuration_actprior_vla import _vlm

    vision, text, tok, prior_preset = vla_dims(preset, image_size, image_token_id)
    text.update(text_overrides or {})
    prior = ap.ActionPriorConfig.from_preset(prior_preset, chunk_size=chunk,
                                             **{"num_inference_steps": FLOW_STEPS, **(prior_overrides or {})})
    return ap.VLAWithPriorConfig(vlm_config=_vlm(family, vision, text, tok), prior_config=prior, **overrides)


def make_normalizer(d_max: int = D_MAX):
    import modeling_actprior as ap

    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(d_max)
    for name in (EMBODIMENT, "sawyer"):
        spec = ap.get_embodiment(name)
        norm.add_embodiment(spec, rng.normal(size=(500, spec.action_dim)) * 0.5 + 0.1)
    return norm


def build_vla(preset, family, image_size, chunk, seed=0, text_overrides=None, prior_overrides=None, **overrides):
    """A random VLA with statistics for two robots, and its processor."""
    import torch

    import modeling_actprior as ap

    torch.manual_seed(seed)
    model = ap.VLAWithPriorForAction(vla_config(preset, family, image_size, chunk, text_overrides=text_overrides,
                                                prior_overrides=prior_overrides, **overrides)).eval()
    model.normalizer = make_normalizer(model.config.prior_config.max_action_dim)
    processor = ap.ActionPriorProcessor.from_config(model.config, model.normalizer, instructions=INSTRUCTIONS)
    return model, processor


def flow_chunk_bytes(head) -> int:
    """Bytes of weights the conditioning reads once per chunk: every block's modulation layer and the latent MLP (the
    time embeddings of the step grid are cached across chunks)."""
    mats = [p for block in head.blocks for p in block.modulation.parameters()] + list(head.latent_mlp.parameters())
    return int(sum(m.numel() * m.element_size() for m in mats))


def flow_step_bytes(head) -> int:
    """Bytes of weights one flow step of the action head reads: the input layer's columns for the chunk, every block's
    MLP and the output layer (the latent, time and modulation layers run once per chunk, before the steps)."""
    flat = head.config.chunk_size * head.config.max_action_dim
    mats = [head.x_in.weight[:, :flat], head.out.weight, head.out.bias, head.x_in.bias]
    for block in head.blocks:
        mats += [p for p in block.mlp.parameters()]
    return int(sum(m.numel() * m.element_size() for m in mats))


def ours_param_split(model) -> dict:
    d = {"vlm": n_params(model.vlm), "action_head": n_params(model.action_head),
         "latent_readout": n_params(model.latent_readout) + model.latent_query.numel(),
         "history_token": (n_params(model.history_encoder) + n_params(model.history_projection))
         if model.config.history_token else 0,
         "teacher_training_only": n_params(model.teacher), "total": n_params(model)}
    d["active_inference"] = d["total"] - d["teacher_training_only"]
    d["action_side_active"] = d["active_inference"] - d["vlm"]
    return d


def pi0_param_split(pi0) -> dict:
    emb = pi0.model.dit.get_input_embeddings().weight.numel()
    d = {"vlm": n_params(pi0.model.vlm),
         "expert": n_params(pi0.model.dit) - emb + n_params(pi0.embed_action_time) + n_params(pi0.action_out_proj),
         "expert_unused_token_embedding": emb, "total": n_params(pi0)}
    d["active_inference"] = d["total"] - emb
    return d


def pi0_config(preset, image_size, chunk, expert_hidden, expert_ffn, image_token_id=None):
    """PI0 with the PaliGemma towers of our preset at ``image_size`` and a Gemma expert of the given width. The
    expert shares the VLM's layer count, KV heads and head dim (it attends to the VLM's per-layer KV cache)."""
    from transformers import PI0Config

    from modeling_actprior.configuration_actprior_vla import _vlm

    vision, text, tok, _ = vla_dims(preset, image_size, image_token_id)
    vlm = _vlm("paligemma", vision, text, tok)
    tc = vlm["text_config"]
    dit = {"model_type": "gemma", "hidden_size": int(expert_hidden), "intermediate_size": int(expert_ffn),
           "num_hidden_layers": tc["num_hidden_layers"], "num_attention_heads": tc["num_attention_heads"],
           "num_key_value_heads": tc["num_key_value_heads"], "head_dim": tc["head_dim"],
           "max_position_embeddings": tc["max_position_embeddings"]}
    return PI0Config(vlm_config=vlm, dit_config=dit, chunk_size=chunk, max_action_dim=D_MAX, max_state_dim=D_MAX,
                     num_inference_steps=FLOW_STEPS)


def size_pi0_expert(preset, image_size, chunk, ours_active: int, image_token_id=None) -> dict:
    """Width and FFN size of PI0's action expert so that PI0's parameters used at inference (all but the expert's
    unused token embedding) equal ``ours_active`` (ours: all but the training-only teacher). Counted on the meta
    device. Tries the VLM's width first, then halves it until a FFN of at least the width fits."""
    import torch
    from transformers import PI0ForConditionalGeneration

    def split(h, ffn):
        with torch.device("meta"):
            return pi0_param_split(PI0ForConditionalGeneration(pi0_config(preset, image_size, chunk, h, ffn,
                                                                          image_token_id)))

    width = vla_dims(preset, image_size)[1]["hidden_size"]
    best = None
    while width >= 16:
        a, b = split(width, 64), split(width, 64 + 1024)
        slope = (b["active_inference"] - a["active_inference"]) / 1024
        ffn = int(round((64 + (ours_active - a["active_inference"]) / slope) / 8) * 8)
        if ffn >= width:
            best = (width, ffn)
            break
        best = (width, max(ffn, 8))
        width //= 2
    width, ffn = best
    s = split(width, ffn)
    return {"expert_hidden": width, "expert_ffn": ffn, "pi0_active_inference": s["active_inference"],
            "mismatch": round(s["active_inference"] / ours_active - 1, 4)}


def build_pi0(preset, image_size, chunk, sizing, seed=0, image_token_id=None):
    import torch
    from transformers import PI0ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = pi0_config(preset, image_size, chunk, sizing["expert_hidden"], sizing["expert_ffn"], image_token_id)
    return PI0ForConditionalGeneration(cfg).eval()


# ------------------------------------------------------------------------------------------------ sections 1-3
def run_setting(args, preset, image_size, chunk, tmp) -> dict:
    import torch
    from flops import count_flops
    from transformers import pipeline

    from modeling_actprior.hub import export_for_hub

    tag = f"{preset}/{image_size}px/chunk{chunk}"
    print(f"[latency] {tag}: building", flush=True)
    model, processor = build_vla(preset, args.vlm_family, image_size, chunk)
    path = export_for_hub(model, processor, os.path.join(tmp, f"{preset}-{image_size}-{chunk}"))
    del model
    robot = pipeline("robot-action", model=path, device="cpu")
    ours = robot.model.eval()
    ours_split = ours_param_split(ours)
    sizing = size_pi0_expert(preset, image_size, chunk, ours_split["active_inference"])
    pi0 = build_pi0(preset, image_size, chunk, sizing)
    pi0_split = pi0_param_split(pi0)
    norm = robot.normalizer
    # Few-step: the same preset with a shortcut-trained action head (the step-size MLP runs once per time grid, not per
    # chunk), sampled with the shortcut solver; compared with PI0 at PI0_FEW_STEPS.
    fast_model, fast_processor = build_vla(preset, args.vlm_family, image_size, chunk, prior_overrides={
        "shortcut_max_steps": SHORTCUT_MAX_STEPS, "num_inference_steps": FEW_STEPS})
    fast_path = export_for_hub(fast_model, fast_processor, os.path.join(tmp, f"{preset}-{image_size}-{chunk}-fast"))
    del fast_model
    fast = pipeline("robot-action", model=fast_path, device="cpu")
    assert fast.model.scheduler.config.solver == "shortcut"
    # The same checkpoint with its action head in bfloat16 (the VLM stays float32): a flow step reads half the bytes,
    # which pays where the CPU multiplies bf16 matrix-vector products at least as fast per weight (section 6).
    fast16 = pipeline("robot-action", model=fast_path, device="cpu")
    fast16.model.action_head.to(torch.bfloat16)
    # The same two checkpoints with the flow loop compiled (``compile_flow``: one graph for the conditioning and both
    # steps); compiled here, before timing, as a robot would before its first chunk.
    print(f"[latency] {tag}: compiling the {FEW_STEPS}-step flow (fp32 and bf16 heads)", flush=True)
    compiled = {}
    for name, head_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = pipeline("robot-action", model=fast_path, device="cpu")
        pipe.model.action_head.to(head_dtype)
        t0 = time.perf_counter()
        pipe.model.compile_flow(num_inference_steps=FEW_STEPS)
        compiled[name] = (pipe, time.perf_counter() - t0)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    history = rng.normal(size=(ours.config.prior_config.history_length, 7)).astype(np.float32)
    instruction = INSTRUCTIONS[0]
    call = {"images": image, "instruction": instruction, "history": history, "embodiment": EMBODIMENT, "state": None}

    # The exact tensors the pipeline builds (for model-only timing and the breakdown).
    feats = robot.preprocess(dict(call), seed=0)
    model_inputs = {k: v for k, v in feats.items() if k not in ("embodiments", "batched")}
    pi0_feats = processor(images=[image], text=[instruction])
    pi0_inputs = {"input_ids": pi0_feats["input_ids"], "attention_mask": pi0_feats["attention_mask"],
                  "pixel_values": pi0_feats["pixel_values"][:, None],
                  "pixel_attention_mask": torch.ones(1, 1, dtype=torch.bool), "state": torch.zeros(1, D_MAX),
                  "noise": torch.randn(1, chunk, D_MAX, generator=torch.Generator().manual_seed(0))}
    width = norm.spec(EMBODIMENT).action_dim

    def ours_pipeline():
        return robot(image, instruction=instruction, history=history, embodiment=EMBODIMENT, seed=0,
                     num_inference_steps=FLOW_STEPS)

    def ours_model():
        return ours.predict_action(**model_inputs, num_inference_steps=FLOW_STEPS)

    def few_step_call(pipe):
        return lambda: pipe(image, instruction=instruction, history=history, embodiment=EMBODIMENT, seed=0,
                            num_inference_steps=FEW_STEPS)

    ours_pipeline_few, ours_pipeline_few_bf16 = few_step_call(fast), few_step_call(fast16)

    @torch.no_grad()
    def pi0_end_to_end(steps=FLOW_STEPS):
        f = processor(images=[image], text=[instruction])
        noise = torch.randn(1, chunk, D_MAX, generator=torch.Generator().manual_seed(0))
        out = pi0.sample_actions(state=torch.zeros(1, D_MAX), input_ids=f["input_ids"], attention_mask=f["attention_mask"],
                                 pixel_values=f["pixel_values"][:, None], pixel_attention_mask=torch.ones(1, 1, dtype=torch.bool),
                                 noise=noise, num_steps=steps)
        return norm.unnormalize(out[0, :, :width].float(), EMBODIMENT).numpy().astype(np.float32)

    def pi0_model():
        return pi0.sample_actions(**pi0_inputs, num_steps=FLOW_STEPS)

    def make_breakdown(pipe, steps, parts):
        model = pipe.model

        @torch.inference_mode()  # as predict_action runs the prefix (and sample_actions its loop)
        def breakdown():
            t0 = time.perf_counter()
            f = pipe.preprocess(dict(call), seed=0)
            t1 = time.perf_counter()
            names, batched = f.pop("embodiments"), f.pop("batched")
            mean, _ = model.encode(f["input_ids"], f["pixel_values"], f["attention_mask"], f["history"],
                                   f["history_mask"], f["dim_mask"], f.get("state"))
            t2 = time.perf_counter()
            chunk_ = model.sample_actions(mean, f["dim_mask"], steps, noise=f["noise"])
            t3 = time.perf_counter()
            pipe.postprocess({"chunk": chunk_, "embodiments": names, "batched": batched})
            t4 = time.perf_counter()
            parts.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))

        return breakdown

    parts, parts_few, parts_few16 = [], [], []
    parts_compiled = {name: [] for name in compiled}
    breakdown = make_breakdown(robot, FLOW_STEPS, parts)

    # Same answer through the breakdown path as through the pipeline (the parts are what the pipeline runs).
    ref = ours_pipeline()["actions"]
    with torch.inference_mode():
        f = robot.preprocess(dict(call), seed=0)
        m, _ = ours.encode(f["input_ids"], f["pixel_values"], f["attention_mask"], f["history"], f["history_mask"],
                           f["dim_mask"], None)
        again = robot.postprocess({"chunk": ours.sample_actions(m, f["dim_mask"], FLOW_STEPS, noise=f["noise"]),
                                   "embodiments": f["embodiments"], "batched": False})["actions"]
    assert np.allclose(ref, again, atol=1e-5), "breakdown path differs from the pipeline"
    assert pi0_end_to_end().shape == ref.shape

    print(f"[latency] {tag}: timing ({args.reps} reps)", flush=True)
    times = interleave({"ours_pipeline": ours_pipeline, "pi0_end_to_end": pi0_end_to_end, "ours_model": ours_model,
                        "pi0_model": pi0_model, "breakdown": breakdown,
                        f"ours_pipeline_{FEW_STEPS}step": ours_pipeline_few,
                        f"pi0_end_to_end_{PI0_FEW_STEPS}step": lambda: pi0_end_to_end(PI0_FEW_STEPS),
                        f"breakdown_{FEW_STEPS}step": make_breakdown(fast, FEW_STEPS, parts_few),
                        f"ours_pipeline_{FEW_STEPS}step_bf16_head": ours_pipeline_few_bf16,
                        f"breakdown_{FEW_STEPS}step_bf16_head": make_breakdown(fast16, FEW_STEPS, parts_few16),
                        **{f"ours_pipeline_{FEW_STEPS}step_compiled_{name}": few_step_call(pipe)
                           for name, (pipe, _) in compiled.items()},
                        **{f"breakdown_{FEW_STEPS}step_compiled_{name}": make_breakdown(pipe, FEW_STEPS,
                                                                                        parts_compiled[name])
                           for name, (pipe, _) in compiled.items()}},
                       args.reps, args.warmup, label=tag)
    parts = np.asarray(parts[-args.reps:])
    parts_few = np.asarray(parts_few[-args.reps:])
    parts_few16 = np.asarray(parts_few16[-args.reps:])
    parts_compiled = {name: np.asarray(p[-args.reps:]) for name, p in parts_compiled.items()}
    eager_actions = {"fp32": ours_pipeline_few()["actions"], "bf16": ours_pipeline_few_bf16()["actions"]}
    bf16_gap = float(np.abs(eager_actions["bf16"] - eager_actions["fp32"]).max())
    eager_keys = {"fp32": f"ours_pipeline_{FEW_STEPS}step", "bf16": f"ours_pipeline_{FEW_STEPS}step_bf16_head"}
    compiled_rows = {}
    for name, (pipe, compile_s) in compiled.items():
        key, eager_key = f"ours_pipeline_{FEW_STEPS}step_compiled_{name}", eager_keys[name]
        compiled_rows[name] = {
            "compile_s": round(compile_s, 2),
            "ratio_pipeline_vs_pi0_end_to_end": paired_ratio(times[key], times[f"pi0_end_to_end_{PI0_FEW_STEPS}step"]),
            "ratio_vs_eager_flow": paired_ratio(times[key], times[eager_key]),
            "flow_steps_ms": summarize(parts_compiled[name][:, 2]),
            "flow_share_of_pipeline": round(float(np.median(parts_compiled[name][:, 2]) * 1e3
                                                  / summarize(times[key])["median_ms"]), 4),
            "flow_share_within_call": round(float(np.median(parts_compiled[name][:, 2]
                                                            / parts_compiled[name].sum(1))), 4),
            "max_abs_action_difference_vs_eager": round(float(np.abs(
                few_step_call(pipe)()["actions"] - eager_actions[name]).max()), 6),
        }
    part_names = ["preprocess", "vlm_prefix", "flow_steps", "postprocess"]
    e2e = summarize(times["ours_pipeline"])
    share = {n: round(float(np.median(parts[:, i]) * 1e3 / e2e["median_ms"]), 4) for i, n in enumerate(part_names)}
    share["pipeline_overhead"] = round(1.0 - sum(share.values()), 4)
    # Share within the same call (each repetition's parts over their own sum), robust to run-to-run drift.
    within = parts / parts.sum(1, keepdims=True)
    flow_within = float(np.median(within[:, 2]))

    ours_flops, _ = count_flops(ours_model)
    enc_flops, _ = count_flops(lambda: ours.encode(model_inputs["input_ids"], model_inputs["pixel_values"],
                                                    model_inputs["attention_mask"], model_inputs["history"],
                                                    model_inputs["history_mask"], model_inputs["dim_mask"]))
    pi0_flops, _ = count_flops(pi0_model)
    model_ms = summarize(times["ours_model"])["median_ms"]
    pi0_ms = summarize(times["pi0_model"])["median_ms"]
    row = {
        "setting": tag, "preset": preset, "image_size": image_size, "chunk": chunk, "flow_steps": FLOW_STEPS,
        "vlm_family": args.vlm_family, "prefix_tokens": int(model_inputs["input_ids"].shape[1]),
        "ours_params": ours_split, "pi0_params": pi0_split, "pi0_expert_sizing": sizing,
        "latency": {k: summarize(v) for k, v in times.items()},
        "ratio_pipeline_vs_pi0_end_to_end": paired_ratio(times["ours_pipeline"], times["pi0_end_to_end"]),
        "ratio_model_vs_pi0_model": paired_ratio(times["ours_model"], times["pi0_model"]),
        "ratio_pipeline_vs_pi0_model": paired_ratio(times["ours_pipeline"], times["pi0_model"]),
        "breakdown_ms": {n: summarize(parts[:, i]) for i, n in enumerate(part_names)},
        "breakdown_share_of_pipeline": share,
        "flow_share_within_call": round(flow_within, 4),
        "few_step": {
            "steps": FEW_STEPS, "pi0_steps": PI0_FEW_STEPS, "shortcut_max_steps": SHORTCUT_MAX_STEPS,
            "ratio_pipeline_vs_pi0_end_to_end": paired_ratio(times[f"ours_pipeline_{FEW_STEPS}step"],
                                                             times[f"pi0_end_to_end_{PI0_FEW_STEPS}step"]),
            "ratio_vs_our_10_steps": paired_ratio(times[f"ours_pipeline_{FEW_STEPS}step"], times["ours_pipeline"]),
            "breakdown_ms": {n: summarize(parts_few[:, i]) for i, n in enumerate(part_names)},
            "flow_share_of_pipeline": round(float(np.median(parts_few[:, 2]) * 1e3
                                                  / summarize(times[f"ours_pipeline_{FEW_STEPS}step"])["median_ms"]), 4),
            "flow_share_within_call": round(float(np.median(parts_few[:, 2] / parts_few.sum(1))), 4),
            "bf16_head": {
                "ratio_pipeline_vs_pi0_end_to_end": paired_ratio(times[f"ours_pipeline_{FEW_STEPS}step_bf16_head"],
                                                                 times[f"pi0_end_to_end_{PI0_FEW_STEPS}step"]),
                "ratio_vs_fp32_head": paired_ratio(times[f"ours_pipeline_{FEW_STEPS}step_bf16_head"],
                                                   times[f"ours_pipeline_{FEW_STEPS}step"]),
                "flow_steps_ms": summarize(parts_few16[:, 2]),
                "flow_share_of_pipeline": round(float(np.median(parts_few16[:, 2]) * 1e3 / summarize(
                    times[f"ours_pipeline_{FEW_STEPS}step_bf16_head"])["median_ms"]), 4),
                "max_abs_action_difference_vs_fp32_head": round(bf16_gap, 5),
            },
            "compiled_flow": compiled_rows,
        },
        "flow_step_weight_bytes": flow_step_bytes(ours.action_head),
        "flow_chunk_weight_bytes": flow_chunk_bytes(ours.action_head),
        "flops": {"ours_predict_action": ours_flops, "ours_vlm_prefix": enc_flops,
                  "ours_flow_steps": ours_flops - enc_flops, "pi0_sample_actions": pi0_flops},
        "achieved_gflops": {"ours_predict_action": round(ours_flops / model_ms / 1e6, 3),
                            "pi0_sample_actions": round(pi0_flops / pi0_ms / 1e6, 3)},
    }
    # A shared machine can starve one setting: flag it when any variant's IQR exceeds half its median.
    row["noisy"] = any(v["iqr_ms"] > 0.5 * v["median_ms"] for v in row["latency"].values())
    if row["noisy"]:
        row["setting"] += " (noisy)"
    return row


# ------------------------------------------------------------------------------------------------ sections 4-5
def build_corpus(tmp):
    from synthetic import make_corpus

    from modeling_actprior.data import fit_normalizer, load_lerobot_dataset
    from modeling_actprior.data.lerobot import write_lerobot_dataset

    t0 = time.perf_counter()
    dirs = make_corpus(Path(tmp) / "corpus", n_episodes=16, length=60, images=64)
    corpora = [load_lerobot_dataset(d) for d in dirs]
    norm = fit_normalizer(corpora, max_action_dim=D_MAX)
    # The same episodes with the camera as AV1 video, as lerobot-record writes it.
    videos = []
    for c in corpora:
        root = write_lerobot_dataset(str(Path(tmp) / "corpus_video" / c.embodiment.name),
                                     [c.episode(e, images=True) for e in range(c.num_episodes)], c.embodiment,
                                     fps=c.meta.fps, camera_names=("front",), image_size=64, video_codec="av1")
        videos.append(load_lerobot_dataset(root))
    return corpora, videos, norm, time.perf_counter() - t0


def batch_iter(sets, batch_size, collate, seed=0):
    from modeling_actprior.data import MixtureDataset
    from modeling_actprior.training import endless_batches

    total = sum(len(s) for s in sets)
    mix = MixtureDataset(sets, num_samples=total // batch_size * batch_size, seed=seed)
    return endless_batches(mix, batch_size, 0, collate=collate)


def history_token_alone(model, f):
    """What the history token adds to a chunk's work: the encoder on the past actions and the projection to one
    token (as ``predict_action`` runs them)."""
    import torch

    with torch.inference_mode():
        return model.history_token(f["history"], f["history_mask"], f["dim_mask"], f.get("state"))


#: Section 4's scaling of the history token's inference cost: the preset's language model, then wider and deeper ones
#: (the vision tower and the prior stay the preset's). ``(label, text config overrides)``.
HISTORY_VLM_SCALES = (
    ("preset", {}),
    ("width 512, 8 layers", dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=8, intermediate_size=1536)),
    ("width 1024, 8 layers", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                  num_key_value_heads=16, intermediate_size=3072)),
)


def instructions_of_consecutive_lengths(processor, image, history, n: int) -> list[tuple[str, int]]:
    """``n`` instructions whose prompts are ``n`` consecutive token counts, the shortest that of ``INSTRUCTIONS[0]``:
    ``[(instruction, input_ids length), ...]``. One more prefix token costs a matrix product more or less than its
    share depending on where the count falls in the kernel's row blocking (+4.5% for 72 -> 73 tokens with a
    1024-wide language model here), so a token's cost is measured over a run of counts, not at one."""
    def length(text):
        return int(processor(images=[image], text=[text], history=[history], embodiment=EMBODIMENT)["input_ids"].shape[1])

    base = INSTRUCTIONS[0]
    start = length(base)
    found = {start: base}
    words = ["now", "please", "carefully", "slowly", "then", "stop", "again", "here", "gently", "quickly", "there"]
    for k in range(0, 4):
        for combo in itertools.product(words, repeat=k):
            for end in ("", ".", "!", "?!"):
                text = " ".join([base, *combo]) + end
                found.setdefault(length(text), text)
                if all(start + i in found for i in range(n)):
                    return [(found[start + i], start + i) for i in range(n)]
    raise RuntimeError(f"found no instructions for {n} consecutive prompt lengths from {start}: {sorted(found)}")


def history_token_vs_vlm_size(args, preset, reps, prompt_lengths: int = 8) -> list[dict]:
    """``predict_action`` with the history token on vs off as the language model grows, the prior unchanged: the
    encoder and its one token cost about the same at any VLM size, so their share of a chunk's latency shrinks.
    Repetition ``i`` uses the ``i % prompt_lengths``-th of ``prompt_lengths`` instructions of consecutive prompt
    lengths (the same one on and off), so the ratio does not hang on one lucky or unlucky token count; ``reps`` is
    rounded up to a multiple of ``prompt_lengths`` so that every length counts as often."""
    import torch

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    history = rng.normal(size=(16, 7)).astype(np.float32)
    reps = prompt_lengths * -(-reps // prompt_lengths)
    rows = []
    for label, text in HISTORY_VLM_SCALES:
        print(f"[history] {preset}: predict_action on vs off, language model {label}", flush=True)
        fns, params = {}, None
        for on in (True, False):
            model, proc = build_vla(preset, args.vlm_family, 64, 16, text_overrides=text, history_token=on)
            if on:  # per size: a language model of another vocabulary would tokenize the instructions differently
                texts = instructions_of_consecutive_lengths(proc, image, history, prompt_lengths)
            feats = [{k: v for k, v in proc(images=[image], text=[t], history=[history],
                                            embodiment=EMBODIMENT).items() if isinstance(v, torch.Tensor)}
                     for t, _ in texts]
            calls = itertools.count()

            def predict(m=model, fs=feats, c=calls):
                return m.predict_action(**fs[next(c) % len(fs)], num_inference_steps=FLOW_STEPS)

            fns["on" if on else "off"] = predict
            if on:
                params = {"vlm": n_params(model.vlm), "history_token": n_params(model.history_encoder)
                          + n_params(model.history_projection)}
                fns["history_token_alone"] = lambda m=model, x=feats[0]: history_token_alone(m, x)
        # interleave calls every variant once per warm-up round and repetition, so "on" and "off" always read the
        # same instruction; warm-up rounds are a multiple of the instructions so that repetition i reads the i-th.
        warmup = prompt_lengths * max(1, -(-args.warmup // prompt_lengths))
        t = interleave(fns, reps, warmup, label=f"history token vs VLM size ({label})")
        rows.append({"language_model": label, "text_overrides": text, "params": params,
                     "prompt_tokens": [n for _, n in texts], "image_tokens": model.config.num_image_tokens,
                     "warmup": warmup, "reps": reps,
                     "latency": {k: summarize(v) for k, v in t.items()},
                     "ratio_on_off": paired_ratio(t["on"], t["off"])})
        fns.clear()
        gc.collect()
    return rows


def few_step_share_vs_vlm_size(args, preset: str, reps: int) -> list[dict]:
    """The 2-step flow's share of ``predict_action`` as the language model grows, the prior (and its action head)
    unchanged: the flow costs the same at any VLM size, so its share falls toward what real VLAs have (an action head
    a tenth of the VLM or less). The same shortcut-trained head and solver as the few-step rows; 64 px, chunk 16."""
    import torch

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    history = rng.normal(size=(16, 7)).astype(np.float32)
    rows = []
    for label, text in HISTORY_VLM_SCALES:
        print(f"[few-step] {preset}: {FEW_STEPS}-step flow share, language model {label}", flush=True)
        model, proc = build_vla(preset, args.vlm_family, 64, 16, text_overrides=text, prior_overrides={
            "shortcut_max_steps": SHORTCUT_MAX_STEPS, "num_inference_steps": FEW_STEPS})
        feats = {k: v for k, v in proc(images=[image], text=[INSTRUCTIONS[0]], history=[history],
                                       embodiment=EMBODIMENT).items() if isinstance(v, torch.Tensor)}
        noise = torch.randn(1, 16, D_MAX, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            mean, _ = model.encode(feats["input_ids"], feats["pixel_values"], feats["attention_mask"],
                                   feats["history"], feats["history_mask"], feats["dim_mask"])
        fns = {"predict_action": lambda m=model, f=feats, n=noise: m.predict_action(**f, noise=n,
                                                                                     num_inference_steps=FEW_STEPS),
               "flow_steps": lambda m=model, z=mean, f=feats, n=noise: m.sample_actions(z, f["dim_mask"], FEW_STEPS,
                                                                                        noise=n)}
        t = interleave(fns, reps, args.warmup, label=f"{FEW_STEPS}-step flow vs VLM size ({label})")
        lat = {k: summarize(v) for k, v in t.items()}
        rows.append({"language_model": label, "text_overrides": text, "preset": preset,
                     "params": {"vlm": n_params(model.vlm), "action_head": n_params(model.action_head)},
                     "latency": lat, "steps": FEW_STEPS,
                     "flow_share": round(lat["flow_steps"]["median_ms"] / lat["predict_action"]["median_ms"], 4)})
        del model, fns
        gc.collect()
    return rows


def training_sections(args, tmp) -> dict:
    import torch
    from flops import count_flops
    from transformers import pipeline

    import modeling_actprior as ap
    from modeling_actprior.data import ActionWindowDataset, VLAWindowDataset, collate_windows
    from modeling_actprior.hub import export_for_hub
    from modeling_actprior.training.stage2 import VLACollator, build_optimizer

    out = {}
    corpora, video_corpora, norm, built_s = build_corpus(tmp)
    out["corpus"] = {"datasets": len(corpora), "episodes": sum(c.num_episodes for c in corpora),
                     "frames": sum(c.num_frames for c in corpora), "image_size": 64, "build_s": round(built_s, 2)}
    preset = args.train_preset
    reps = 2 * args.reps
    # The history token's effect is a few percent: four times the repetitions, so that the 95% interval of the
    # median ratio is about as narrow as the 3% it is judged against.
    reps_history = 4 * args.reps

    # ---------------------------------------------------------------- 4a: history token, inference latency
    print(f"[history] {preset}: pipeline latency on vs off", flush=True)
    robots = {}
    for on in (True, False):
        m, proc = build_vla(preset, args.vlm_family, 64, 16, history_token=on)
        robots[on] = pipeline("robot-action", model=export_for_hub(m, proc, os.path.join(tmp, f"hist-{on}")), device="cpu")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    history = rng.normal(size=(16, 7)).astype(np.float32)
    call = dict(instruction=INSTRUCTIONS[0], history=history, embodiment=EMBODIMENT, seed=0,
                num_inference_steps=FLOW_STEPS)
    feats = {on: {k: v for k, v in r.preprocess({"images": image, "state": None, **{k: call[k] for k in
                                                ("instruction", "history", "embodiment")}}, seed=0).items()
                  if k not in ("embodiments", "batched")} for on, r in robots.items()}
    t = interleave({"pipeline_on": lambda: robots[True](image, **call),
                    "pipeline_off": lambda: robots[False](image, **call),
                    "model_on": lambda: robots[True].model.predict_action(**feats[True], num_inference_steps=FLOW_STEPS),
                    "model_off": lambda: robots[False].model.predict_action(**feats[False],
                                                                            num_inference_steps=FLOW_STEPS),
                    "history_token_alone": lambda: history_token_alone(robots[True].model, feats[True])},
                   reps_history, args.warmup, label="history token, inference")
    out["history_token_inference"] = {
        "preset": preset, "image_size": 64, "chunk": 16,
        "latency": {k: summarize(v) for k, v in t.items()},
        "ratio_pipeline_on_off": paired_ratio(t["pipeline_on"], t["pipeline_off"]),
        "ratio_model_on_off": paired_ratio(t["model_on"], t["model_off"]),
        "prefix_tokens": {"on": int(feats[True]["input_ids"].shape[1]) + 2,
                          "off": int(feats[False]["input_ids"].shape[1]) + 1},
    }
    robots.clear()
    gc.collect()
    # The same comparison (model only) as the language model grows: the share the 3% judges depends on it.
    out["history_token_vs_vlm_size"] = history_token_vs_vlm_size(args, preset, reps_history // 2)

    # ---------------------------------------------------------------- 4b + 5: Stage-2 training, history on/off, loader
    print(f"[stage2] {preset}: training step on vs off, batch 8, and the loader", flush=True)
    cfg_on = vla_config(preset, args.vlm_family, 64, 16)
    processor = ap.ActionPriorProcessor.from_config(cfg_on, norm, instructions=sorted(
        {t for c in corpora for t in c.meta.tasks if t}) or INSTRUCTIONS)
    collate = VLACollator(processor, "front")
    vla_sets = [VLAWindowDataset(c, norm, history=16, chunk=16, cameras=["front"]) for c in corpora]
    vla_batches = batch_iter(vla_sets, 8, collate)
    raw_batches = batch_iter(vla_sets, 8, collate_windows, seed=1)
    from modeling_actprior.data.video import decode_span, frame_cache

    video_sets = [VLAWindowDataset(c, norm, history=16, chunk=16, cameras=["front"]) for c in video_corpora]
    video_batches = batch_iter(video_sets, 8, collate, seed=2)
    # A cache miss decodes the window's whole episode span once (one seek): its cost, per episode.
    key = "observation.images.front"
    spans = [c.meta.video_location(key, e) for c in video_corpora for e in range(c.num_episodes)]
    span_ms = []
    for path, start, end in spans:
        t0 = time.perf_counter()
        decode_span(path, start, end)
        span_ms.append((time.perf_counter() - t0) * 1e3)
    pool = [next(vla_batches) for _ in range(4)]
    opt_args = argparse.Namespace(learning_rate=1e-4, weight_decay=1e-4)
    models, opts = {}, {}
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(cfg_on.prior_config)  # random weights: speed does not depend on them
    for on in (True, False):
        # As train_stage2.py builds it: around the prior (its encoder is the teacher and the history encoder).
        torch.manual_seed(0)
        models[on] = ap.VLAWithPriorForAction.from_prior(prior, cfg_on.vlm_config, history_token=on).train()
        opts[on] = build_optimizer(models[on], opt_args)
    counter = itertools.count()

    def train_step(on):
        def step():
            model = models[on]
            batch = pool[next(counter) % len(pool)]
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opts[on].step()
            opts[on].zero_grad(set_to_none=True)
        return step

    t = interleave({"train_on": train_step(True), "train_off": train_step(False),
                    "loader_vla_collator": lambda: next(vla_batches),
                    "loader_collate_windows": lambda: next(raw_batches),
                    "loader_vla_collator_video": lambda: next(video_batches)}, reps_history, args.warmup,
                   label="stage 2 training")
    m = models[True]

    def fwd_bwd():
        m(**pool[0]).loss.backward()

    train_flops, _ = count_flops(fwd_bwd)
    m.zero_grad(set_to_none=True)
    step_ms = summarize(t["train_on"])["median_ms"]
    out["history_token_training"] = {
        "preset": preset, "batch_size": 8, "kd_weight_at_step": m.config.distill_lambda(0),
        "teacher_reused": bool(m.teacher_is_history_encoder()) if hasattr(m, "teacher_is_history_encoder") else False,
        "step_ms": {"on": summarize(t["train_on"]), "off": summarize(t["train_off"])},
        "ratio_on_off": paired_ratio(t["train_on"], t["train_off"]),
        "trainable_params": {"on": models[True].num_trainable_parameters(),
                             "off": models[False].num_trainable_parameters()},
    }
    out["stage2"] = {
        "preset": preset, "batch_size": 8, "step": summarize(t["train_on"]),
        "train_samples_per_s": round(8 / (step_ms / 1e3), 2),
        "train_samples_per_s_aggregate": round(8 * len(t["train_on"]) / sum(t["train_on"]), 2),
        "loader_batch": summarize(t["loader_vla_collator"]),
        "loader_samples_per_s": round(8 * len(t["loader_vla_collator"]) / sum(t["loader_vla_collator"]), 2),
        "loader_without_processor_samples_per_s": round(8 * len(t["loader_collate_windows"])
                                                        / sum(t["loader_collate_windows"]), 2),
        "fwd_bwd_flops": train_flops, "achieved_gflops": round(train_flops / step_ms / 1e6, 3),
    }
    out["stage2"]["loader_samples_per_s_median"] = round(8 / (summarize(t["loader_vla_collator"])["median_ms"] / 1e3), 2)
    video_ms = summarize(t["loader_vla_collator_video"])["median_ms"]
    out["stage2_video"] = {
        "preset": preset, "batch_size": 8, "codec": "av1", "step": out["stage2"]["step"],
        "train_samples_per_s": out["stage2"]["train_samples_per_s"],
        "loader_batch": summarize(t["loader_vla_collator_video"]),
        "loader_samples_per_s_median": round(8 / (video_ms / 1e3), 2),
        "loader_samples_per_s": round(8 * len(t["loader_vla_collator_video"]) / sum(t["loader_vla_collator_video"]), 2),
        "loader_over_training": round(8 / (video_ms / 1e3) / out["stage2"]["train_samples_per_s"], 3),
        "episode_span_decode_ms": summarize(np.asarray(span_ms) / 1e3),
        "episode_frames": int(np.median([c.meta.episode_lengths.mean() for c in video_corpora])),
        "decoded_spans": frame_cache().decoded_spans, "episodes": len(spans),
    }
    # Over an epoch every episode is decoded once per worker: that time against the epoch's training time.
    windows = sum(len(v) for v in video_sets)
    out["stage2_video"]["epoch_decode_share"] = round(
        sum(span_ms) / 1e3 / (windows / out["stage2"]["train_samples_per_s"]), 4)
    # Medians on both sides: on a shared machine a few stalled steps would otherwise inflate the ratio.
    out["stage2"]["loader_over_training"] = round(out["stage2"]["loader_samples_per_s_median"]
                                                  / out["stage2"]["train_samples_per_s"], 3)
    out["stage2"]["loader_over_training_aggregate"] = round(out["stage2"]["loader_samples_per_s"]
                                                            / out["stage2"]["train_samples_per_s_aggregate"], 3)
    models.clear()
    opts.clear()
    gc.collect()

    # ---------------------------------------------------------------- 5: Stage-1 training vs loader
    print(f"[stage1] {preset}: training step, batch 64, and the loader", flush=True)
    sets = [ActionWindowDataset(c, norm, history=16, chunk=16) for c in corpora]
    batches = batch_iter(sets, 64, collate_windows)
    pool = [next(batches) for _ in range(4)]
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset(preset)).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4, weight_decay=1e-4)
    counter = itertools.count()

    def stage1_step():
        batch = pool[next(counter) % len(pool)]
        prior(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = interleave({"train": stage1_step, "loader": lambda: next(batches)}, reps, args.warmup, label="stage 1 training")
    s1_flops, _ = count_flops(lambda: prior(**pool[0]).loss.backward())
    prior.zero_grad(set_to_none=True)
    step_ms = summarize(t["train"])["median_ms"]
    out["stage1"] = {
        "preset": preset, "batch_size": 64, "params": n_params(prior), "step": summarize(t["train"]),
        "train_windows_per_s": round(64 / (step_ms / 1e3), 1),
        "train_windows_per_s_aggregate": round(64 * len(t["train"]) / sum(t["train"]), 1),
        "loader_batch": summarize(t["loader"]),
        "loader_windows_per_s": round(64 * len(t["loader"]) / sum(t["loader"]), 1),
        "fwd_bwd_flops": s1_flops, "achieved_gflops": round(s1_flops / step_ms / 1e6, 3),
    }
    out["stage1"]["loader_windows_per_s_median"] = round(64 / (summarize(t["loader"])["median_ms"] / 1e3), 1)
    out["stage1"]["loader_over_training"] = round(out["stage1"]["loader_windows_per_s_median"]
                                                  / out["stage1"]["train_windows_per_s"], 3)
    out["stage1"]["loader_over_training_aggregate"] = round(out["stage1"]["loader_windows_per_s"]
                                                            / out["stage1"]["train_windows_per_s_aggregate"], 3)
    return out


# ------------------------------------------------------------------------------------------------ report
def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def millions(n) -> str:
    return f"{n / 1e6:.3f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def report_cpu(result) -> str:
    out = []
    settings = result["settings"]
    out.append("### 1-2. Latency, batch 1, 10 flow steps (ms, median ± IQR); ratio = median of paired ratios [IQR]")
    out.append(md_table(
        ["setting", "ours pipeline", "PI0 end-to-end", "ours/PI0 e2e", "ours model", "PI0 model", "ours/PI0 model"],
        [[s["setting"], fmt(s["latency"]["ours_pipeline"]), fmt(s["latency"]["pi0_end_to_end"]),
          fmt_ratio(s["ratio_pipeline_vs_pi0_end_to_end"]), fmt(s["latency"]["ours_model"]),
          fmt(s["latency"]["pi0_model"]), fmt_ratio(s["ratio_model_vs_pi0_model"])] for s in settings]))
    out.append("\n### Parameters (ours: active = all but the training-only teacher; PI0: all but the expert's unused "
               "token embedding)")
    out.append(md_table(
        ["setting", "ours VLM", "ours head", "ours hist+readout", "ours active", "PI0 VLM", "PI0 expert",
         "PI0 active", "mismatch", "PI0 expert (width/ffn)"],
        [[s["setting"], millions(s["ours_params"]["vlm"]), millions(s["ours_params"]["action_head"]),
          millions(s["ours_params"]["history_token"] + s["ours_params"]["latent_readout"]),
          millions(s["ours_params"]["active_inference"]), millions(s["pi0_params"]["vlm"]),
          millions(s["pi0_params"]["expert"]), millions(s["pi0_params"]["active_inference"]),
          f"{100 * s['pi0_expert_sizing']['mismatch']:+.1f}%",
          f"{s['pi0_expert_sizing']['expert_hidden']}/{s['pi0_expert_sizing']['expert_ffn']}"] for s in settings]))
    out.append("\n### 3. Where our pipeline's time goes (share of the median pipeline latency; ms median)")
    out.append(md_table(
        ["setting", "prefix tokens", "preprocess", "VLM prefix", "flow steps (10)", "postprocess", "pipeline overhead",
         "flow share within call", "GFLOP ours/PI0"],
        [[s["setting"], s["prefix_tokens"]]
         + [f"{100 * s['breakdown_share_of_pipeline'][k]:.1f}% ({s['breakdown_ms'][k]['median_ms']:.2f})"
            for k in ("preprocess", "vlm_prefix", "flow_steps", "postprocess")]
         + [f"{100 * s['breakdown_share_of_pipeline']['pipeline_overhead']:.1f}%",
            f"{100 * s['flow_share_within_call']:.1f}%",
            f"{s['flops']['ours_predict_action'] / 1e9:.3f} / {s['flops']['pi0_sample_actions'] / 1e9:.3f}"]
         for s in settings]))
    if settings and "few_step" in settings[0]:
        fs = settings[0]["few_step"]
        out.append(f"\n### Few-step generation: our pipeline at {fs['steps']} steps (a shortcut-trained action head, "
                   f"`shortcut_max_steps={fs['shortcut_max_steps']}`, the shortcut solver) against PI0 at "
                   f"{fs['pi0_steps']} steps, the setting transformers' PI0 docs use (ms, median ± IQR)")
        out.append(md_table(
            ["setting", f"ours pipeline, {fs['steps']} steps", f"PI0 end-to-end, {fs['pi0_steps']} steps",
             "ours/PI0", f"ours {fs['steps']} / ours 10 steps", f"flow steps ({fs['steps']})", "flow share",
             "flow share within call"],
            [[s["setting"], fmt(s["latency"][f"ours_pipeline_{fs['steps']}step"]),
              fmt(s["latency"][f"pi0_end_to_end_{fs['pi0_steps']}step"]),
              fmt_ratio(s["few_step"]["ratio_pipeline_vs_pi0_end_to_end"]),
              fmt_ratio(s["few_step"]["ratio_vs_our_10_steps"]),
              f"{s['few_step']['breakdown_ms']['flow_steps']['median_ms']:.2f}",
              f"{100 * s['few_step']['flow_share_of_pipeline']:.1f}%",
              f"{100 * s['few_step']['flow_share_within_call']:.1f}%"] for s in settings]))
        if "bf16_head" in fs:
            out.append(f"\nThe same {fs['steps']}-step pipeline with its action head in bfloat16 (`model.action_head.to("
                       "torch.bfloat16)`; the VLM stays float32): a flow step reads half the bytes. 'Largest action "
                       "change': the largest difference of a returned action from the float32 head's, in the robot's "
                       "units (the same inputs and noise).")
            out.append(md_table(
                ["setting", f"ours pipeline, {fs['steps']} steps, bf16 head", "ours/PI0", "bf16 / fp32 head",
                 f"flow steps ({fs['steps']})", "flow share", "largest action change"],
                [[s["setting"], fmt(s["latency"][f"ours_pipeline_{fs['steps']}step_bf16_head"]),
                  fmt_ratio(s["few_step"]["bf16_head"]["ratio_pipeline_vs_pi0_end_to_end"]),
                  fmt_ratio(s["few_step"]["bf16_head"]["ratio_vs_fp32_head"]),
                  f"{s['few_step']['bf16_head']['flow_steps_ms']['median_ms']:.2f}",
                  f"{100 * s['few_step']['bf16_head']['flow_share_of_pipeline']:.1f}%",
                  f"{s['few_step']['bf16_head']['max_abs_action_difference_vs_fp32_head']:.4f}"] for s in settings]))
        if "compiled_flow" in fs:
            out.append(f"\nThe same {fs['steps']}-step pipelines with the flow loop compiled "
                       f"(`robot.model.compile_flow(num_inference_steps={fs['steps']})`: `torch.compile` of the "
                       "conditioning and both steps as one graph, compiled before timing; the VLM stays eager). "
                       "'vs eager': against the same head's eager loop; 'largest action change': against the eager "
                       "loop's actions, in the robot's units.")
            rows = []
            for s in settings:
                for name, c in s["few_step"]["compiled_flow"].items():
                    rows.append([s["setting"], f"{name} head",
                                 fmt(s["latency"][f"ours_pipeline_{fs['steps']}step_compiled_{name}"]),
                                 fmt_ratio(c["ratio_pipeline_vs_pi0_end_to_end"]), fmt_ratio(c["ratio_vs_eager_flow"]),
                                 f"{c['flow_steps_ms']['median_ms']:.2f}", f"{100 * c['flow_share_of_pipeline']:.1f}%",
                                 f"{100 * c['flow_share_within_call']:.1f}%", f"{c['compile_s']:.1f}",
                                 f"{c['max_abs_action_difference_vs_eager']:.5f}"])
            out.append(md_table(["setting", "head", f"ours pipeline, {fs['steps']} steps, compiled flow", "ours/PI0",
                                 "vs eager", f"flow steps ({fs['steps']})", "flow share", "flow share within call",
                                 "compile s", "largest action change"], rows))
        if "flow_floor" in fs:
            out.append(f"\nThe {fs['steps']}-step flow against the machine's limit: once per chunk the conditioning "
                       "reads every block's modulation layer (it depends on the chunk's latent), then each step reads "
                       "the step weights. 'Share at the floor': the flow's share of the few-step pipeline if it ran at "
                       "the memory-streaming rate, the rest unchanged; a goal below it needs a head that reads fewer "
                       "bytes per chunk, not a faster loop.")
            out.append(md_table(
                ["setting", "weights per chunk", f"flow ({fs['steps']} steps) ms", "floor: memory / cache ms",
                 "flow / memory floor", "share at the floor"],
                [[s["setting"], f"{s['few_step']['flow_floor']['memory']['mb_per_chunk']:.2f} MB",
                  f"{s['few_step']['breakdown_ms']['flow_steps']['median_ms']:.2f}",
                  f"{s['few_step']['flow_floor']['memory']['floor_ms']:.2f} / "
                  f"{s['few_step']['flow_floor']['cache']['floor_ms']:.2f}",
                  f"{s['few_step']['flow_floor']['memory']['flow_over_floor']:.1f}x",
                  f"{100 * s['few_step']['flow_floor']['memory']['share_at_floor']:.1f}%"] for s in settings]))
    vs_size = result.get("few_step_share_vs_vlm_size")
    if vs_size:
        out.append(f"\nThe {vs_size[0]['steps']}-step flow's share as the language model grows (the "
                   f"`{vs_size[0].get('preset', 'small')}` vision tower and shortcut-trained prior, 64 px, chunk 16; "
                   "`predict_action` at "
                   f"{vs_size[0]['steps']} steps, and `sample_actions` alone on the same latent; interleaved): the "
                   "flow costs the same at any VLM size, so its share falls as the VLM approaches a real VLA's "
                   "(an action head a tenth of the VLM or less).")
        out.append(md_table(
            ["language model", "VLM params", "action head params", "predict_action ms", "flow steps ms", "flow share"],
            [[r["language_model"], millions(r["params"]["vlm"]), millions(r["params"]["action_head"]),
              fmt(r["latency"]["predict_action"]), fmt(r["latency"]["flow_steps"]), f"{100 * r['flow_share']:.1f}%"]
             for r in vs_size]))
    if settings and "flow_floor" in settings[0]:
        ws = result["machine_limit"]["weight_stream"]["best_gbps"]
        out.append(f"\nThe flow steps against the machine's limit: a batch-1 step reads every weight of the action head "
                   f"once, so 10 steps take at least 10 x (weights per step) / (streaming rate). This run measured "
                   f"{ws['memory']:.1f} GB/s from memory ({STREAM_MEMORY_MB} MB of float32 matrices) and "
                   f"{ws['cache']:.1f} GB/s from cache ({STREAM_CACHE_MB} MB); between chunks the VLM prefix evicts "
                   "much of the head from the cache. 'Share at the floor': the flow's share of the pipeline if its "
                   "steps ran at the memory floor, the rest unchanged.")
        out.append(md_table(
            ["setting", "weights per step", "flow steps ms", "floor: memory / cache ms", "flow / memory floor",
             "share at the floor"],
            [[s["setting"], f"{s['flow_floor']['memory']['mb_per_step']:.2f} MB",
              f"{s['breakdown_ms']['flow_steps']['median_ms']:.2f}",
              f"{s['flow_floor']['memory']['floor_ms']:.2f} / {s['flow_floor']['cache']['floor_ms']:.2f}",
              f"{s['flow_floor']['memory']['flow_over_floor']:.1f}x",
              f"{100 * s['flow_floor']['memory']['share_at_floor']:.1f}%"] for s in settings]))
    tr = result.get("training")
    if tr:
        hi, ht = tr["history_token_inference"], tr["history_token_training"]
        out.append(f"\n### 4. History token on vs off ({hi['preset']}, 64 px, chunk 16)")
        out.append(md_table(
            ["measure", "on (ms)", "off (ms)", "on/off (paired) [IQR]", "95% interval of the median"],
            [["pipeline latency", fmt(hi["latency"]["pipeline_on"]), fmt(hi["latency"]["pipeline_off"]),
              fmt_ratio(hi["ratio_pipeline_on_off"]), fmt_ci(hi["ratio_pipeline_on_off"])],
             ["predict_action", fmt(hi["latency"]["model_on"]), fmt(hi["latency"]["model_off"]),
              fmt_ratio(hi["ratio_model_on_off"]), fmt_ci(hi["ratio_model_on_off"])],
             *([["history encoder + projection alone", fmt(hi["latency"]["history_token_alone"]), "", "", ""]]
               if "history_token_alone" in hi["latency"] else []),
             [f"Stage-2 train step (batch 8, λ={ht['kd_weight_at_step']:g}"
              f"{', teacher reused' if ht.get('teacher_reused') else ''})", fmt(ht["step_ms"]["on"]),
              fmt(ht["step_ms"]["off"]), fmt_ratio(ht["ratio_on_off"]), fmt_ci(ht["ratio_on_off"])]]))
        if tr.get("history_token_vs_vlm_size"):
            first = tr["history_token_vs_vlm_size"][0]
            lengths, img = first["prompt_tokens"], first.get("image_tokens", 0)
            out.append(f"\nThe history token's inference cost as the language model grows ({hi['preset']} vision tower "
                       f"and prior, 64 px, chunk 16; predict_action, on vs off; {first.get('reps', '?')} repetitions "
                       f"after {first.get('warmup', '?')} warm-up calls, cycling through {len(lengths)} instructions "
                       f"of {lengths[0]}-{lengths[-1]} prompt tokens ({img} image + {lengths[0] - img}-"
                       f"{lengths[-1] - img} text), the same one on and off):")
            out.append(md_table(
                ["language model", "VLM params", "on (ms)", "off (ms)", "on/off (paired) [IQR]",
                 "95% interval of the median", "encoder + projection alone (ms)"],
                [[r["language_model"], millions(r["params"]["vlm"]), fmt(r["latency"]["on"]), fmt(r["latency"]["off"]),
                  fmt_ratio(r["ratio_on_off"]), fmt_ci(r["ratio_on_off"]), fmt(r["latency"]["history_token_alone"])]
                 for r in tr["history_token_vs_vlm_size"]]))
        s1, s2 = tr["stage1"], tr["stage2"]
        out.append("\n### 5. Training throughput vs the data loader (same run; rates from median step / batch times, "
                   "total-time rates in brackets)")
        out.append(md_table(
            ["stage", "step ms", "train samples/s", "loader samples/s", "loader / training"],
            [[f"Stage 1 ({s1['preset']} prior, batch 64)", fmt(s1["step"]),
              f"{s1['train_windows_per_s']:.0f} [{s1['train_windows_per_s_aggregate']:.0f}]",
              f"{s1['loader_windows_per_s_median']:.0f} [{s1['loader_windows_per_s']:.0f}]",
              f"{s1['loader_over_training']:.1f}x [{s1['loader_over_training_aggregate']:.1f}x]"],
             [f"Stage 2 ({s2['preset']} VLA, batch 8)", fmt(s2["step"]),
              f"{s2['train_samples_per_s']:.1f} [{s2['train_samples_per_s_aggregate']:.1f}]",
              f"{s2['loader_samples_per_s_median']:.0f} [{s2['loader_samples_per_s']:.0f}; without the processor "
              f"{s2['loader_without_processor_samples_per_s']:.0f}]",
              f"{s2['loader_over_training']:.1f}x [{s2['loader_over_training_aggregate']:.1f}x]"]]
            + ([[f"Stage 2, camera as AV1 video ({tr['stage2_video']['preset']} VLA, batch 8)", fmt(s2["step"]),
                 f"{s2['train_samples_per_s']:.1f}",
                 f"{tr['stage2_video']['loader_samples_per_s_median']:.0f} "
                 f"[{tr['stage2_video']['loader_samples_per_s']:.0f}]",
                 f"{tr['stage2_video']['loader_over_training']:.1f}x"]] if "stage2_video" in tr else [])))
        if "stage2_video" in tr:
            v = tr["stage2_video"]
            out.append(f"\nVideo: a window whose episode is not cached decodes that episode's span once (one seek, "
                       f"{v['episode_frames']} frames of 64 px AV1 in {fmt(v['episode_span_decode_ms'])} ms); "
                       f"{v['decoded_spans']} of the {v['episodes']} episodes were decoded during the timed batches "
                       "(the per-worker cache holds them all here), so the median batch is a cached one. Decoding "
                       f"every episode once, as an epoch does per worker, costs {100 * v['epoch_decode_share']:.1f}% of "
                       "the epoch's training time.")
    mach = result["machine_limit"]
    out.append("\n### 6. Machine limit and achieved rate")
    rows = [[f"fp32 matmul {m['n']}² ({when})", f"{m['median_gflops']:.1f} ± {m['iqr_gflops']:.1f}"]
            for when in ("start", "end") for m in mach[when]]
    if "weight_stream" in mach:
        rows += [[f"fp32 weight streaming from {where}, batch-1 matrix-vector ({when}; GB/s, not GFLOP/s)",
                  f"{mach['weight_stream'][when][where]['median_gbps']:.1f} ± "
                  f"{mach['weight_stream'][when][where]['iqr_gbps']:.1f}"]
                 for where in ("memory", "cache") for when in ("start", "end")]
        for name, r in mach["weight_stream"].get("low_precision_cache", {}).items():
            fp32 = mach["weight_stream"]["end"]["cache"]
            rows.append([f"{name} weight streaming from cache, batch-1 matrix-vector (end; G weights/s, fp32: "
                         f"{fp32['median_gbps'] / 4:.1f})", f"{r['median_gweights_per_s']:.1f} "
                         f"({r['median_gweights_per_s'] / (fp32['median_gbps'] / 4):.2f}x fp32's weights/s)"])
    rows += [[f"ours predict_action {s['setting']}",
              f"{s['achieved_gflops']['ours_predict_action']:.2f} ({100 * s['achieved_gflops']['ours_predict_action'] / mach['peak_gflops']:.1f}% of peak)"]
             for s in settings]
    rows += [[f"PI0 sample_actions {s['setting']}",
              f"{s['achieved_gflops']['pi0_sample_actions']:.2f} ({100 * s['achieved_gflops']['pi0_sample_actions'] / mach['peak_gflops']:.1f}% of peak)"]
             for s in settings]
    if tr:
        for k in ("stage1", "stage2"):
            rows.append([f"{k} fwd+bwd ({tr[k]['preset']})",
                         f"{tr[k]['achieved_gflops']:.2f} ({100 * tr[k]['achieved_gflops'] / mach['peak_gflops']:.1f}% of peak)"])
    out.append(md_table(["measure", "GFLOP/s"], rows))
    cont = result.get("contention") or {}
    if cont:
        out.append(f"\n### Contention (a fixed probe of 16 small layers timed in every repetition: median / best; "
                   f"> {CONTENTION_LIMIT} flags the run)")
        out.append(md_table(["comparison", "probe median ms", "probe best ms", "inflation"],
                            [[k, f"{c['median_ms']:.3f}", f"{c['min_ms']:.3f}", f"{c['inflation']:.2f}"]
                             for k, c in cont.items()]))
        if result.get("contended"):
            out.append("\n**This run was contended** (other work on the machine): rerun when it is quiet.")
    out.append("\n### Goals")
    out += [f"- {'PASS' if g['pass'] else 'FAIL'}: {g['goal']}: {g['value']}" for g in result["goals"]]
    return "\n".join(out)


def markdown_header(result) -> str:
    """Command, machine and threads of a run: the lines that go above its tables."""
    m = result["machine"]
    lines = [f"Measured with `{result['command'].strip()}` on {m.get('cpu_model', 'a CPU')} ({m['cpu_count']} cores), "
             f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, "
             f"{m['torch_threads']} intra-op / {m['torch_interop_threads']} inter-op threads; load average "
             f"{m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end; "
             f"wall time {result['wall_s']:.0f} s."]
    if "reps" in result:
        lines.append(f"Each figure: median ± IQR over {result['reps']} interleaved repetitions after {result['warmup']} "
                     "untimed warm-up calls (history token on/off: four times as many; training vs loader: twice); "
                     "ratios: median of per-repetition ratios with its bootstrap 95% interval.")
    return "\n".join(lines)


def goals_cpu(result) -> list[dict]:
    goals = []
    for s in result["settings"]:
        r = s["ratio_pipeline_vs_pi0_end_to_end"]["median"]
        goals.append({"goal": f"pipeline latency <= {GOAL_PI0_RATIO}x PI0 at matched size [{s['setting']}]",
                      "value": f"{r:.2f}x end to end (model only {s['ratio_model_vs_pi0_model']['median']:.2f}x)",
                      "measured": r, "pass": r <= GOAL_PI0_RATIO})
    for s in result["settings"]:
        f = s["breakdown_share_of_pipeline"]["flow_steps"]
        floor = s.get("flow_floor")
        at_floor = (f"; {100 * floor['memory']['share_at_floor']:.1f}% if the steps ran at this machine's "
                    f"memory-streaming limit, {floor['memory']['flow_over_floor']:.1f}x away") if floor else ""
        goals.append({"goal": f"flow steps <= {GOAL_FLOW_SHARE:.0%} of pipeline latency [{s['setting']}]",
                      "value": f"{100 * f:.1f}% (within-call {100 * s['flow_share_within_call']:.1f}%{at_floor})",
                      "measured": f, "pass": f <= GOAL_FLOW_SHARE})
    vs_size = result.get("few_step_share_vs_vlm_size") or []
    by_size = "".join(f"; {100 * r['flow_share']:.1f}% of predict_action with a {r['language_model']} language model "
                      f"({r['params']['vlm'] / 1e6:.1f}M VLM, {r['params']['action_head'] / 1e6:.1f}M head)"
                      for r in vs_size[1:])
    for s in result["settings"]:
        fs = s.get("few_step")
        if not fs:
            continue
        f = fs["flow_share_of_pipeline"]
        floor = fs.get("flow_floor", {}).get("memory")
        at_floor = (f"; {100 * floor['share_at_floor']:.1f}% at this machine's memory-streaming limit, "
                    f"{floor['flow_over_floor']:.1f}x away") if floor else ""
        goals.append({"goal": f"{fs['steps']}-step flow steps <= {GOAL_FEW_STEP_FLOW_SHARE:.0%} of pipeline latency "
                              f"[{s['setting']}]",
                      "value": f"{100 * f:.1f}% (within-call {100 * fs['flow_share_within_call']:.1f}%{at_floor})",
                      "measured": f, "pass": f <= GOAL_FEW_STEP_FLOW_SHARE})
        r = fs["ratio_pipeline_vs_pi0_end_to_end"]["median"]
        b16 = fs.get("bf16_head")
        with_bf16 = (f"; {100 * b16['flow_share_of_pipeline']:.1f}% and "
                     f"{b16['ratio_pipeline_vs_pi0_end_to_end']['median']:.2f}x with a bf16 action head") if b16 else ""
        comp = fs.get("compiled_flow", {})
        with_compiled = "".join(f"; {100 * c['flow_share_of_pipeline']:.1f}% and "
                                f"{c['ratio_pipeline_vs_pi0_end_to_end']['median']:.2f}x compiled, {name} head"
                                for name, c in comp.items())
        goals[-1]["value"] += with_bf16 + with_compiled + (
            by_size if vs_size and s["preset"] == vs_size[0].get("preset", "small") else "")
        # What the ratio would be with the flow at no cost at all: the VLM prefix, pre- and postprocessing alone.
        pipe_ms = s["latency"][f"ours_pipeline_{fs['steps']}step"]["median_ms"]
        pi0_ms = s["latency"][f"pi0_end_to_end_{fs['pi0_steps']}step"]["median_ms"]
        bound = (pipe_ms - fs["breakdown_ms"]["flow_steps"]["median_ms"]) / pi0_ms
        goals.append({"goal": f"{fs['steps']}-step pipeline <= {GOAL_FEW_STEP_PI0_RATIO}x PI0 at {fs['pi0_steps']} "
                              f"steps [{s['setting']}]",
                      "value": f"{r:.2f}x end to end" + (f" ({b16['ratio_pipeline_vs_pi0_end_to_end']['median']:.2f}x "
                                                         "with a bf16 action head)" if b16 else "")
                               + "".join(f" ({c['ratio_pipeline_vs_pi0_end_to_end']['median']:.2f}x compiled, {name} "
                                         "head)" for name, c in comp.items())
                               + f"; {bound:.2f}x with the flow at zero cost (the rest of our pipeline alone)",
                      "measured": r, "zero_flow_bound": round(bound, 4), "pass": r <= GOAL_FEW_STEP_PI0_RATIO})
    tr = result.get("training")
    if tr:
        for name, r in (("inference (pipeline)", tr["history_token_inference"]["ratio_pipeline_on_off"]),
                        ("inference (predict_action)", tr["history_token_inference"]["ratio_model_on_off"]),
                        ("training step", tr["history_token_training"]["ratio_on_off"])):
            ci = r.get("ci95", [r["median"], r["median"]])
            goals.append({"goal": f"history token overhead <= {GOAL_HISTORY_OVERHEAD:.0%}, {name}",
                          "value": f"{100 * (r['median'] - 1):+.1f}% (95% interval of the median "
                                   f"[{100 * (ci[0] - 1):+.1f}%, {100 * (ci[1] - 1):+.1f}%], IQR of ratio "
                                   f"{r['iqr']:.3f})",
                          "measured": r["median"] - 1, "pass": r["median"] - 1 <= GOAL_HISTORY_OVERHEAD})
        for k in ("stage1", "stage2", "stage2_video"):
            if k not in tr:
                continue
            r = tr[k]["loader_over_training"]
            goals.append({"goal": f"loader >= {GOAL_LOADER_RATIO:.0f}x training demand, {k}",
                          "value": f"{r:.1f}x", "measured": r, "pass": r >= GOAL_LOADER_RATIO})
    return goals


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(threads=None) -> dict:
    import torch

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "requested_threads": threads,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "load_average_start": load_average()}


#: Working sets of the weight-streaming measurement: one the caches hold (the head's weights when nothing evicts them)
#: and one they cannot (the head's weights after the VLM prefix and other tenants of the shared cache evicted them).
STREAM_CACHE_MB, STREAM_MEMORY_MB = 32, 512


def flow_floor(setting: dict, gbps: float) -> dict:
    """The flow steps at the machine's weight-streaming limit: each step reads the head's weights once, so 10 steps
    take at least ``10 * bytes / rate``; and the flow's share of the pipeline if it ran there, the rest unchanged."""
    floor_ms = setting["flow_steps"] * setting["flow_step_weight_bytes"] / (gbps * 1e9) * 1e3
    flow_ms = setting["breakdown_ms"]["flow_steps"]["median_ms"]
    pipeline_ms = setting["latency"]["ours_pipeline"]["median_ms"]
    rest = pipeline_ms - flow_ms
    return {"floor_ms": round(floor_ms, 3), "flow_over_floor": round(flow_ms / floor_ms, 2),
            "share_at_floor": round(floor_ms / (rest + floor_ms), 4), "gbps": round(gbps, 1),
            "mb_per_step": round(setting["flow_step_weight_bytes"] / 2**20, 2)}


def few_step_floor(setting: dict, gbps: float) -> dict:
    """The few-step flow at the weight-streaming limit: once per chunk the conditioning reads every block's modulation
    layer (it depends on the chunk's latent), then each step reads the head's step weights; the share of the
    few-step pipeline the flow would have there, the rest unchanged. A goal below ``share_at_floor`` cannot be met by
    a faster implementation of this head, only by a head that reads fewer bytes per chunk."""
    fs = setting["few_step"]
    byts = fs["steps"] * setting["flow_step_weight_bytes"] + setting["flow_chunk_weight_bytes"]
    floor_ms = byts / (gbps * 1e9) * 1e3
    flow_ms = fs["breakdown_ms"]["flow_steps"]["median_ms"]
    rest = setting["latency"][f"ours_pipeline_{fs['steps']}step"]["median_ms"] - flow_ms
    return {"floor_ms": round(floor_ms, 3), "flow_over_floor": round(flow_ms / floor_ms, 2),
            "share_at_floor": round(floor_ms / (rest + floor_ms), 4), "gbps": round(gbps, 1),
            "mb_per_chunk": round(byts / 2**20, 2)}


def run_cpu(args) -> dict:
    import torch
    from flops import matmul_gflops, stream_gbps

    t_start = time.perf_counter()
    result = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "quick": args.quick,
              "machine": machine_info(args.threads), "reps": args.reps, "warmup": args.warmup}
    print(f"threads: torch {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op; "
          f"load average {load_average()}", flush=True)
    mm_start = [matmul_gflops(n) for n in (512, 1024)]
    stream_start = {"cache": stream_gbps(STREAM_CACHE_MB), "memory": stream_gbps(STREAM_MEMORY_MB)}
    with tempfile.TemporaryDirectory(prefix="actprior-speed-") as tmp:
        result["settings"] = [run_setting(args, p, s, c, tmp) for p in args.presets for s in args.image_sizes
                              for c in args.chunks] if "latency" in args.sections else []
        if "latency" in args.sections and not args.quick:
            result["few_step_share_vs_vlm_size"] = few_step_share_vs_vlm_size(args, args.train_preset, args.reps)
        if "training" in args.sections:
            result["training"] = training_sections(args, tmp)
    mm_end = [matmul_gflops(n) for n in (512, 1024)]
    stream_end = {"cache": stream_gbps(STREAM_CACHE_MB), "memory": stream_gbps(STREAM_MEMORY_MB)}
    # Would half-precision weights make a flow step cheaper here? Only if torch streams them at more weights/s.
    low_precision = {name: stream_gbps(STREAM_CACHE_MB, dtype=getattr(torch, name)) for name in ("bfloat16", "float16")}
    peak = max(m["median_gflops"] for m in mm_start + mm_end)
    best = {k: max(stream_start[k]["median_gbps"], stream_end[k]["median_gbps"]) for k in ("cache", "memory")}
    result["machine_limit"] = {"start": mm_start, "end": mm_end, "peak_gflops": peak,
                               "weight_stream": {"start": stream_start, "end": stream_end, "best_gbps": best,
                                                 "low_precision_cache": low_precision}}
    for s in result["settings"]:
        s["flow_floor"] = {k: flow_floor(s, best[k]) for k in ("cache", "memory")}
        if "few_step" in s:
            s["few_step"]["flow_floor"] = {k: few_step_floor(s, best[k]) for k in ("cache", "memory")}
    result["contention"] = contention_summary()
    worst = max((c["inflation"] for c in result["contention"].values()), default=1.0)
    result["contended"] = worst > CONTENTION_LIMIT
    result["goals"] = goals_cpu(result)
    result["machine"]["load_average_end"] = load_average()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


# ------------------------------------------------------------------------------------------------ GPU section
def run_gpu(args) -> dict:
    """bf16 Stage-2 training step (LoRA), peak memory, MFU and latency at the ``--gpu-preset`` size, next to PI0."""
    import torch
    from flops import count_flops, matmul_gflops, nominal_peak_tflops
    from transformers import pipeline as hf_pipeline

    import modeling_actprior as ap

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed.py --gpu-7b: torch sees no CUDA device (torch.cuda.is_available() is False).")
    dtype = getattr(torch, args.gpu_dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    result = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "device": name,
              "dtype": args.gpu_dtype, "preset": args.gpu_preset, "vlm_family": args.vlm_family,
              "machine": machine_info(args.threads)}
    print(f"[gpu] device {name}, {args.gpu_dtype}, preset {args.gpu_preset}", flush=True)
    n_mm = 8192 if dev.type == "cuda" else 512
    mm = matmul_gflops(n_mm, reps=10, dtype=dtype, device=dev)
    nominal = nominal_peak_tflops(name) if dev.type == "cuda" else None
    result["matmul"] = mm
    result["nominal_peak_tflops"] = nominal

    # Build directly on the device in the target dtype; image token id 3 so the built-in processor applies.
    image_token_id = 3
    cfg = vla_config(args.gpu_preset, args.vlm_family, None, 16, image_token_id=image_token_id, lora_r=args.lora_r)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = ap.VLAWithPriorForAction(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.normalizer = make_normalizer(cfg.prior_config.max_action_dim)
    processor = ap.ActionPriorProcessor.from_config(model.config, model.normalizer, instructions=INSTRUCTIONS)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    split = ours_param_split(model)
    split["trainable"] = model.num_trainable_parameters()
    result["ours_params"] = split
    print(f"[gpu] built ours in {result['build_s']} s: {millions(split['total'])} params, "
          f"{millions(split['trainable'])} trainable", flush=True)

    # ---------------------------------------------------------------- training step
    b, img = args.gpu_batch, cfg.vlm_config.vision_config.image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (img, img, 3), dtype=np.uint8) for _ in range(b)]
    f = processor(images=images, text=[INSTRUCTIONS[i % 3] for i in range(b)])
    pc = cfg.prior_config
    batch = {"input_ids": f["input_ids"].to(dev), "attention_mask": f["attention_mask"].to(dev),
             "pixel_values": f["pixel_values"].to(dev, dtype),
             "history": torch.randn(b, pc.history_length, D_MAX, device=dev),
             "history_mask": torch.ones(b, pc.history_length, dtype=torch.bool, device=dev),
             "actions": torch.randn(b, pc.chunk_size, D_MAX, device=dev),
             "action_mask": torch.ones(b, pc.chunk_size, dtype=torch.bool, device=dev),
             "dim_mask": torch.ones(b, D_MAX, dtype=torch.bool, device=dev)}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reps = 10 if dev.type == "cuda" else 3
    t = interleave({"train_step": step}, reps, 0, sync)
    step_s = summarize(t["train_step"])["median_ms"] / 1e3
    flops, _ = count_flops(lambda: model(**batch).loss.backward())
    opt.zero_grad(set_to_none=True)
    achieved = flops / step_s / 1e12
    result["training"] = {
        "batch_size": b, "prefix_tokens": int(batch["input_ids"].shape[1]) + 2, "lora_r": args.lora_r,
        "step": summarize(t["train_step"]), "samples_per_s": round(b / step_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "fwd_bwd_flops": flops, "achieved_tflops": round(achieved, 2),
        "mfu_vs_measured_matmul": round(achieved / (mm["median_gflops"] / 1e3), 4),
        "mfu_vs_nominal": round(achieved / nominal, 4) if nominal else None,
    }
    print(f"[gpu] train step {result['training']['step']['median_ms']:.1f} ms, "
          f"{achieved:.1f} TFLOP/s", flush=True)
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- inference, and PI0 at a matching size
    model.eval()
    robot = hf_pipeline("robot-action", model=model, processor=processor, device=dev)
    split = ours_param_split(model)
    sizing = size_pi0_expert(args.gpu_preset, None, pc.chunk_size, split["active_inference"], image_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with dev:
            pi0 = build_pi0(args.gpu_preset, None, pc.chunk_size, sizing, image_token_id=image_token_id)
    finally:
        torch.set_default_dtype(torch.float32)
    result["pi0_params"] = pi0_param_split(pi0)
    result["pi0_expert_sizing"] = sizing
    image, history = images[0], rng.normal(size=(pc.history_length, 7)).astype(np.float32)
    f1 = robot.preprocess({"images": image, "instruction": INSTRUCTIONS[0], "history": history,
                           "embodiment": EMBODIMENT, "state": None}, seed=0)
    inputs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in f1.items()
              if k not in ("embodiments", "batched")}
    p1 = processor(images=[image], text=[INSTRUCTIONS[0]])
    pi0_inputs = {"input_ids": p1["input_ids"].to(dev), "attention_mask": p1["attention_mask"].to(dev),
                  "pixel_values": p1["pixel_values"][:, None].to(dev, dtype),
                  "pixel_attention_mask": torch.ones(1, 1, dtype=torch.bool, device=dev),
                  "state": torch.zeros(1, D_MAX, device=dev, dtype=dtype),
                  "noise": torch.randn(1, pc.chunk_size, D_MAX, device=dev, dtype=dtype)}
    norm = model.normalizer

    @torch.no_grad()
    def pi0_end_to_end():
        p = processor(images=[image], text=[INSTRUCTIONS[0]])
        out = pi0.sample_actions(input_ids=p["input_ids"].to(dev), attention_mask=p["attention_mask"].to(dev),
                                 pixel_values=p["pixel_values"][:, None].to(dev, dtype),
                                 pixel_attention_mask=pi0_inputs["pixel_attention_mask"], state=pi0_inputs["state"],
                                 noise=torch.randn(1, pc.chunk_size, D_MAX, dtype=dtype).to(dev), num_steps=FLOW_STEPS)
        return norm.unnormalize(out[0, :, :7].float().cpu(), EMBODIMENT).numpy()

    @torch.no_grad()
    def encode():
        return model.encode(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], inputs["history"],
                            inputs["history_mask"], inputs["dim_mask"])

    z = encode()[0]
    fns = {
        "ours_pipeline": lambda: robot(image, instruction=INSTRUCTIONS[0], history=history, embodiment=EMBODIMENT,
                                       seed=0, num_inference_steps=FLOW_STEPS),
        "ours_predict_action": lambda: model.predict_action(**inputs, num_inference_steps=FLOW_STEPS),
        "ours_vlm_prefix": encode,
        "ours_flow_steps": lambda: model.sample_actions(z, inputs["dim_mask"], FLOW_STEPS, noise=inputs["noise"]),
        "pi0_end_to_end": pi0_end_to_end,
        "pi0_sample_actions": lambda: pi0.sample_actions(**pi0_inputs, num_steps=FLOW_STEPS),
    }
    reps = 20 if dev.type == "cuda" else 3
    t = interleave(fns, reps, 2, sync)
    pred_flops, _ = count_flops(fns["ours_predict_action"])
    pi0_flops, _ = count_flops(fns["pi0_sample_actions"])
    lat = {k: summarize(v) for k, v in t.items()}
    result["inference"] = {
        "batch_size": 1, "flow_steps": FLOW_STEPS, "latency": lat,
        "ratio_pipeline_vs_pi0_end_to_end": paired_ratio(t["ours_pipeline"], t["pi0_end_to_end"]),
        "ratio_predict_vs_pi0_sample_actions": paired_ratio(t["ours_predict_action"], t["pi0_sample_actions"]),
        "flow_share_of_pipeline": round(lat["ours_flow_steps"]["median_ms"] / lat["ours_pipeline"]["median_ms"], 4),
        "flops": {"ours_predict_action": pred_flops, "pi0_sample_actions": pi0_flops},
    }
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def report_gpu(r) -> str:
    tr, inf = r["training"], r["inference"]
    lines = [f"### GPU: {r['device']}, {r['dtype']}, preset {r['preset']} ({r['vlm_family']}), LoRA r={tr['lora_r']}",
             md_table(["measure", "value"], [
                 ["params ours total / trainable", f"{millions(r['ours_params']['total'])} / "
                                                   f"{millions(r['ours_params']['trainable'])}"],
                 ["params PI0 active (expert width/ffn)", f"{millions(r['pi0_params']['active_inference'])} "
                  f"({r['pi0_expert_sizing']['expert_hidden']}/{r['pi0_expert_sizing']['expert_ffn']}, "
                  f"{100 * r['pi0_expert_sizing']['mismatch']:+.1f}%)"],
                 [f"matmul {r['matmul']['n']}² {r['dtype']}", f"{r['matmul']['median_gflops'] / 1e3:.1f} TFLOP/s"],
                 [f"Stage-2 train step, batch {tr['batch_size']} (ms)", fmt(tr["step"])],
                 ["samples/s", tr["samples_per_s"]],
                 ["peak memory (GiB)", tr["peak_memory_gib"]],
                 ["achieved TFLOP/s (fwd+bwd FLOPs / step)", tr["achieved_tflops"]],
                 ["MFU vs measured matmul / vs nominal", f"{tr['mfu_vs_measured_matmul']:.3f} / {tr['mfu_vs_nominal']}"],
                 *[[f"latency {k} (ms)", fmt(v)] for k, v in inf["latency"].items()],
                 ["ours pipeline / PI0 end-to-end", fmt_ratio(inf["ratio_pipeline_vs_pi0_end_to_end"])],
                 ["ours predict_action / PI0 sample_actions", fmt_ratio(inf["ratio_predict_vs_pi0_sample_actions"])],
                 ["flow steps share of pipeline", f"{100 * inf['flow_share_of_pipeline']:.1f}%"],
             ])]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.gpu_7b:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import transformers

    import modeling_actprior  # noqa: F401  (registers the Auto classes and the robot-action task)

    transformers.logging.set_verbosity_error()
    if args.report_from:
        with open(args.report_from) as f:
            result = json.load(f)
        if "settings" not in result:
            raise SystemExit(f"--report-from {args.report_from}: not the results of a CPU run of this benchmark "
                             "(no 'settings'); pass benchmarks/results/speed.json or a file like it.")
        result["goals"] = goals_cpu(result)
        result["report_regenerated_by"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
        args.out = args.report_from
        text = report_cpu(result)
    elif args.gpu_7b:
        result = run_gpu(args)
        text = report_gpu(result)
    else:
        result = run_cpu(args)
        text = report_cpu(result)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from modeling_actprior.training import write_json, write_text

    # Whole or not at all: a failed write keeps the previous report.
    write_json(args.out, result)
    md = os.path.splitext(args.out)[0] + ".md"
    write_text(md, markdown_header(result) + "\n\n" + text + "\n")
    print(f"\nwrote {args.out} and {md}" + (" (the report only; no measurement)" if args.report_from
                                            else f" ({result['wall_s']} s)"))
    if args.update_readme:
        from docs_page import replace_block

        replace_block(str(ROOT / "docs" / "performance.md"), README_START, README_END,
                      markdown_header(result) + "\n\n" + text)
        print("updated docs/performance.md")
    return result


README_START, README_END = "<!-- speed:start -->", "<!-- speed:end -->"


if __name__ == "__main__":
    main()
