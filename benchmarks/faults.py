"""Fault benchmark: how often a fault loses work or lets bad data through (both must be never).

Runs, on tiny synthetic data (CPU, a few minutes):

* **kill points**: a real Stage-1 and Stage-2 training process is killed with SIGKILL at the named moments of
  ``tests/fault_injection.py`` (just after the first checkpoint, while a checkpoint is being written, late in the
  run) and at ``--random-kills`` random moments each, then resumed with ``--resume_from_checkpoint latest``. It
  survived if the resumed run's final weights equal an uninterrupted run's bit for bit. ``actprior generate``
  (with a stand-in simulator) is killed while writing its second dataset and rerun the same way.
* **write errors**: a training process whose files may not grow past ``--fsize-limit-kb`` (``RLIMIT_FSIZE``:
  writes fail like on a full disk) must stop with a clear error, keep no partial checkpoint, and a rerun without
  the limit must reach the same weights.
* **bad input**: every case of ``tests/test_bad_input.py`` (NaN states, missing statistics, wrong widths, bad
  images, impossible configs, truncated / tampered / newer files): refused cleanly = the expected error naming
  what is wrong, and nothing on disk changed.
* **second pass**: the cases of ``tests/test_reliability.py`` (what a hostile user broke on an earlier main: user
  files deleted by ``--overwrite``, models of NaN saved, NaN actions returned, training through NaN, mixed resumes,
  stale caches, checksum bypass...), each run as its own pytest case and counted by what a failure would mean:
  ``data lost`` (a user's files or a run's work), ``silent wrong result`` (a wrong number with exit code 0) or an
  unclear refusal.
* **scan**: every checkpoint any of these runs left is checked (complete, sha256 matching, weights loadable, no
  pickle) and every generated dataset loaded with full validation; ``files left corrupted`` must be 0.

    OMP_NUM_THREADS=1 python benchmarks/faults.py --random-kills 2 --out benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from fault_injection import (  # noqa: E402
    ENV,
    after_seconds,
    checkpoint_problems,
    command,
    dataset_problems,
    fake_generate,
    final_weights,
    generate_command,
    kill_points,
    pickle_files,
    run,
    run_and_kill,
    same_weights,
    stage1_inputs,
    stage2_inputs,
)
from tqdm.auto import tqdm  # noqa: E402

from modeling_actprior.training import CHECKPOINT_DIR, list_checkpoints  # noqa: E402


def _last_step(out: Path) -> int:
    ckpts = list_checkpoints(str(out))
    return int(Path(ckpts[-1]).name[5:]) if ckpts else 0


def kill_trial(stage: int, inputs: list[str], expected: dict, out: Path, name: str, predicate) -> dict:
    """Kill a run at ``predicate``, check what it left, resume it, compare its final weights."""
    cmd = command(stage, inputs, out)
    t0 = time.perf_counter()
    killed = run_and_kill(cmd, out / CHECKPOINT_DIR, predicate)
    left = checkpoint_problems(out)
    resumed_from = _last_step(out)
    run(cmd + ["--resume_from_checkpoint", "latest"])
    differ = same_weights(final_weights(out), expected)
    return {"kind": "kill", "stage": str(stage), "point": name, "killed": killed, "resumed_from_step": resumed_from,
            "survived": killed and not differ and not left, "weights_differ": len(differ), "problems": left,
            "seconds": round(time.perf_counter() - t0, 1)}


def generate_trial(tmp: Path, reference: Path) -> dict:
    """Kill ``actprior generate`` while it writes its second dataset, rerun it, compare with an uninterrupted run."""
    import pyarrow.parquet as pq

    out = tmp / "generate-cut"
    t0 = time.perf_counter()
    killed = run_and_kill(generate_command(out, delay=0.05), out,
                          lambda d: (d / "sawyer" / "meta" / "info.json").is_file() and any(d.glob("xarm6.tmp-*")))
    left = [p for d in out.iterdir() if (d / "meta" / "info.json").is_file() for p in dataset_problems(d)]
    fake_generate(str(out))
    same = all(
        pq.read_table(p).equals(pq.read_table(reference / p.relative_to(out)))
        for p in out.rglob("*.parquet")
    ) and sorted(os.listdir(out)) == sorted(os.listdir(reference))
    return {"kind": "kill", "stage": "generate", "point": "second_dataset_in_progress", "killed": killed,
            "resumed_from_step": None, "survived": killed and same and not left, "weights_differ": 0 if same else 1,
            "problems": left, "seconds": round(time.perf_counter() - t0, 1)}


def write_error_trial(stage: int, inputs: list[str], expected: dict, out: Path, limit_kb: int) -> dict:
    """A run whose files can't grow past ``limit_kb`` (writes fail as on a full disk), then a rerun without it."""
    cmd = command(stage, inputs, out)
    t0 = time.perf_counter()

    def limit():  # in the child: writes past the limit fail with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    clear = proc.returncode != 0 and "Could not write checkpoint" in proc.stderr and "MiB free" in proc.stderr
    leftovers = [p.name for p in (out / CHECKPOINT_DIR).glob(".tmp-*")] if (out / CHECKPOINT_DIR).exists() else []
    left = checkpoint_problems(out) + [f"{out}/{CHECKPOINT_DIR}/{n}: partial folder left" for n in leftovers]
    resumed_from = _last_step(out)
    run(cmd + ["--resume_from_checkpoint", "latest"])
    differ = same_weights(final_weights(out), expected)
    return {"kind": "write_error", "stage": str(stage), "point": f"files_limited_to_{limit_kb}KiB", "killed": None,
            "resumed_from_step": resumed_from, "survived": clear and not differ and not left,
            "weights_differ": len(differ), "problems": left, "error": tail[:300],
            "seconds": round(time.perf_counter() - t0, 1)}


