"""The fine-tuning job keeps what it computed: --out checked first, each run written at once, --resume."""
import json
import os
import shutil

import pytest
import torch

from alast_finetune import finetune, starting_weights
from test_finetune import TINY

CPU = torch.device("cpu")
JOB = TINY + ["--seeds", "2"]  # two methods (full, alast) x two seeds: four runs
# What may differ between two runs of the same job: wall times and dates. Everything else must be equal.
RUN_TIMINGS = ("train_seconds", "median_step_seconds", "inference_seconds_per_image", "controller_overhead_seconds")
RECORD_TIMINGS = ("date", "job_seconds")
ARGS_NOT_RESULTS = ("out", "resume")  # where the job wrote and how it was started


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The tiny job's pretraining, cached once, so every job of this module starts from the same weights."""
    path = str(tmp_path_factory.mktemp("cache"))
    args = finetune.parse_args(JOB + ["--cache-dir", path])
    starting_weights.starting_weights(args, starting_weights.create_model(args, 5), CPU, show=False)
    return path


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, cache_dir):
    """An uninterrupted 2-seed job: its --out and the record it returned."""
    out = tmp_path_factory.mktemp("job") / "out"
    return out, finetune.main(JOB + ["--out", str(out), "--cache-dir", cache_dir])


class Interrupted(Exception):
    """Stands for the job being killed."""


class CountingFineTune:
    """finetune.fine_tune, counted; raises :class:`Interrupted` on call ``stop`` (1-based) if given. Before each
    call it records which run files exist, to show they appear as the runs finish."""

    def __init__(self, out, stop=None):
        self.real, self.runs_dir, self.stop = finetune.fine_tune, out / "runs", stop
        self.calls, self.files_before = 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.files_before.append(sorted(os.listdir(self.runs_dir)) if self.runs_dir.is_dir() else [])
        if self.calls == self.stop:
            raise Interrupted
        return self.real(*args, **kwargs)


def _comparable(record):
    """``record`` without the timings and dates (named above), as JSON values."""
    record = json.loads(json.dumps(record))
    for key in RECORD_TIMINGS:
        record.pop(key)
    for key in ARGS_NOT_RESULTS:
        record["args"].pop(key)
    for runs in record["runs"].values():
        for run in runs:
            for key in RUN_TIMINGS:
                run.pop(key, None)
    for stats in record["summary"].values():
        for key in RUN_TIMINGS:
            stats.pop(key, None)
    for ratios in record.get("ratios_to_full", {}).values():
        ratios.pop("train_seconds", None)
    return record


def _refusal(argv, monkeypatch):
    """The job's SystemExit message for ``argv``, checking it stopped before loading data or training."""
    loaded = []
    monkeypatch.setattr(finetune, "load_data", lambda args: loaded.append(args))
    with pytest.raises(SystemExit) as info:
        finetune.main(argv)
    assert loaded == [], "the job loaded its data before refusing"
    return str(info.value.code)


# ------------------------------------------------------------------------------------------------- --out
def test_out_is_checked_before_data_or_training(tmp_path, monkeypatch):
    a_file = tmp_path / "results"
    a_file.write_text("not a directory")
    assert _refusal(TINY + ["--out", str(a_file)], monkeypatch) == \
        f"--out {a_file}: expected a directory, and this is a file"
    under_a_file = a_file / "sub"
    assert _refusal(TINY + ["--out", str(under_a_file)], monkeypatch).startswith(
        f"--out {under_a_file}: cannot create the directory")
    if os.path.isdir("/proc"):  # exists, is a directory, takes no new files (even for root)
        assert _refusal(TINY + ["--out", "/proc"], monkeypatch).startswith("--out /proc: cannot write there")
    fresh = tmp_path / "a" / "b"  # missing directories are created, before the data is loaded

    def load_data(args):
        assert fresh.is_dir() and os.listdir(fresh) == []
        raise Interrupted

    monkeypatch.setattr(finetune, "load_data", load_data)
    with pytest.raises(Interrupted):
        finetune.main(TINY + ["--out", str(fresh)])


def test_a_new_job_refuses_a_non_empty_out(finished_job, cache_dir, monkeypatch):
    """Nothing is replaced or left stale: a job without ALaST into the finished job's --out (which holds
    budgets.png) is refused, and the old results stay whole."""
    out, _ = finished_job
    before = {name: (out / name).read_bytes() for name in ("results.json", "budgets.png", "pareto.png")}
    message = _refusal(JOB + ["--methods", "full", "--out", str(out), "--cache-dir", cache_dir], monkeypatch)
    assert message.startswith(f"--out {out}: not empty (budgets.png, job.json, pareto.png, results.json, ...)")
    assert "--resume" in message
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_directory_with_anything_in_it_is_not_empty(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    assert _refusal(TINY + ["--out", str(tmp_path)], monkeypatch).startswith(f"--out {tmp_path}: not empty (notes.txt)")


# --------------------------------------------------------------------------------------------- --resume
def test_interrupted_job_resumed_gives_the_uninterrupted_results(tmp_path, finished_job, cache_dir, monkeypatch):
    out = tmp_path / "out"
    argv = JOB + ["--out", str(out), "--cache-dir", cache_dir]
    killed = CountingFineTune(out, stop=3)  # killed as the first run of seed 1 starts
    monkeypatch.setattr(finetune, "fine_tune", killed)
    with pytest.raises(Interrupted):
        finetune.main(argv)
    # each run was on disk before the next one started
    assert killed.files_before == [[], ["full-seed0.json"], ["alast-seed0.json", "full-seed0.json"]]
    assert sorted(os.listdir(out)) == ["job.json", "runs"]  # no results or plots of an unfinished job

    resumed = CountingFineTune(out)
    monkeypatch.setattr(finetune, "fine_tune", resumed)
    record = finetune.main(argv + ["--resume"])
    assert resumed.calls == 2  # seed 1 only
    saved = json.loads((out / "results.json").read_text())
    assert _comparable(saved) == _comparable(record)
    reference_out, reference = finished_job
    assert _comparable(saved) == _comparable(json.loads((reference_out / "results.json").read_text()))
    assert saved["runs"]["full"][1]["losses"] == reference["runs"]["full"][1]["losses"]  # not just the same keys
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference_out))


