#!/usr/bin/env python
"""The prior-vs-scratch study: does the Stage-1 action prior make a VLA learn faster, succeed more often and hold
up with few demonstrations, and does more Stage-1 data help?

    python benchmarks/prior_vs_scratch.py --budget small            # < 1 h on a 2-core CPU (3 MT10 tasks, 3 seeds)
    python benchmarks/prior_vs_scratch.py --budget full --jobs 8    # MT10, 10 and 50 demos: a GPU / many-core box

Variants (same VLM, data, seeds, optimizer and step budget; ``train_stage2.py --baseline``): no prior (random
action head, no distillation), decoder reuse, decoder reuse + early latent distillation, and the full method with
the history token. Every checkpoint is rolled out in closed loop in Meta-World on evaluation seeds the
demonstrations never used. The Stage-1 corpus (Meta-World tasks outside MT10, robosuite and pybullet arms) is
trained at several sizes for the data-scaling axis.

Writes into ``--out``: ``summary.json``, ``success_vs_steps.png``, ``final_success.png``, ``stage1_scaling.png``,
``prior_vs_scratch.md``; copies the JSON and table to ``benchmarks/results/`` and, with ``--update-readme``, puts the
table into ``docs/study.md`` between the ``prior-vs-scratch`` markers. Rerunning resumes: finished runs are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK_START, MARK_END = "<!-- prior-vs-scratch:start -->", "<!-- prior-vs-scratch:end -->"


def main(argv=None) -> int:
    from modeling_actprior.reports import markdown_summary, write_figures
    from modeling_actprior.study import BUDGETS, VARIANTS, run_study

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--out", default=None, help="study folder (default runs/prior_vs_scratch_<budget>)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: CPU cores / --threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=2, help="simulator processes for data generation")
    p.add_argument("--seeds", default=None, help="comma-separated Stage-2 seeds (default: the budget's)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--update-docs", "--update-readme", dest="update_readme", action="store_true",
                   help="write the table into docs/study.md (the report page the README links)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    budget = BUDGETS[args.budget]
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
        if unknown:
            p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        budget = dataclasses.replace(budget, variants=tuple(args.variants.split(",")))
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", f"prior_vs_scratch_{args.budget}"))
    t0 = time.time()
    summary = run_study(out, budget, jobs=args.jobs, threads=args.threads, workers=args.workers)
    figures = write_figures(out, summary)
    summary["wall_s"] = time.time() - t0
    table = markdown_summary(summary)
    machine = (f"{summary['machine']['cpus']} CPU cores, {summary['machine']['jobs']} runs in parallel x "
               f"{summary['machine']['threads_per_job']} thread(s)")
    minutes = sum(summary["timings"].values()) / 60
    text = (f"`python benchmarks/prior_vs_scratch.py --budget {args.budget}` ({machine}; {minutes:.0f} min: "
            + ", ".join(f"{k[:-2]} {v / 60:.0f} min" for k, v in summary["timings"].items()) + f"):\n\n{table}")
    with open(os.path.join(out, "prior_vs_scratch.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(text)
    print("figures: " + ", ".join(figures.values()))

    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    shutil.copy(os.path.join(out, "summary.json"), os.path.join(results, f"prior_vs_scratch_{args.budget}.json"))
    shutil.copy(os.path.join(out, "prior_vs_scratch.md"), os.path.join(results, f"prior_vs_scratch_{args.budget}.md"))
    docs = os.path.join(ROOT, "docs")
    os.makedirs(docs, exist_ok=True)
    for key, path in figures.items():
        shutil.copy(path, os.path.join(docs, f"prior_vs_scratch_{args.budget}_{key}.png"))
    if args.update_readme:
        update_readme(os.path.join(ROOT, "docs", "study.md"), text, args.budget)
    return 1 if summary.get("failed_jobs") else 0


def update_readme(path: str, text: str, budget: str) -> None:
    """Replace the block between the markers of the report page ``docs/study.md`` (the figures are the docs/ copies
    of this run's PNGs, beside it)."""
    from docs_page import replace_block

    figs = "\n\n".join(f"![{k}](prior_vs_scratch_{budget}_{k}.png)" for k in ("curves", "final", "scaling")
                       if os.path.isfile(os.path.join(ROOT, "docs", f"prior_vs_scratch_{budget}_{k}.png")))
    replace_block(path, MARK_START, MARK_END, f"{text}\n{figs}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
