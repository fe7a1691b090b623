"""The GPU check (``make gpu-check``, benchmarks/gpu_check.py) without a GPU: its dry run reaches every part
and reports each as skipped, a broken part fails it, and the pieces that turn measurements into ``auto``'s
table behave (dropping for time, the dispatch records, the op cases)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alast_kernels import backend
from alast_kernels.backends import measured

# Loaded at collection, as tests/triton_testing.py does: Triton decides at a kernel's definition whether it
# is interpreted, so the backend must first be imported while TRITON_INTERPRET=1 (a test elsewhere that
# unsets it must not be the first to import it).
backend.load("triton")

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"build", "tests", "sanitizer", "ops", "training"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"test_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


def test_dry_run_reaches_every_part_and_reports_each_as_skipped(tmp_path, gc):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["part"] for row in summary["parts"]] == [part.name for part in gc.PARTS]
    assert {row["stage"] for row in summary["parts"]} == STAGES
    for row in summary["parts"]:
        assert row["status"] == "skipped (dry run); its dry run passed", row
        assert f"{row['part']}: skipped (dry run); its dry run passed" in done.stdout
    assert summary["failed"] == [] and summary["dropped"] == [] and summary["mode"] == "dry run"
    assert summary["environment"]["torch"] == torch.__version__
    # the ops' plans and the training's methods were resolved, then merged into one file each
    ops = json.loads((tmp_path / "ops.json").read_text())
    assert sorted(o["shape"]["name"] for o in ops) == ["vit_b16", "vit_s16"]
    assert all(o["skipped"] == "dry run" and o["dtypes"] == ["bfloat16", "float16"] for o in ops)
    assert set(ops[0]["ops"]["reference"]) == set(measured.vendor_paths()) | {
        "select_tokens", "gather_tokens", "scatter_tokens", "gather_layer_norm", "cls_scores", "fuse_tokens"}
    import alast_kernels as ak
    training = json.loads((tmp_path / "training.json").read_text())
    assert sorted(map(sorted, (t["methods"] for t in training))) == sorted([sorted(ak.methods.available()),
                                                                             ["alast", "full"]])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu-check.log", "ops.json", "summary.json", "training.json"]  # few, small files
    assert not (tmp_path / "gpu_dispatch.json").exists()  # nothing measured: the table is left alone


@pytest.mark.parametrize("breakage", ["missing", "raises"])
def test_a_broken_part_fails_the_dry_run(tmp_path, monkeypatch, gc, breakage, capsys):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    if breakage == "raises":
        (scripts / "gpu_ops.py").write_text("def main(argv):\n    raise KeyError('no case for op foo')\n")
    monkeypatch.setattr(gc, "BENCH", scripts)
    monkeypatch.setattr(gc, "PARTS", [gc.PARTS[0], gc._ops("vit_s16")])
    out = tmp_path / "out"
    assert gc.main(["--dry-run", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["ops-vit_s16"]
    (row,) = [r for r in summary["parts"] if r["part"] == "ops-vit_s16"]
    expected = "is missing" if breakage == "missing" else "no case for op foo"
    assert row["status"].startswith("skipped (dry run); its dry run failed") and expected in row["status"]
    assert "Traceback" in (out / "gpu-check.log").read_text()


def test_only_selects_parts_and_rejects_unknown_names(tmp_path, gc):
    assert gc.main(["--dry-run", "--out", str(tmp_path), "--only", "ops-vit_s16"]) == 0
    parts = [r["part"] for r in json.loads((tmp_path / "summary.json").read_text())["parts"]]
    assert parts == ["install", "ops-vit_s16"]  # the install is never left out
    # without --dry-run on a machine without a GPU: the same dry runs, said to be for want of a device
    assert gc.main(["--out", str(tmp_path), "--only", "ops-vit_s16"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "dry run (no CUDA device)"
    assert {r["status"] for r in summary["parts"]} == {"skipped (no CUDA device); its dry run passed"}
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--out", str(tmp_path), "--only", "opz"])


def test_the_slowest_droppable_parts_are_dropped_first(gc):
    def part(name, estimate, droppable=True):
        return gc.Part(name, "x", estimate, 10, lambda out: [], lambda out: None, droppable)
    parts = [part("build", 100, False), part("a", 50), part("b", 150), part("c", 30), part("d", 60)]
    assert gc.drop_to_fit(parts, 400) == []
    assert [p.name for p in gc.drop_to_fit(parts, 300)] == ["b"]          # 390 - 150 fits
    assert [p.name for p in gc.drop_to_fit(parts, 180)] == ["b", "d"]     # 390 - 150 - 60 = 180 fits
    assert [p.name for p in gc.drop_to_fit(parts, 170)] == ["b", "d", "a"]  # then 50: 130
    assert [p.name for p in gc.drop_to_fit(parts, 50)] == ["b", "d", "a", "c"]  # never the build


def test_every_part_has_a_deadline_and_the_plan_fits_the_default_budget_after_drops(gc):
    assert all(0 < p.estimate <= p.deadline for p in gc.PARTS)
    kept = [p for p in gc.PARTS if p not in gc.drop_to_fit(gc.PARTS, 480)]
    assert sum(p.estimate for p in kept) <= 480
    # what (a)-(d) ask for stays in the default budget: the gpu tests, the cuda kernels under both tools,
    # both shapes' op timings, and the training steps of every method
    assert {"install", "tests-gpu", "memcheck-cuda", "racecheck-cuda", "ops-vit_b16", "ops-vit_s16",
            "training-full-alast", "training-methods"} <= {p.name for p in kept}


def _case(op, dtype, times, errors=None):
    return {"op": op, "dtype": dtype, "shape": "vit_b16", "median_us": times, "errors": errors or {}}


def test_dispatch_records_order_backends_by_geometric_mean_and_distrust_failures(gc):
    ops = [{"cases": [
        _case("attention", "bfloat16", {"reference": 100.0, "triton": 50.0}),
        _case("attention", "float16", {"reference": 100.0, "triton": 400.0}),   # geomean triton 141 > 100
        _case("gather_tokens", "bfloat16", {"reference": 30.0, "triton": 20.0, "cuda": 10.0}),
        _case("gather_tokens", "float16", {"reference": 30.0, "cuda": 10.0}, {"triton": "RuntimeError: x"}),
        _case("select_tokens", "float32", {"triton": 5.0}, {"reference": "boom"}),
    ]}]
    env = {"device": "NVIDIA H200", "date": "2026-12-02 17:00 UTC", "commit": "abc", "torch": "2.11.0"}
    records = gc.dispatch_records(ops, env)
    assert set(records) == {"attention", "gather_tokens"}  # select_tokens: the reference never ran
    assert records["attention"]["order"] == ["reference", "triton"]
    assert records["attention"]["geomean_us"] == {"reference": 100.0, "triton": pytest.approx(141.42, abs=0.01)}
    assert records["attention"]["kernel_beats_reference"] is False
    assert records["gather_tokens"]["order"] == ["cuda", "reference"]  # triton failed once: not trusted
    assert records["gather_tokens"]["cases"][1]["errors"] == {"triton": "RuntimeError: x"}
    table = measured.validate({"records": {"9.0": records}}, "made")
    assert table["records"]["9.0"]["gather_tokens"]["kernel_beats_reference"] is True


def test_every_ops_case_runs_on_the_reference_at_the_small_shape():
    """The closures the benchmarks time and the sanitizer runs are well formed (reference backend, CPU)."""
    cases = _load("gpu_cases")
    from alast_kernels.backends import reference
    for shape in (cases.TINY, cases.ODD_WIDTH):
        calls = cases.op_calls(reference.OPS, shape, torch.float32, "cpu")
        assert {cases.op_of(case) for case in calls} == set(reference.OPS)
        assert set(calls) - set(reference.OPS) == {"attention+cls"}
        for call in calls.values():
            call()
    with pytest.raises(KeyError, match="no case for op"):
        cases.op_calls({**reference.OPS, "new_op": None}, cases.TINY, torch.float32, "cpu")


def test_make_target_uses_the_system_python_and_passes_the_switches():
    done = subprocess.run(["make", "-n", "gpu-check", "DRY_RUN=1", "OUT=/tmp/x", "BUDGET=300"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "python3 benchmarks/gpu_check.py --out \"/tmp/x\" --budget 300 --dry-run" in done.stdout
    assert ".venv" not in done.stdout


# ------------------------------------------------------------------------------------------ the GPU path, simulated
def _fake(gc, name, code, estimate=1, deadline=30, droppable=True):
    """A part whose GPU command is ``python -c code``."""
    return gc.Part(name, "x", estimate, deadline, lambda out: [sys.executable, "-c", code], lambda out: None,
                   droppable)


def test_gpu_run_drops_parts_that_no_longer_fit_and_stops_a_part_at_its_deadline(tmp_path, gc):
    log = gc.Log(tmp_path / "gpu-check.log")
    parts = [_fake(gc, "install", "print('built')", droppable=False),
             _fake(gc, "slow", "import time; time.sleep(60)", estimate=2, deadline=2),
             _fake(gc, "big", "print('never')", estimate=500),
             _fake(gc, "bad", "raise SystemExit(3)"),
             _fake(gc, "fine", "print('fine')")]
    began = __import__("time").perf_counter()
    rows = {r["part"]: r for r in gc.run_parts(parts, tmp_path, 100, gpu=True, dry=False, log=log)}
    assert __import__("time").perf_counter() - began < 30  # the sleeping part was killed at its deadline
    assert rows["install"]["status"] == "passed"
    assert rows["slow"]["status"] == "timed out after 2 s"
    assert rows["big"]["status"].startswith("dropped: estimated 500 s")
    assert rows["bad"]["status"] == "failed (exit 3)"
    assert rows["fine"]["status"] == "passed"
    assert ("built" in (tmp_path / "gpu-check.log").read_text()
            and "never" not in (tmp_path / "gpu-check.log").read_text())


def test_gpu_run_skips_everything_after_a_failed_install(tmp_path, gc):
    log = gc.Log(tmp_path / "gpu-check.log")
    parts = [_fake(gc, "install", "raise SystemExit(1)", droppable=False), _fake(gc, "tests", "print(1)")]
    rows = gc.run_parts(parts, tmp_path, 100, gpu=True, dry=False, log=log)
    assert [r["status"] for r in rows] == ["failed (exit 1)", "skipped: the install failed"]


def test_op_benchmark_measures_every_backend_on_the_cpu_smoke(monkeypatch):
    """gpu_ops.measure's own code path at the small shape, on CPU tensors (interpreter and emulation)."""
    ops_script = _load("gpu_ops")
    cases = _load("gpu_cases")
    monkeypatch.setattr(ops_script, "DTYPES", {"float16": torch.float16})
    smoke = cases.Shape("smoke", B=1, N=9, D=32, H=2, keep=4, queries=2)
    result = ops_script.measure(smoke, repeats=1, device="cpu", warmup=0, inner=1)
    by_op = {c["call"]: c for c in result["cases"]}
    from alast_kernels.backends import reference
    assert set(by_op) == set(reference.OPS) | {"attention+cls"}
    assert by_op["attention+cls"]["op"] == "attention"
    for op, case in by_op.items():
        assert "reference" in case["median_us"] and case["errors"] == {}, (op, case)
        assert all(us > 0 for us in case["median_us"].values())
    assert "triton" in by_op["attention"]["median_us"]
    assert "triton" not in by_op["masked_linear"]["median_us"]  # the reference's own function: not timed twice