#: ``tests/test_reliability.py`` case -> what it would mean if it failed.
SECOND_PASS = {
    "test_overwrite_refuses_a_folder_the_library_did_not_write_and_keeps_its_files": "data lost",
    "test_overwrite_replaces_our_dataset_but_not_one_holding_a_users_file": "data lost",
    "test_a_checkpoint_of_another_kind_or_with_missing_tensors_is_refused_by_name": "silent wrong result",
    "test_train_stage2_with_a_vla_as_prior_fails_before_training_and_saves_nothing": "silent wrong result",
    "test_non_finite_actions_are_refused_naming_the_input_or_the_weight": "silent wrong result",
    "test_a_value_far_outside_the_datasets_statistics_is_reported_before_training": "silent wrong result",
    "test_non_finite_loss_stops_at_once_naming_step_and_windows": "silent wrong result",
    "test_empty_images_are_refused": "silent wrong result",
    "test_resume_with_options_that_change_the_result_is_refused_by_name": "silent wrong result",
    "test_training_options_out_of_range_are_refused_by_the_parser": "unclear refusal",
    "test_evaluate_and_generate_options_out_of_range_are_refused": "silent wrong result",
    "test_checksum_manifest_cannot_point_outside_the_checkpoint_and_its_absence_is_logged": "silent wrong result",
    "test_a_data_file_rewritten_with_its_mtime_restored_is_not_served_from_the_cache": "silent wrong result",
    "test_impossible_statistics_and_config_values_are_refused": "silent wrong result",
    "test_two_robots_under_one_name_with_other_definitions_are_not_pooled": "silent wrong result",
    "test_model_arguments_accept_run_folders_and_explain_the_rest": "unclear refusal",
    "test_an_instruction_holding_the_image_token_is_refused": "unclear refusal",
    "test_truncated_episode_metadata_and_a_dataset_without_episodes_are_named": "unclear refusal",
    "test_ragged_histories_and_damaged_processor_files_are_explained": "unclear refusal",
    "test_a_failed_write_of_a_final_folder_names_the_folder_and_the_free_space": "data lost",
    "test_a_mixed_resume_is_refused_through_the_command_line": "silent wrong result",
}


