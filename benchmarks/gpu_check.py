"""The GPU check: one command that installs, builds, tests, sanitizes and measures on one CUDA GPU
(``make gpu-check``; docs/gpu-check.md).

``python3 benchmarks/gpu_check.py [--out runs/gpu-check] [--budget 480] [--dry-run]``

Made for a machine lent for minutes, offline, whose ``python3`` already has torch, triton, timm, peft and
pytest: it installs this working tree without fetching anything (``pip install --no-index --no-deps
--no-build-isolation -e .``), builds the CUDA extension for the present GPU's compute capability only,
then runs the parts of :data:`PARTS` in order, printing progress. Every part has a deadline and an estimate;
before each part, if the estimates of the parts left exceed the time left in ``--budget`` (seconds, the
build included), the slowest parts left are dropped first, and each part is stopped at its deadline or
when the budget runs out. Everything goes to ``--out``, at most 8 small files (``summary.json``: the
environment, each part's status, time and what was dropped; ``gpu-check.log``: every command's output;
``tests-gpu.xml``, ``tests-kernels.xml`` (JUnit); ``ops.json``, ``training.json``, ``gpu_dispatch.json``).
The op timings update ``alast_kernels/backends/gpu_dispatch.json`` (``auto``'s measured order; a copy is
written to ``--out``). Without a CUDA device, or with ``--dry-run``, every part runs its own dry run (no GPU touched)
and is reported as skipped; a broken part fails the dry run. Exit status 0 when every part that ran passed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TABLE = ROOT / "alast_kernels" / "backends" / "gpu_dispatch.json"
PY = sys.executable
# Tests that run their kernels on the GPU when there is one (else under the interpreter / the emulation).
KERNEL_TESTS = ["tests/test_cuda_ops.py", "tests/test_triton_select.py", "tests/test_triton_tokens.py",
                "tests/test_triton_scores.py", "tests/test_triton_attention.py", "tests/test_triton_mlp.py",
                "tests/test_fuse_tokens.py", "tests/test_query_attention.py"]


@dataclass
class Part:
    """One step of the check. ``command(out)`` is what runs on a GPU; ``dry(out)`` what a dry run does
    instead, in this process (it raises when the part is broken). ``estimate`` and ``deadline`` are seconds;
    only ``droppable`` parts may be dropped for time."""
    name: str
    stage: str
    estimate: float
    deadline: float
    command: Callable[[Path], List[str]]
    dry: Callable[[Path], None]
    droppable: bool = True
    env: Dict[str, str] = field(default_factory=dict)
    echo: bool = True  # its output on stdout too (the install's verbose build log goes to the log only)


def run_main(script: Path, argv: List[str]) -> None:
    """``main(argv)`` of the stage script at ``script``, in this process (a dry run: one torch import for
    every part); raises when it cannot be loaded or does not return 0."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_stage_{script.stem}", script)
    if spec is None or not script.is_file():
        raise FileNotFoundError(f"stage script {script} is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an imported module has it (dataclasses look it up)
    spec.loader.exec_module(module)
    code = module.main(argv)
    if code:
        raise RuntimeError(f"{script.name} {' '.join(argv)}: exit {code}")


def _script_part(name: str, stage: str, estimate: float, deadline: float, script: str,
                 args: Callable[[Path], List[str]], prefix: List[str] = (), env: Dict[str, str] = None) -> Part:
    path = BENCH / script
    return Part(name, stage, estimate, deadline, command=lambda out: [*prefix, PY, str(path), *args(out)],
                dry=lambda out: run_main(path, [*args(out), "--dry-run"]), env=env or {})


def _sanitizer(tool: str, backend: str) -> Part:
    prefix = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", "--print-limit", "20"]
    return _script_part(f"{tool}-{backend}", "sanitizer", 40 if backend == "cuda" else 90, 150, "gpu_sanitize.py",
                        lambda out: ["--backend", backend], prefix, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})


