#!/usr/bin/env python
"""Full fine-tuning against three ALaST variants at the same training FLOPs, over paired seeds.

Runs the fine-tuning job (``python -m alast_finetune``) three times with the same seeds, data and starting weights:

1. ``full`` and ``alast --policy paper`` (the authors' algorithm, tokens dropped, ``alpha`` = ``--lr``);
2. ``alast`` (the library's policy, tokens carried) with ``--flop-budget`` = the paper runs' mean FLOPs ratio;
3. the same with ``--tokens drop``.

and writes ``benchmarks/results/cpu_finetune_alast_variants.json``: per variant the accuracy gap to full
fine-tuning paired by seed (mean and standard error), training FLOPs, saved activation bytes and train time
as ratios to full fine-tuning, with every run's numbers and the job's own records.

    python benchmarks/alast_variants.py --seeds 5 --steps 150 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

from record import write_results


def run_job(out: str, args, extra) -> dict:
    cmd = [sys.executable, "-m", "alast_finetune", "--seeds", str(args.seeds), "--steps", str(args.steps),
           "--threads", str(args.threads), "--quiet", "--out", out, *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def per_seed(record: dict, method: str, key: str):
    return [run[key] for run in record["runs"][method]]


def paired(values, reference):
    gaps = [a - b for a, b in zip(values, reference)]
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
    return {"mean": statistics.mean(gaps), "standard_error": se, "per_seed": gaps}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("runs", "alast-variants"))
    args = p.parse_args()

    records = {"paper": run_job(os.path.join(args.out, "paper"), args,
                                ["--methods", "full,alast", "--policy", "paper"])}
    full = records["paper"]
    full_flops = per_seed(full, "full", "train_flops")
    budget = statistics.mean(a / b for a, b in zip(per_seed(full, "alast", "train_flops"), full_flops))
    budget = math.floor(budget * 1000) / 1000  # at or under the paper runs' mean
    for name, extra in (("alast carry", []), ("alast drop", ["--tokens", "drop"])):
        records[name] = run_job(os.path.join(args.out, name.replace(" ", "-")), args,
                                ["--methods", "alast", "--policy", "alast", "--flop-budget", str(budget), *extra])

    def ratios(record, method, key):
        return [a / b for a, b in zip(per_seed(record, method, key), per_seed(full, "full", key))]

    variants = {}
    for name, record in records.items():
        accuracy = per_seed(record, "alast", "accuracy")
        variants[name] = {
            "accuracy": {"mean": statistics.mean(accuracy), "per_seed": accuracy},
            "accuracy_gap_to_full": paired(accuracy, per_seed(full, "full", "accuracy")),
            **{f"{key}_ratio_to_full": {"mean": statistics.mean(r), "per_seed": r}
               for key in ("train_flops", "peak_activation_bytes", "train_seconds")
               for r in [ratios(record, "alast", key)]},
        }
    flops = [v["train_flops_ratio_to_full"]["mean"] for v in variants.values()]
    write_results("cpu_finetune_alast_variants", {
        "what": "full fine-tuning against ALaST variants at the same training FLOPs, paired seeds",
        "seeds": args.seeds, "steps": args.steps, "threads": args.threads, "flop_budget": budget,
        "same_flops_within": max(flops) - min(flops),
        "full": {key: per_seed(full, "full", key) for key in ("accuracy", "train_flops", "peak_activation_bytes",
                                                               "train_seconds")},
        "variants": variants,
        "jobs": {name: {"args": r["args"], "summary": r.get("summary")} for name, r in records.items()},
    })


if __name__ == "__main__":
    main()
