"""Every op on every backend that implements it, timed at one ViT's shapes in bfloat16 and float16 (GPU check,
stage "ops"; run by ``gpu_check.py``, or alone on a GPU machine).

``python benchmarks/gpu_ops.py --shape vit_b16 --out ops_vit_b16.json [--repeats 20] [--dry-run]``

For each op and dtype the backends' implementations (the reference being the vendor path: SDPA for the
attention ops, cuBLAS for the linear layers, PyTorch's own kernels elsewhere) run the call a training step
makes (``gpu_cases.py``: forward, and backward where the step takes gradients), interleaved round by round,
each timing ``INNER`` back-to-back calls between CUDA synchronisations (``alast_kernels.measure``). A backend
that raises is recorded with its error, not timed. ``--dry-run`` builds nothing on a GPU: it checks that
the shapes, backends and cases resolve and writes the plan with ``"skipped"``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from gpu_cases import DTYPES, SHAPES, TINY, Shape, op_calls, op_of, own_ops

INNER = 5


def _backends():
    from alast_kernels import backend
    loaded = {name: backend.load(name) for name in backend.BACKENDS}
    reference_ops = loaded["reference"].OPS
    return ({name: own_ops(name, module.OPS, reference_ops) for name, module in loaded.items() if module},
            {name: backend.import_error(name) for name, module in loaded.items() if module is None})


def measure(shape: Shape, repeats: int, device: str = "cuda", warmup: int = 2, inner: int = INNER,
            progress: Callable[[dict], None] = lambda result: None) -> dict:
    """Every backend's time for every op at ``shape`` in each of :data:`DTYPES`: the median of ``repeats``
    timings of ``inner`` calls after ``warmup`` rounds (``device="cpu"`` only for the tests' smoke run, under
    the Triton interpreter and the CUDA emulation). ``progress(result so far)`` is called after each case,
    so that a run stopped at its deadline keeps what it timed."""
    from alast_kernels.measure import median_seconds

    shape_name = shape.name
    backends, missing = _backends()
    cases = []
    result = {"cases": cases, "backends_missing": missing, "inner": inner, "repeats": repeats}
    for dtype_name, dtype in DTYPES.items():
        calls = {name: op_calls(ops, shape, dtype, device) for name, ops in backends.items()}
        for key in calls["reference"]:
            variants, errors = {}, {}
            for name in backends:
                if key not in calls[name]:
                    continue
                try:  # first call: compiles (Triton) and checks that it runs at all
                    calls[name][key]()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    variants[name] = calls[name][key]
                except Exception as exc:  # recorded and reported: a kernel that fails is not trusted
                    errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            started = time.perf_counter()
            seconds = median_seconds(list(variants.values()), repeats=repeats, warmup=warmup, inner=inner)
            case = {"op": op_of(key), "call": key, "dtype": dtype_name, "shape": shape_name,
                    "median_us": {name: s * 1e6 for name, s in zip(variants, seconds)}, "errors": errors}
            cases.append(case)
            times = ", ".join(f"{n} {us:.1f} us" for n, us in case["median_us"].items())
            print(f"  {shape_name} {dtype_name:<8} {key:<18} {times}"
                  + (f"  errors: {sorted(errors)}" if errors else "")
                  + f"  ({time.perf_counter() - started:.1f} s)", flush=True)
            progress(result)
    return result


def plan(shape_name: str) -> dict:
    """What a run at ``shape_name`` would time: ops per backend (no GPU needed; every op's case is built on
    tiny CPU tensors, so an op without a case fails here too)."""
    backends, missing = _backends()
    for ops in backends.values():
        op_calls(ops, TINY, torch.float32, "cpu")
    return {"ops": {name: sorted(ops) for name, ops in backends.items()}, "backends_missing": missing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    result = {"shape": SHAPES[args.shape].as_dict(), "dtypes": list(DTYPES)}

    def write(partial: dict) -> None:
        args.out.write_text(json.dumps({**result, **partial}, indent=1) + "\n")

    if args.dry_run or not torch.cuda.is_available():
        result.update(plan(args.shape), skipped="dry run" if args.dry_run else "no CUDA device")
    else:
        result.update(device=torch.cuda.get_device_name(),
                      capability=".".join(map(str, torch.cuda.get_device_capability())))
        result.update(measure(SHAPES[args.shape], args.repeats, progress=write))
    write({})
    failed = [(c["call"], c["dtype"], sorted(c["errors"])) for c in result.get("cases", []) if c["errors"]]
    if failed:  # timed what ran, then fail the part: a kernel that raises on a GPU is a bug to see
        print(f"gpu_ops: calls that raised (op, dtype, backends): {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