def second_pass(tmp: Path) -> list[dict]:
    """Run every ``tests/test_reliability.py`` case (parametrized ones count each parameter) and classify it."""
    import xml.etree.ElementTree as ET

    report = tmp / "second-pass.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" /
                    "test_reliability.py"), f"--junitxml={report}", f"--basetemp={tmp / 'second-pass'}"],
                   cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        failed = next((c for c in case if c.tag in ("failure", "error")), None)
        base = name.split("[")[0]
        cases.append({"case": name, "if_broken": SECOND_PASS.get(base, "unclassified"), "passed": failed is None,
                      "detail": (failed.get("message") or "")[:400] if failed is not None else ""})
    unknown = sorted({c["case"].split("[")[0] for c in cases} - set(SECOND_PASS))
    if unknown:
        raise SystemExit(f"faults.py: classify the new reliability cases in SECOND_PASS: {unknown}")
    return cases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-kills", type=int, default=2, help="kills at random moments, per training stage")
    p.add_argument("--fsize-limit-kb", type=int, default=256, help="file size limit of the write-error trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--keep", action="store_true", help="keep the working folder (printed) for inspection")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="actprior-faults-"))

    # References: uninterrupted runs, timed to place the random kills within them.
    stages = {}
    for stage, make_inputs in ((1, stage1_inputs), (2, stage2_inputs)):
        inputs = make_inputs(tmp / f"stage{stage}")
        t0 = time.perf_counter()
        run(command(stage, inputs, tmp / f"stage{stage}" / "reference"))
        stages[stage] = (inputs, final_weights(tmp / f"stage{stage}" / "reference"), time.perf_counter() - t0)
    fake_generate(str(tmp / "generate-reference"))

    plan = []
    for stage in (1, 2):
        plan += [("kill", stage, name, predicate) for name, predicate in kill_points(stage).items()]
        for i in range(args.random_kills):
            moment = rng.uniform(0.2, 0.8) * stages[stage][2]
            plan.append(("kill", stage, f"random_{i}_at_{moment:.1f}s", moment))
        plan.append(("write_error", stage, None, None))
    plan.append(("generate", None, None, None))

    trials = []
    for i, (kind, stage, name, point) in enumerate(tqdm(plan, desc="fault trials", unit="trial")):
        out = tmp / f"trial-{i:02d}"
        if kind == "kill":
            inputs, expected, _ = stages[stage]
            predicate = after_seconds(point) if isinstance(point, float) else point
            trials.append(kill_trial(stage, inputs, expected, out, name, predicate))
        elif kind == "write_error":
            inputs, expected, _ = stages[stage]
            trials.append(write_error_trial(stage, inputs, expected, out, args.fsize_limit_kb))
        else:
            trials.append(generate_trial(tmp, tmp / "generate-reference"))

    # Bad input: each case in a fresh folder.
    import test_bad_input

    bad = []
    for case in tqdm(test_bad_input.CASES, desc="bad-input cases", unit="case"):
        ok, detail = test_bad_input.run_case(case, tmp / "bad-input" / case.name)
        bad.append({"case": case.name, "refused_cleanly": ok, "detail": detail[:400]})

    second = second_pass(tmp)

    # Scan everything the fault trials wrote: checkpoints of every run, generated datasets. (The bad-input and
    # second-pass cases damage their files on purpose; what counts there is that they were refused and left unchanged.)
    on_purpose = ("bad-input", "second-pass")
    outputs = sorted({c.parent.parent for c in tmp.rglob(f"{CHECKPOINT_DIR}/step-*")
                      if not any(k in str(c) for k in on_purpose)})
    scanned = sum(len(list((o / CHECKPOINT_DIR).glob("step-*"))) for o in outputs)
    corrupted = [p for o in outputs for p in checkpoint_problems(o)]
    datasets = sorted(d.parent.parent for d in tmp.rglob("meta/info.json") if not any(k in str(d) for k in on_purpose))
    corrupted += [p for d in datasets for p in dataset_problems(d)]
    pickles = [f for o in outputs for f in pickle_files(o / CHECKPOINT_DIR)]

    kills = [t for t in trials if t["kind"] == "kill"]
    summary = {
        "kill_points_tried": len(kills),
        "kill_points_killed_mid_run": sum(bool(t["killed"]) for t in kills),
        "kill_points_survived": sum(t["survived"] for t in kills),  # killed mid-run, resumed to identical weights
        "write_errors_tried": sum(t["kind"] == "write_error" for t in trials),
        "write_errors_survived": sum(t["survived"] for t in trials if t["kind"] == "write_error"),
        "bad_input_cases_tried": len(bad),
        "bad_input_cases_refused_cleanly": sum(b["refused_cleanly"] for b in bad),
        "second_pass_cases_tried": len(second),
        "second_pass_refused_cleanly": sum(c["passed"] for c in second),
        "second_pass_data_lost": sum(not c["passed"] and c["if_broken"] == "data lost" for c in second),
        "second_pass_silent_wrong_results": sum(not c["passed"] and c["if_broken"] == "silent wrong result"
                                                for c in second),
        "checkpoints_scanned": scanned,
        "datasets_scanned": len(datasets),
        "files_left_corrupted": len(corrupted),
        "pickle_files_in_checkpoints": len(pickles),
        "seconds": round(time.perf_counter() - start, 1),
    }
    result = {"summary": summary, "trials": trials, "bad_input": bad, "second_pass": second, "corrupted": corrupted, "pickles": pickles,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "platform": platform.platform(), "cpus": os.cpu_count(),
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "command": "python benchmarks/faults.py " + " ".join(sys.argv[1:] if argv is None else argv)}

    print(f"\n{'stage':<9} {'fault':<34} {'killed':>6} {'from':>5} {'same weights':>12} {'survived':>8} {'s':>6}")
    for t in trials:
        killed = "-" if t["killed"] is None else str(t["killed"])
        from_step = "-" if t["resumed_from_step"] is None else str(t["resumed_from_step"])
        print(f"{t['stage']:<9} {t['point']:<34} {killed:>6} {from_step:>5} "
              f"{str(t['weights_differ'] == 0):>12} {str(t['survived']):>8} {t['seconds']:>6}")
    print(f"\n{'bad-input case':<46} refused cleanly")
    for b in bad:
        print(f"{b['case']:<46} {b['refused_cleanly']}")
    print(f"\n{'second-pass case':<86} {'if broken':<20} passed")
    for c in second:
        print(f"{c['case'][:86]:<86} {c['if_broken']:<20} {c['passed']}")
    print()
    for k, v in summary.items():
        print(f"{k:<34} {v}")
    for problem in corrupted + pickles:
        print("CORRUPTED:", problem)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    if args.keep:
        print(f"working folder kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