def _ops(shape: str) -> Part:
    return _script_part(f"ops-{shape}", "ops", 50, 150, "gpu_ops.py",
                        lambda out: ["--shape", shape, "--out", str(out / f"ops_{shape}.part.json")])


def _training(name: str, methods: str, estimate: float) -> Part:
    return _script_part(f"training-{name}", "training", estimate, 240, "gpu_training.py",
                        lambda out: ["--methods", methods, "--out", str(out / f"training_{name}.part.json")])


def _pytest(*args: str) -> List[str]:
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", *args]


def _need(*modules: str, files=()) -> Callable[[Path], None]:
    """A dry run that checks that ``modules`` can be imported and ``files`` exist."""
    def check(out: Path) -> None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        missing += [f for f in files if not (ROOT / f).exists()]
        if missing:
            raise FileNotFoundError(f"missing: {missing}")
    return check


def _parallel() -> List[str]:
    """pytest-xdist's options where it is installed: Triton compiles the kernels' variants in parallel."""
    return ["-n", "8"] if importlib.util.find_spec("xdist") else []


PARTS: List[Part] = [
    Part("install", "build", 100, 300, droppable=False, echo=False,
         command=lambda out: [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                              "-v", "-e", str(ROOT)],
         dry=_need("pip", "setuptools", "torch", files=("setup.py", "pyproject.toml"))),
    Part("tests-gpu", "tests", 45, 150, command=lambda out: _pytest("-m", "gpu", f"--junitxml={out / 'tests-gpu.xml'}",
                                                                      "tests"),
         dry=_need("pytest", files=("tests",))),
    _sanitizer("memcheck", "cuda"), _sanitizer("racecheck", "cuda"),
    _ops("vit_b16"), _ops("vit_s16"),
    _training("full-alast", "full,alast", 45),
    _training("methods", "all", 80),
    _sanitizer("memcheck", "triton"), _sanitizer("racecheck", "triton"),
    Part("tests-kernels", "tests", 150, 240,
         command=lambda out: _pytest(*_parallel(), f"--junitxml={out / 'tests-kernels.xml'}", *KERNEL_TESTS),
         dry=_need("pytest", files=KERNEL_TESTS)),
]


# ------------------------------------------------------------------------------------------ the run
class Log:
    """Progress on stdout; everything (commands' output too) in ``gpu-check.log``."""

    def __init__(self, path: Path):
        self.file = path.open("w")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def run(self, cmd: List[str], timeout: float, env: Dict[str, str], echo: bool = True) -> dict:
        """Runs ``cmd`` in its own process group, its output into the log (and on stdout with ``echo``);
        at ``timeout`` seconds the whole group is killed (compute-sanitizer's child too)."""
        self.file.write(f"$ {' '.join(cmd)}\n")
        self.file.flush()
        started = time.perf_counter()
        tail: List[str] = []
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        except FileNotFoundError as exc:
            return {"status": f"failed ({exc.strerror}: {exc.filename})", "seconds": 0.0}

        def copy():
            for line in proc.stdout:
                self.file.write(line)
                tail[:] = (tail + [line])[-15:]
                if echo:
                    print("    " + line, end="", flush=True)
        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(timeout, 1))
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
        reader.join(timeout=10)
        self.file.flush()
        if status != "passed" and not echo:  # the end of its output on stdout: the log is not always at hand
            print("".join("    " + line for line in tail), end="", flush=True)
        return {"status": status, "seconds": round(time.perf_counter() - started, 1)}

    def dry(self, part: Part, out: Path) -> dict:
        """``part``'s dry run in this process, its output into the log."""
        self.file.write(f"# dry run of {part.name}\n")
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(self.file):
                part.dry(out)
            status = "passed"
        except (Exception, SystemExit) as exc:  # reported as the part's failure, with its traceback in the log
            self.file.write(traceback.format_exc())
            status = f"failed ({type(exc).__name__}: {exc})"
        self.file.flush()
        return {"status": status, "seconds": round(time.perf_counter() - started, 1)}