def test_every_method_trains_one_step_with_the_benchmarks_options_on_a_small_vit():
    training = _load("gpu_training")
    import alast_kernels as ak
    training.check_names(ak.methods.available())
    start = training.start_model("cpu", img_size=32, patch_size=8, embed_dim=24, depth=12, num_heads=2)
    x, y = training.inputs("cpu", batch=2, image=32)
    for name in ak.methods.available():
        method, step = training.make_step(name, start, x, y)
        before = [p.detach().clone() for p in method.trainable_parameters()]
        step()
        assert any(not torch.equal(b, p) for b, p in zip(before, method.trainable_parameters())), name


def test_the_table_keeps_other_records_and_other_families(tmp_path, monkeypatch, gc):
    table = tmp_path / "gpu_dispatch.json"
    old = {"order": ["reference", "triton"], "geomean_us": {"reference": 1.0, "triton": 2.0}}
    table.write_text(json.dumps({"about": "x", "records": {"8.0": {"attention": old}, "9.0": {"select_tokens": old}}}))
    monkeypatch.setattr(gc, "TABLE", table)
    new = {"order": ["triton", "reference"], "geomean_us": {"triton": 1.0, "reference": 2.0}}
    out = tmp_path / "out"
    out.mkdir()
    gc.write_table({"attention": new}, "9.0", out, gc.Log(out / "gpu-check.log"))
    written = json.loads(table.read_text())
    assert written == json.loads((out / "gpu_dispatch.json").read_text())
    assert written["records"] == {"8.0": {"attention": old}, "9.0": {"select_tokens": old, "attention": new}}