def test_resuming_a_finished_job_trains_nothing(tmp_path, finished_job, cache_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_job[0], out)
    counted = CountingFineTune(out)
    monkeypatch.setattr(finetune, "fine_tune", counted)
    record = finetune.main(JOB + ["--out", str(out), "--cache-dir", cache_dir, "--resume"])
    assert counted.calls == 0
    assert "resumed:  4 of 4 runs already in" in capsys.readouterr().out
    assert _comparable(record) == _comparable(finished_job[1])


def test_equal_time_reruns_are_written_with_their_run(tmp_path, cache_dir, monkeypatch):
    """Under --equal-time a run is written with its rerun; one resumed after full fine-tuning was written
    takes its step count from full's saved wall time."""
    out = tmp_path / "out"
    argv = TINY + ["--methods", "linear,full", "--equal-time", "--out", str(out), "--cache-dir", cache_dir]
    killed = CountingFineTune(out, stop=3)  # full first (its wall time is the budget), then linear, then its rerun
    monkeypatch.setattr(finetune, "fine_tune", killed)
    with pytest.raises(Interrupted):
        finetune.main(argv)
    assert killed.files_before == [[], ["full-seed0.json"], ["full-seed0.json"]]
    full = json.loads((out / "runs" / "full-seed0.json").read_text())["run"]
    assert full["equal_time"] == {"steps": 4, "accuracy": full["accuracy"], "train_seconds": full["train_seconds"]}

    monkeypatch.setattr(finetune, "fine_tune", CountingFineTune(out))
    record = finetune.main(argv + ["--resume"])
    assert finetune.fine_tune.calls == 2  # linear and its equal-time rerun
    linear = record["runs"]["linear"][0]
    assert linear["equal_time"]["steps"] == max(1, round(4 * full["train_seconds"] / linear["train_seconds"]))
    assert record["runs"]["full"][0] == full
    assert record["methods"] == ["linear", "full"] and list(record["runs"]) == ["linear", "full"]


def test_resume_refuses_other_settings_naming_each(finished_job, cache_dir, monkeypatch):
    out, _ = finished_job
    message = _refusal(JOB + ["--out", str(out), "--cache-dir", cache_dir, "--resume", "--steps", "5",
                              "--methods", "full", "--token-budget", "0.4"], monkeypatch)
    assert message == (f"--resume: the job in --out {out} has other settings: --methods full,alast there, full now; "
                       "--steps 4 there, 5 now; --token-budget 0.5 there, 0.4 now. Resume with the same settings, "
                       "or start a new job in another --out")


def test_resume_refuses_other_starting_weights(tmp_path, finished_job, cache_dir, monkeypatch):
    """Where the pretraining is cached is not a setting, but the weights found there must be the job's."""
    out, _ = finished_job
    other_cache = tmp_path / "other-cache"
    args = finetune.parse_args(JOB + ["--cache-dir", str(other_cache)])
    state = torch.load(starting_weights.pretrain_cache_path(finetune.parse_args(JOB + ["--cache-dir", cache_dir])),
                       weights_only=True)
    state["state_dict"]["cls_token"] = state["state_dict"]["cls_token"] + 1e-3
    other_cache.mkdir()
    torch.save(state, starting_weights.pretrain_cache_path(args))
    monkeypatch.setattr(finetune, "fine_tune", CountingFineTune(out))
    with pytest.raises(SystemExit) as info:
        finetune.main(JOB + ["--out", str(out), "--cache-dir", str(other_cache), "--resume"])
    message = str(info.value.code)
    assert message.startswith(f"--resume: the starting weights differ from those of the job in --out {out}")
    assert finetune.fine_tune.calls == 0


def test_resume_needs_a_job(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    assert _refusal(TINY + ["--out", str(missing), "--resume"], monkeypatch).startswith(
        f"--resume: --out {missing} does not exist")
    assert not missing.exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert _refusal(TINY + ["--out", str(tmp_path), "--resume"], monkeypatch) == (
        f"--resume: --out {tmp_path} holds no job to resume (no job.json); run without --resume to start one")


def test_a_damaged_run_file_is_named(tmp_path, finished_job, cache_dir, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished_job[0], out)
    damaged = out / "runs" / "alast-seed1.json"
    damaged.write_text('{"method": "alast", "se')
    assert _refusal(JOB + ["--out", str(out), "--cache-dir", cache_dir, "--resume"], monkeypatch).startswith(
        f"--resume: cannot read the finished run {damaged} (")
