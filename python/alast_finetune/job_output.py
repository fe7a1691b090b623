"""The fine-tuning job's ``--out`` directory: checked before anything runs, written run by run, resumable.

Layout::

    OUT/job.json                    the job's settings and a digest of its starting weights
    OUT/runs/<method>-seed<S>.json  one finished run (with its equal-time rerun, if any)
    OUT/results.json, OUT/*.png     the comparison, written when every run is done

Every file is written atomically (:func:`report.atomic_path`), so a job killed at any moment loses at most
the run in progress. A new job refuses an ``--out`` that is not empty (nothing there is ever replaced or
left stale beside new results); ``--resume`` continues the job recorded there, which requires the same
settings and the same starting weights, and skips the runs already written.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Tuple

import torch

from .report import write_json

__all__ = ["JobOutput", "job_settings", "state_digest"]

# Options that change where the job writes or what it prints, not what a run computes. Where the starting
# weights are cached is one of them: their digest is compared instead.
NOT_SETTINGS = ("out", "resume", "quiet", "cache_dir")
JOB_FILE = "job.json"
RUNS_DIR = "runs"


def job_settings(args, world: int) -> Dict:
    """The settings a resumed job must share with the job it continues: every option except
    ``NOT_SETTINGS``, as JSON values, and the number of torchrun ranks."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["world_size"] = world
    return json.loads(json.dumps(settings))


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of ``model``'s state_dict (names, dtypes, shapes and bytes), to tell starting weights apart."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _option(key: str) -> str:
    return "torchrun --nproc-per-node" if key == "world_size" else "--" + key.replace("_", "-")


_MISSING = object()  # a setting one of the two jobs does not have (an option added or removed since)


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "(not recorded)" if value is _MISSING else str(value)


def _refuse(path: str, problem: str) -> None:
    raise SystemExit(f"--out {path}: {problem}")


class JobOutput:
    """The job's output directory.

    ``JobOutput(path, settings, resume)`` validates ``path`` (rank 0, before any data is loaded): a
    directory, created if missing, writable; empty for a new job, or holding a job with the same
    ``settings`` for ``resume``. With ``validate=False`` (the other torchrun ranks, after rank 0 has
    validated) it only reads the finished runs. Errors are ``SystemExit`` messages naming ``--out`` or
    ``--resume``.
    """

    def __init__(self, path: str, settings: Dict, resume: bool, validate: bool = True):
        self.path, self.settings, self.resume = path, settings, resume
        self.runs_dir = os.path.join(path, RUNS_DIR)
        self._job_written = resume  # a resumed job keeps its job.json
        self._recorded: Dict = {}  # job.json's content: read on resume, filled by check_start_weights
        if validate:
            self._validate()

    # ----------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            _refuse(path, "expected a directory, and this is a file")
        if self.resume and not os.path.isdir(path):
            raise SystemExit(f"--resume: --out {path} does not exist, so it holds no job to resume; run without "
                             "--resume to start one")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            _refuse(path, f"cannot create the directory ({e.strerror or e})")
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        try:  # a real write: permission bits alone do not tell (root, ACLs, read-only mounts)
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            _refuse(path, f"cannot write there ({e.strerror or e})")
        entries = sorted(os.listdir(path))
        if not self.resume:
            if entries:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                _refuse(path, f"not empty ({shown}); a new job refuses it rather than replace or mix with what "
                              "is there: pass --resume to continue the job recorded there (same settings), or "
                              "give an empty or new --out")
            return
        job_file = os.path.join(path, JOB_FILE)
        if not os.path.isfile(job_file):
            raise SystemExit(f"--resume: --out {path} holds no job to resume (no {JOB_FILE}); run without "
                             "--resume to start one")
        try:
            with open(job_file) as f:
                self._recorded = json.load(f)
            recorded = dict(self._recorded["settings"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--resume: cannot read the job's settings from {job_file} ({e})") from None
        differ = [k for k in sorted(set(recorded) | set(self.settings))
                  if recorded.get(k, _MISSING) != self.settings.get(k, _MISSING)]
        if differ:
            changes = "; ".join(f"{_option(k)} {_text(recorded.get(k, _MISSING))} there, "
                                f"{_text(self.settings.get(k, _MISSING))} now" for k in differ)
            raise SystemExit(f"--resume: the job in --out {path} has other settings: {changes}. Resume with the "
                             "same settings, or start a new job in another --out")

    def check_start_weights(self, digest: str) -> None:
        """Refuse to resume from other starting weights than the job's (``digest``: :func:`state_digest`);
        for a new job, remember the digest for ``job.json``."""
        recorded = self._recorded.get("start_weights_sha256")
        if self.resume and recorded != digest:
            raise SystemExit(f"--resume: the starting weights differ from those of the job in --out {self.path} "
                             f"(SHA-256 {digest[:12]}... now, {str(recorded)[:12]}... there): the checkpoint or "
                             "the cached pretraining changed; start a new job in another --out")
        self._recorded = {"settings": self.settings, "start_weights_sha256": digest}

    # ------------------------------------------------------------------------------------------ runs
    def run_path(self, method: str, seed: int) -> str:
        return os.path.join(self.runs_dir, f"{method}-seed{seed}.json")

    def finished(self, plan: List[Tuple[str, int]]) -> Dict[Tuple[str, int], Dict]:
        """The runs of ``plan`` (``(method, seed)`` pairs) already written, read back."""
        done = {}
        for method, seed in plan:
            path = self.run_path(method, seed)
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    saved = json.load(f)
                if (saved["method"], saved["seed"]) != (method, seed) or not isinstance(saved["run"], dict):
                    raise ValueError(f"it holds method {saved['method']!r} seed {saved['seed']!r}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"--resume: cannot read the finished run {path} ({e}); delete it to train that "
                                 "run again") from None
            done[(method, seed)] = saved["run"]
        return done

    def save_run(self, method: str, seed: int, run: Dict) -> Dict:
        """Write one finished run at once (``job.json`` first, with the first run); returns ``run`` as read back
        from JSON, so a run computed now and one read by a later ``--resume`` are the same values."""
        os.makedirs(self.runs_dir, exist_ok=True)
        if not self._job_written:
            write_json(self._recorded, os.path.join(self.path, JOB_FILE))
            self._job_written = True
        saved = json.loads(json.dumps({"method": method, "seed": seed, "run": run}))
        write_json(saved, self.run_path(method, seed))
        return saved["run"]