def test_after_an_op_part_the_table_is_updated_from_what_was_timed(tmp_path, monkeypatch, gc):
    table = tmp_path / "gpu_dispatch.json"
    table.write_text(json.dumps({"records": {}}))
    monkeypatch.setattr(gc, "TABLE", table)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ops_vit_b16.part.json").write_text(json.dumps({"cases": [
        _case("fuse_tokens", "bfloat16", {"reference": 9.0, "triton": 3.0})]}))
    env = {"device": "NVIDIA H200", "capability": "9.0", "date": "d", "commit": "c", "torch": "t"}
    log = gc.Log(out / "gpu-check.log")
    gc.update_table(gc._training("x", "full", 1), out, env, log)  # not an op part: nothing written
    assert json.loads(table.read_text()) == {"records": {}}
    gc.update_table(gc._ops("vit_b16"), out, env, log)
    assert json.loads(table.read_text())["records"]["9.0"]["fuse_tokens"]["order"] == ["triton", "reference"]
    assert (out / "ops_vit_b16.part.json").exists()  # merged into ops.json only at the end
    measured.validate(json.loads((out / "gpu_dispatch.json").read_text()), "out")


@pytest.mark.parametrize("name", ["cuda", pytest.param("triton", marks=pytest.mark.slow)])  # triton: ~20 s
def test_every_call_of_the_sanitizer_script_runs_on_cpu_tensors(name, cuda):
    """The program compute-sanitizer runs, with the kernels emulated (cuda) or interpreted (triton)."""
    sanitize = _load("gpu_sanitize")
    calls = sanitize.calls(name, "cpu")
    assert {label.split()[0].split("+")[0] for label, _ in calls} == set(backend.load(name).OPS) - (
        {"masked_linear"} if name == "triton" else set())  # triton's masked_linear is the reference's own
    for _label, call in calls:
        call()