def environment(gpu: bool) -> dict:
    def output(cmd):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (done.stdout + done.stderr).strip()[-600:]
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable: {exc}"

    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": f"{platform.python_version()} ({PY})", "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "commit": output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
           "cpus": os.cpu_count(), "nvcc": output(["nvcc", "--version"]).splitlines()[-1:],
           "compute_sanitizer": shutil.which("compute-sanitizer")}
    for module in ("triton", "timm", "peft", "pytest"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   nvidia_smi=output(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                      "--format=csv,noheader"]))
    return env


def drop_to_fit(parts: List[Part], left: float) -> List[Part]:
    """The droppable parts to drop, slowest first, until the estimates of ``parts`` fit in ``left`` s."""
    dropped, total = [], sum(p.estimate for p in parts)
    for part in sorted((p for p in parts if p.droppable), key=lambda p: -p.estimate):
        if total <= left:
            break
        dropped.append(part)
        total -= part.estimate
    return dropped


def run_parts(parts: List[Part], out: Path, budget: float, gpu: bool, dry: bool, log: Log,
              after: Callable[[Part], None] = lambda part: None) -> List[dict]:
    """Runs ``parts`` in order within ``budget`` seconds (dry runs where ``dry`` or not ``gpu``); calls
    ``after(part)`` once each part that ran on the GPU is done. Returns a status row per part."""
    began = time.perf_counter()
    results, pending = [], list(parts)
    while pending:
        part = pending.pop(0)
        left = budget - (time.perf_counter() - began)
        row = {"part": part.name, "stage": part.stage, "estimate_s": part.estimate}
        if gpu and not dry:
            if part in drop_to_fit([part] + pending, left):
                row.update(status=f"dropped: estimated {part.estimate:.0f} s, the parts left need more than the "
                                  f"{left:.0f} s left")
            elif any(r["status"].startswith(("failed", "timed out")) and r["part"] == "install" for r in results):
                row.update(status="skipped: the install failed")
            else:
                log.say(f"[{part.stage}] {part.name}: running (deadline {min(part.deadline, left):.0f} s, "
                        f"{left:.0f} s of the budget left)")
                row.update(log.run(part.command(out), min(part.deadline, left), part.env, part.echo))
                after(part)
        else:
            row.update(log.dry(part, out))
            row["status"] = f"skipped ({'dry run' if dry else 'no CUDA device'}); its dry run {row['status']}"
        log.say(f"[{part.stage}] {part.name}: {row['status']}" + (f" ({row['seconds']} s)" if "seconds" in row else ""))
        results.append(row)
    return results


# ------------------------------------------------------------------------------------------ results
def _read_parts(out: Path, prefix: str, remove: bool = False) -> List[dict]:
    """The results the parts of one stage wrote (``<prefix>_*.part.json``); ``remove`` deletes the files once
    they are merged into one, so that the output stays at a few files."""
    found = []
    for path in sorted(out.glob(f"{prefix}_*.part.json")):
        found.append(json.loads(path.read_text()))
        if remove:
            path.unlink()
    return found


def dispatch_records(ops_results: List[dict], env: dict) -> Dict[str, dict]:
    """``{op: record}`` for the table: per op, the backends timed in every case (no error), fastest first by
    the geometric mean over the cases of each case's median."""
    by_op: Dict[str, List[dict]] = {}
    for result in ops_results:
        for case in result.get("cases", []):
            by_op.setdefault(case["op"], []).append(case)
    records = {}
    for op, cases in by_op.items():
        trusted = set.intersection(*(set(c["median_us"]) for c in cases))
        if "reference" not in trusted or len(trusted) < 2:
            continue  # nothing measured against the reference: no record, the default stays
        geomean = {name: math.exp(sum(math.log(c["median_us"][name]) for c in cases) / len(cases)) for name in trusted}
        order = sorted(trusted, key=lambda name: geomean[name])
        records[op] = {"device": env.get("device"), "date": env["date"], "commit": env["commit"],
                       "torch": env["torch"], "triton": env.get("triton"), "order": order,
                       "geomean_us": {n: round(geomean[n], 2) for n in order},
                       "kernel_beats_reference": order[0] != "reference",
                       "cases": [{"dtype": c["dtype"], "shape": c["shape"],
                                  "median_us": {n: round(us, 2) for n, us in c["median_us"].items()},
                                  **({"errors": c["errors"]} if c["errors"] else {})} for c in cases]}
    return records


