"""Where a method's training-step time parts from its FLOPs: each step split into matrix products and the rest.

The study (``make study``) reports every method's wall-time ratio to full fine-tuning beside its FLOP
ratio. Where time lags FLOPs, something other than the counted matrix products costs time. This script
trains each method a few steps on the study's model and input shape (timm's ``vit_small_patch14_dinov2`` at
112 px, batch 16; the weights are random — time does not depend on them, and the token methods' compute is
fixed by their options), then for each:

* times ``--steps`` steady-state AdamW steps (median; the methods interleaved step by step, so load on the
  machine hits them alike);
* counts the step's FLOPs (``FlopCounterMode``);
* profiles ``--profiled`` steps with ``torch.profiler`` and splits their operator time into *matrix
  products* (``aten::mm``/``addmm``/``bmm``/the attention kernels: the work the FLOPs count) and
  *everything else* (normalisation, GELU, softmax, copies, gathers, optimizer), plus the step time no
  operator accounts for (Python: the controller, module calls, autograd bookkeeping).

Ratios to full fine-tuning of each part show which one keeps a method's time above its FLOPs. Writes
``benchmarks/results/cpu_time_vs_flops.json``. ``--small`` runs a 4-block model at toy sizes (the test below).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F

import alast_kernels as ak
from alast_kernels.measure import count_flops

# Operators whose time the FLOP count covers: matrix products and fused attention (forward and backward).
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")

# The study's compute level 0.55 of each token family, and every other method at its defaults.
METHODS: Dict[str, Dict] = {
    "full": {}, "linear": {}, "lora": {}, "synqt": {}, "losa": {},
    "alast@0.55": {"method": "alast", "flop_budget": 0.55, "tokens": "drop"},
    "alast-carry@0.55": {"method": "alast", "flop_budget": 0.55, "tokens": "carry"},
    "alast-paper@0.58": {"method": "alast", "policy": "paper", "train_layers": 7, "alpha": 2e-5},
    "evit@0.7": {"method": "evit", "keep_rate": 0.7},
    "sparse_tuning@0.7": {"method": "sparse_tuning", "keep_rate": 0.7},
}


def build(label: str, start: torch.nn.Module, lr: float):
    """The method of ``label`` on a copy of ``start`` and its AdamW; returns (method, one training step)."""
    options = dict(METHODS[label])
    method = ak.methods.create(options.pop("method", label), copy.deepcopy(start), **options)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    return method, optimizer


def _step(method, optimizer, x, y) -> None:
    with method.step():
        F.cross_entropy(method.model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def split_profile(fn: Callable[[], None], steps: int) -> Dict[str, float]:
    """Seconds per step of ``fn`` under ``torch.profiler``: wall, matrix products, other operators (self
    times of top-level-or-nested operators summed once each, so nothing is counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - start) / steps
    gemm = other = 0.0
    top: Dict[str, float] = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        if event.key in GEMM_OPS:
            gemm += seconds
        elif event.key.startswith("aten::") or event.key.startswith("Optimizer"):
            other += seconds
            top[event.key] = top.get(event.key, 0.0) + seconds
    biggest = sorted(top.items(), key=lambda kv: -kv[1])[:6]
    return {"profiled_step_seconds": wall, "gemm_seconds": gemm, "other_op_seconds": other,
            "unaccounted_seconds": max(0.0, wall - gemm - other), "top_other_ops": dict(biggest)}