def test_a_gpu_run_end_to_end_with_simulated_parts(tmp_path, monkeypatch, gc):
    """main() on a (simulated) GPU: the build environment is set, the parts run, the op part's timings make
    the table, the part files are merged, and the summary says what ran."""
    for name in ("TORCH_CUDA_ARCH_LIST", "ALAST_FORCE_CUDA", "MAX_JOBS"):
        monkeypatch.setenv(name, "restored after the test")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = {"device": "NVIDIA H200", "capability": "9.0", "date": "2026-12-02 17:00 UTC", "commit": "abc",
           "torch": "2.11.0"}
    monkeypatch.setattr(gc, "environment", lambda gpu: dict(env))
    table = tmp_path / "gpu_dispatch.json"
    table.write_text(json.dumps({"records": {}}))
    monkeypatch.setattr(gc, "TABLE", table)
    cases = [_case("gather_tokens", "bfloat16", {"reference": 30.0, "cuda": 10.0})]
    write_ops = (f"import json, os; json.dump({{'cases': {cases!r}}}, "
                 "open(os.path.join(os.environ['OUT_DIR'], 'ops_vit_b16.part.json'), 'w'))")
    arch = "import os; assert os.environ['TORCH_CUDA_ARCH_LIST'] == '9.0' and os.environ['ALAST_FORCE_CUDA'] == '1'"
    out = tmp_path / "out"
    monkeypatch.setenv("OUT_DIR", str(out))
    monkeypatch.setattr(gc, "PARTS", [
        gc.Part("install", "build", 1, 30, lambda o: [sys.executable, "-c", arch], lambda o: None, droppable=False),
        gc.Part("ops-vit_b16", "ops", 1, 30, lambda o: [sys.executable, "-c", write_ops], lambda o: None),
        gc.Part("training-x", "training", 1000, 30, lambda o: [sys.executable, "-c", "pass"], lambda o: None)])
    assert gc.main(["--out", str(out), "--budget", "100"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "GPU run" and summary["failed"] == [] and summary["dropped"] == ["training-x"]
    assert [r["status"] for r in summary["parts"]][:2] == ["passed", "passed"]
    assert json.loads(table.read_text())["records"]["9.0"]["gather_tokens"]["order"] == ["cuda", "reference"]
    assert json.loads((out / "ops.json").read_text()) == [{"cases": cases}]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "gpu_dispatch.json", "ops.json",
                                                     "summary.json", "training.json"]