def write_table(records: Dict[str, dict], family: str, out: Path, log: Log) -> None:
    """The committed table with this GPU family's records of the ops measured now replaced (the others
    kept); into the tree and ``out``."""
    sys.path.insert(0, str(ROOT))
    from alast_kernels.backends.measured import validate
    table = json.loads(TABLE.read_text())
    table["records"].setdefault(family, {}).update(records)
    text = json.dumps(validate(table, str(TABLE)), indent=1) + "\n"
    TABLE.write_text(text)
    (out / "gpu_dispatch.json").write_text(text)
    for op, rec in sorted(records.items()):
        log.say(f"  auto on compute capability {family}, {op}: {rec['order'][0]} "
                f"({', '.join(f'{n} {us:.1f} us' for n, us in rec['geomean_us'].items())})")


def update_table(part: Part, out: Path, env: dict, log: Log) -> None:
    """After an op part: the table from every op timed so far in ``out``, so that the training steps that
    follow run with ``auto`` as it will be once the table is committed."""
    if part.stage == "ops":
        records = dispatch_records(_read_parts(out, "ops"), env)
        if records:
            write_table(records, env["capability"], out, log)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run, build included")
    parser.add_argument("--dry-run", action="store_true", help="no GPU work: every part's dry run, reported as skipped")
    parser.add_argument("--only", default="", help="comma-separated part names to run (default: all)")
    args = parser.parse_args(argv)
    wanted = [name for name in args.only.split(",") if name]
    unknown = sorted(set(wanted) - {p.name for p in PARTS})
    if unknown:
        parser.error(f"--only: unknown part(s) {unknown}; expected names of {[p.name for p in PARTS]}")
    parts = [p for p in PARTS if not wanted or p.name in wanted or not p.droppable]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")

    import torch
    gpu = torch.cuda.is_available()
    env = environment(gpu)
    mode = "dry run" if args.dry_run else ("GPU run" if gpu else "dry run (no CUDA device)")
    log.say(f"gpu-check: {mode}, budget {args.budget:.0f} s, output {out}")
    if gpu:
        family = env["capability"]
        os.environ.update(TORCH_CUDA_ARCH_LIST=family, ALAST_FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
        log.say(f"  {env['device']}, compute capability {family}: building for TORCH_CUDA_ARCH_LIST={family}")
    started = time.perf_counter()
    results = run_parts(parts, out, args.budget, gpu, args.dry_run, log,
                        lambda part: update_table(part, out, env, log))
    for stage in ("ops", "training"):
        (out / f"{stage}.json").write_text(json.dumps(_read_parts(out, stage, remove=True), indent=1) + "\n")
    failed = [r["part"] for r in results if r["status"].startswith(("failed", "timed out"))
              or "dry run failed" in r["status"] or "dry run timed out" in r["status"]]
    dropped = [r["part"] for r in results if r["status"].startswith("dropped")]
    summary = {"mode": mode, "budget_s": args.budget, "elapsed_s": round(time.perf_counter() - started, 1),
               "environment": env, "parts": results, "dropped": dropped, "failed": failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.say(f"gpu-check: {mode}: {len(results) - len(failed) - len(dropped)} parts ok, dropped {dropped or 'none'}, "
            f"failed {failed or 'none'} ({summary['elapsed_s']} s); results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
