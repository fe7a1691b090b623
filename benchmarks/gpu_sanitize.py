"""Each kernel of one backend called once, small shapes: the program ``gpu_check.py`` runs under
compute-sanitizer's memcheck and racecheck (GPU check, stage "sanitizer").

``python benchmarks/gpu_sanitize.py --backend cuda [--dry-run]``

Calls every op the backend implements itself (``gpu_cases.py``: forward and, where a training step takes
gradients, backward) in bfloat16 and float32 at a shape that is no multiple of any tile, in bfloat16 with
rows of 180 bytes (the CUDA kernels' unvectorised paths), and, for the cuda
backend's selection, once more with a row longer than its shared-memory path (4096 scores). Run it with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (the check does) so that every tensor is its own allocation and an
access past its end is seen by memcheck rather than landing in the caching allocator's pool.
"""
from __future__ import annotations

import argparse
import sys

import torch

from gpu_cases import ODD_WIDTH, TINY, op_calls, own_ops

LONG_ROW = 4097 + 64  # past the cuda select kernel's shared-memory path


def calls(name: str, device: str):
    """``[(label, closure)]``: every own op of backend ``name`` at the small shape."""
    from alast_kernels import backend
    module = backend.load(name)
    if module is None:
        raise RuntimeError(f"backend {name} could not be loaded: {backend.import_error(name)}")
    ops = own_ops(name, module.OPS, backend.load("reference").OPS)
    out = []
    for shape, dtype in ((TINY, torch.bfloat16), (TINY, torch.float32), (ODD_WIDTH, torch.bfloat16)):
        out += [(f"{op} {shape.name} {dtype}", fn) for op, fn in op_calls(ops, shape, dtype, device).items()]
    if "select_tokens" in ops:
        scores = torch.rand(2, LONG_ROW, device=device)
        out.append((f"select_tokens N={LONG_ROW}", lambda: ops["select_tokens"](scores, LONG_ROW // 3, 1)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=["cuda", "triton"])
    parser.add_argument("--dry-run", action="store_true", help="build the calls on CPU tensors, run none")
    args = parser.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        from alast_kernels import backend
        if backend.load(args.backend) is None:  # e.g. no compiled extension on this CPU machine
            print(f"gpu_sanitize: the {args.backend} backend cannot be loaded here "
                  f"({backend.import_error(args.backend)}); nothing to list")
            return 0
        listed = calls(args.backend, "cpu")
        print(f"gpu_sanitize: {len(listed)} calls of the {args.backend} backend, none run "
              f"({'dry run' if args.dry_run else 'no CUDA device'})")
        return 0
    for label, fn in calls(args.backend, "cuda"):
        fn()
        torch.cuda.synchronize()
        print(f"  called {label}", flush=True)
    print(f"gpu_sanitize: every {args.backend} kernel called")
    return 0


if __name__ == "__main__":
    sys.exit(main())