def measure(labels: List[str], *, img_size: int, batch: int, depth: int, steps: int, warmup: int,
            profiled: int, seed: int = 0) -> Dict:
    torch.manual_seed(seed)
    start = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=10,
                              depth=depth)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 10, (batch,))
    runs = {label: build(label, start, lr=2e-5) for label in labels}
    for _ in range(warmup):
        for method, opt in runs.values():
            _step(method, opt, x, y)
    seconds: Dict[str, List[float]] = {label: [] for label in labels}
    for _ in range(steps):  # interleaved: a burst of load on the machine hits every method alike
        for label, (method, opt) in runs.items():
            began = time.perf_counter()
            _step(method, opt, x, y)
            seconds[label].append(time.perf_counter() - began)
    out = {}
    for label, (method, opt) in runs.items():
        def forward_backward(method=method):
            with method.step(update=False):
                F.cross_entropy(method.model(x), y).backward()
        flops = count_flops(forward_backward)
        method.model.zero_grad(set_to_none=True)
        out[label] = {"step_seconds": statistics.median(seconds[label]), "flops": flops,
                      **split_profile(lambda method=method, opt=opt: _step(method, opt, x, y), profiled)}
    full = out.get("full")
    if full:
        for row in out.values():
            row["ratios_to_full"] = {
                "time": row["step_seconds"] / full["step_seconds"], "flops": row["flops"] / full["flops"],
                **{k: row[f"{k}_seconds"] / full[f"{k}_seconds"] for k in ("gemm", "other_op", "unaccounted")
                   if full[f"{k}_seconds"] > 0}}
            # Each part's share of the step, scaled to the unprofiled step time.
            scale = row["step_seconds"] / row["profiled_step_seconds"]
            row["parts_of_step_seconds"] = {k: scale * row[f"{k}_seconds"]
                                            for k in ("gemm", "other_op", "unaccounted")}
    return out


def _cell(row: Dict, part: str) -> str:
    ratios = row.get("ratios_to_full", {})
    if part not in ratios:
        return "-"
    return f"{1e3 * row['parts_of_step_seconds'][part]:.0f} ms ({ratios[part]:.2f}x)"


def table(result: Dict) -> str:
    lines = ["| method | time | FLOPs | matrix products | other operators | outside operators |",
             "|---|---|---|---|---|---|"]
    for label, row in result.items():
        r = row.get("ratios_to_full", {})
        lines.append(f"| `{label}` | {1e3 * row['step_seconds']:.0f} ms ({r.get('time', 1):.2f}x) | "
                     f"{r.get('flops', 1):.2f}x | {_cell(row, 'gemm')} | {_cell(row, 'other_op')} | "
                     f"{_cell(row, 'unaccounted')} |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels (default: all)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profiled", type=int, default=3, help="profiled steps per method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="4 blocks at 28 px, batch 2: the machinery only")
    args = p.parse_args(argv)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown or not labels:
        raise SystemExit(f"--methods: unknown {unknown or args.methods!r}; expected some of {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    sizes = dict(img_size=28, batch=2, depth=4) if args.small else dict(img_size=112, batch=16, depth=12)
    result = measure(labels, steps=args.steps, warmup=args.warmup, profiled=args.profiled, **sizes)
    print(table(result))
    if not args.small:  # toy sizes measure the machinery, not a result to keep
        from record import write_results

        payload = {"sizes": sizes, "steps": args.steps, "warmup": args.warmup, "profiled": args.profiled,
                   "threads": args.threads, "methods": METHODS, "results": result}
        print(f"wrote {write_results('cpu_time_vs_flops', payload)}")
    return result


if __name__ == "__main__":
    main()


def test_split_accounts_for_the_step():
    """At toy sizes: every method is timed, counted and split; the parts are non-negative and the operator
    parts fit in the profiled step; full fine-tuning's ratios are 1 and a frozen-backbone method's FLOPs are
    below full's."""
    result = main(["--small", "--methods", "full,linear,alast@0.55", "--steps", "2", "--warmup", "1",
                   "--profiled", "1", "--threads", "1"])
    for row in result.values():
        assert row["flops"] > 0 and row["step_seconds"] > 0 and row["gemm_seconds"] > 0
        assert row["gemm_seconds"] + row["other_op_seconds"] <= row["profiled_step_seconds"] * 1.05
        assert min(row["parts_of_step_seconds"].values()) >= 0
    assert result["full"]["ratios_to_full"]["flops"] == 1 and result["full"]["ratios_to_full"]["time"] == 1
    assert result["linear"]["ratios_to_full"]["flops"] < 1
