"""The fine-tuning job (python/alast_finetune) and its embedded data: learning, outputs, options, errors."""
import copy
import json
import math
import os

import pytest
import timm
import torch

import alast_kernels as ak
from alast_finetune import finetune, training
from alast_finetune.digits_canvas import DigitCanvas, batches, digit_tasks

CPU = torch.device("cpu")
CHANCE = 1 / 5  # both embedded tasks have 5 classes
# A 2-block job that takes a few seconds; each test adds what it checks.
TINY_DEFAULT_TOKENS = ["--depth", "2", "--steps", "4", "--pretrain-steps", "3", "--batch-size", "8", "--probes", "2",
                       "--threads", "1", "--quiet", "--methods", "full,alast"]
# Two blocks are too few for ALaST's default drop mode at the job's token budget of 0.5 (the first block
# processes every token, so the mean is at least (1 + min_keep)/2 = 0.6): the tiny jobs carry tokens.
TINY = TINY_DEFAULT_TOKENS + ["--tokens", "carry"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One pretraining cache for the module: the tiny job pretrains once, later runs load it."""
    return str(tmp_path_factory.mktemp("cache"))


def _tiny_vit(num_classes=5, depth=3, dim=96):
    return timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=depth, embed_dim=dim,
                             num_heads=3, num_classes=num_classes)


# ------------------------------------------------------------------------------------------------ data
def test_digit_canvas_is_mostly_background_and_deterministic():
    tasks = digit_tasks(48, seed=0, grid=8)
    train, test = tasks["finetune"]
    assert isinstance(train, DigitCanvas)
    assert train.num_classes == test.num_classes == 5
    assert sorted(test.labels.unique().tolist()) == [0, 1, 2, 3, 4]
    # 5-9 has 896 images; 25% of each class held out (4 views of each), train and test disjoint by construction
    assert len(test) % 4 == 0 and len(train) + len(test) // 4 == 896 and abs(len(test) // 4 - 224) <= 5
    assert torch.equal(test.labels[:len(test) // 4], test.labels[len(test) // 4:len(test) // 2])
    x, y = train.render(torch.arange(16), torch.Generator().manual_seed(1))
    assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32
    # a 24x24 digit on a 48x48 canvas of 8x8 patches: at least 20 of 36 patches are pure background
    ink = (x[:, 0] > 0.0).float()  # background noise is below 0.5 intensity, i.e. below 0 after normalising
    patches_with_ink = ink.unfold(1, 8, 8).unfold(2, 8, 8).amax(dim=(-1, -2)).sum(dim=(1, 2))
    assert (patches_with_ink <= 16).all()
    again = list(batches(train, 8, 3, seed=5))
    for (xa, ya), (xb, yb) in zip(again, batches(train, 8, 3, seed=5)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(again[0][0], next(batches(train, 8, 1, seed=6))[0])


# -------------------------------------------------------------------------------------------- learning
def test_alast_learns_embedded_digits_well_above_chance():
    """A small ViT trained with ALaST (half the patch tokens per block on average) from scratch, 200 steps."""
    torch.manual_seed(0)
    train_set, test_set = digit_tasks(48, seed=0, grid=8)["pretrain"]
    method = ak.methods.create("alast", _tiny_vit(), token_budget=0.5, train_layers=2, train_embeddings=True)
    training.train(method, train_set, steps=200, batch_size=32, lr=2e-3, weight_decay=0.05, seed=0, device=CPU,
                   desc="", show=False)
    alast = method.controller
    # ALaST really selected tokens and froze layers while it learned
    assert all(sum(h["keep"]) < 0.6 * 36 * len(h["keep"]) for h in alast.history)
    assert all(not all(h["train"]) for h in alast.history)
    accuracy = training.evaluate(method.model, test_set, CPU)
    assert accuracy > 2 * CHANCE, f"held-out accuracy {accuracy:.3f} is not well above chance {CHANCE}"


@pytest.mark.parametrize("name", ["alast", "alast+lora"])
def test_measured_steps_leave_training_unchanged(name):
    """Probing FLOPs and memory on a step must not change the plans, the budgets or the weights."""
    train_set, _ = digit_tasks(48, seed=0, grid=8)["finetune"]
    torch.manual_seed(0)
    start = _tiny_vit(depth=2, dim=48)
    finals = []
    for probes in (0, 5):
        torch.manual_seed(1)  # LoRA's initial adapters are drawn
        method = ak.methods.create(name, copy.deepcopy(start), token_budget=0.5, train_layers=1, tokens="carry")
        run = training.train(method, train_set, steps=5, batch_size=8, lr=1e-3, weight_decay=0.05, seed=3,
                             device=CPU, desc="", show=False, probes=probes)
        assert len(run["probes"]) == probes
        finals.append((method.state_dict(), method.model.state_dict(), run["losses"]))
    (state_a, weights_a, losses_a), (state_b, weights_b, losses_b) = finals
    a, b = state_a["controller"], state_b["controller"]
    assert a["budgets"] == b["budgets"] and a["step"] == b["step"] == 5
    assert [h["keep"] for h in a["history"]] == [h["keep"] for h in b["history"]]
    assert losses_a == losses_b
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def _full_step_flops(batch, depth, dim, num_patches, patch, classes, forward_only=False):
    """Forward+backward FLOPs of full fine-tuning of a plain ViT, derived by hand.

    Forward: per block 2·B·N·12·D² for qkv, proj, fc1, fc2 and 4·B·N²·D for q·kᵀ and p·v; the patch
    embedding 2·B·Np·(3·p²)·D; the head 2·B·D·C. Backward doubles the matmuls except the patch
    embedding's, whose input (the image) needs no gradient: only its weight gradient, once more. The
    fused attention backward recomputes q·kᵀ: five products of the forward's size, 2.5× the forward.
    """
    n = num_patches + 1
    linear = depth * 2 * batch * n * 12 * dim * dim
    attention = depth * 4 * batch * n * n * dim
    embed = 2 * batch * num_patches * 3 * patch * patch * dim
    head = 2 * batch * dim * classes
    if forward_only:
        return linear + head + embed + attention
    return 3 * (linear + head) + 2 * embed + 3.5 * attention


# ---------------------------------------------------------------------------------------------- the job
def test_main_writes_results_plots_and_the_comparison(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    record = finetune.main(TINY + ["--methods", "full,alast,lora,alast+lora", "--out", str(out),
                                   "--cache-dir", cache_dir])
    printed = capsys.readouterr().out
    assert "trained now on digits 0-4" in printed
    for name in ("full", "alast", "lora", "alast+lora"):
        assert f"\n{name} " in printed, name

    saved = json.loads((out / "results.json").read_text())
    assert saved["start_weights"]["source"] == "trained_now"
    assert os.path.isfile(saved["start_weights"]["path"])
    assert saved["methods"] == ["full", "alast", "lora", "alast+lora"] and saved["seeds"] == [0]
    runs = {name: r[0] for name, r in saved["runs"].items()}
    for run in runs.values():
        for key in ("accuracy", "train_seconds", "median_step_seconds", "train_flops", "peak_activation_bytes",
                    "final_loss", "losses", "probe_steps", "trainable_parameters", "inference_flops_per_image",
                    "inference_seconds_per_image"):
            assert key in run, key
        assert 0 <= run["accuracy"] <= 1 and run["train_seconds"] > 0 and len(run["losses"]) == 4
        assert run["probe_steps"] == [0, 3] and run["memory_kind"] == "saved_for_backward"
    full, alast = runs["full"], runs["alast"]
    # the full run's FLOPs match a derivation by hand (attention included), every step alike
    per_step = _full_step_flops(batch=8, depth=2, dim=192, num_patches=36, patch=8, classes=5)
    assert full["flops_per_step_probes"] == [per_step, per_step]
    assert full["train_flops"] == 4 * per_step
    assert full["inference_flops_per_image"] == _full_step_flops(1, 2, 192, 36, 8, 5, forward_only=True)
    assert alast["train_flops"] < 0.7 * full["train_flops"]
    assert alast["peak_activation_bytes"] < full["peak_activation_bytes"]
    assert alast["inference_flops_per_image"] == full["inference_flops_per_image"]  # eval keeps every token
    # LoRA trains its adapters and the head only; with ALaST it keeps ALaST's savings
    assert runs["lora"]["trainable_parameters"] < 0.1 * full["trainable_parameters"]
    assert runs["alast+lora"]["train_flops"] < runs["lora"]["train_flops"]
    assert len(alast["history"]) == 4 and len(alast["final_keep_ratios"]) == 2
    assert alast["final_trained_layers"] == [i for i, t in enumerate(alast["history"][-1]["train"]) if t]
    assert math.isclose(sum(alast["history"][0]["keep_ratio"]) / 2, 0.5, rel_tol=1e-6)  # token budget held
    assert saved["ratios_to_full"]["alast"]["train_flops"] == pytest.approx(alast["train_flops"] / full["train_flops"])
    assert saved["summary"]["full"]["accuracy"]["mean"] == full["accuracy"]
    target = saved["alast_target"]  # the README's accuracy target, recomputed from the runs
    gap = 100 * (alast["accuracy"] - full["accuracy"])
    assert target["accuracy_gap_points"] == pytest.approx(gap)
    assert target["flops_ratio"] == pytest.approx(alast["train_flops"] / full["train_flops"])
    assert target["met"] == (gap >= -2 and target["flops_ratio"] <= 0.6)
    assert f"ALaST against full fine-tuning: {gap:+.1f} accuracy points" in printed
    assert record["runs"]["full"][0]["accuracy"] == full["accuracy"]

    import matplotlib.image
    for png, min_size in (("budgets.png", (300, 600)), ("budgets-alast+lora.png", (300, 600)),
                          ("pareto.png", (300, 800))):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(str(out / png)).shape
        assert height > min_size[0] and width > min_size[1], png

    # a second run reuses the cached starting weights and gives the same full fine-tuning result
    again = finetune.main(TINY + ["--out", str(tmp_path / "again"), "--cache-dir", cache_dir])
    assert again["start_weights"]["source"] == "cache"
    assert "loaded from cache" in capsys.readouterr().out
    assert again["runs"]["full"][0]["losses"] == full["losses"]


def test_seeds_and_equal_time(tmp_path, cache_dir, capsys):
    record = finetune.main(TINY + ["--methods", "full,linear", "--seeds", "2", "--equal-time", "--seed", "3",
                                   "--out", str(tmp_path / "out"), "--cache-dir", cache_dir])
    assert record["seeds"] == [3, 4]
    full, linear = record["runs"]["full"], record["runs"]["linear"]
    assert len(full) == len(linear) == 2 and full[0]["losses"] != full[1]["losses"]
    accuracy = record["summary"]["full"]["accuracy"]
    values = [r["accuracy"] for r in full]
    assert accuracy["mean"] == pytest.approx(sum(values) / 2) and accuracy["min"] == min(values)
    # linear probing is cheaper per step, so full fine-tuning's time buys it more steps
    for run, base in zip(linear, full):
        assert run["equal_time"]["steps"] == max(1, round(4 * base["train_seconds"] / run["train_seconds"]))
    assert all(r["equal_time"]["steps"] == 4 for r in full)
    assert "Equal time" in capsys.readouterr().out


def test_checkpoint_option(tmp_path, cache_dir):
    torch.manual_seed(1)
    donor = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=2, num_classes=7)
    path = tmp_path / "start.pt"
    torch.save({"model": donor.state_dict()}, path)
    record = finetune.main(TINY + ["--checkpoint", str(path), "--out", str(tmp_path / "out"),
                                   "--cache-dir", cache_dir])
    assert record["start_weights"] == {"source": "checkpoint", "path": str(path)}


@pytest.mark.parametrize("policy", ["fixed", "paper"])
def test_other_policies(tmp_path, cache_dir, policy):
    budget = ["--token-budget", "0.4"] if policy == "fixed" else []  # 'paper' refuses one (its budgets adapt)
    record = finetune.main(TINY_DEFAULT_TOKENS + ["--depth", "3", "--policy", policy, *budget, "--train-layers", "2",
                                   "--methods", "alast", "--out", str(tmp_path / "out"), "--cache-dir", cache_dir])
    alast = record["runs"]["alast"][0]
    if policy == "fixed":  # the token budget in every layer, the deepest --train-layers trained, every step
        assert all(h["keep_ratio"] == [0.4] * 3 and h["train"] == [False, True, True] for h in alast["history"])
        assert alast["final_keep_tokens"] == [15] * 3  # ceil(0.4 * 36)
    else:  # budgets start at 0.9; tokens dropped through depth: int(0.9 · 37) = 33, int(0.9 · 34) = 30
        assert alast["history"][0]["keep"] == [36, 33, 30]
        assert all(sum(h["train"]) == 2 for h in alast["history"])


def test_token_budget_default_and_the_paper_policy():
    """A policy that ignores the token budget gets none (so no plot is titled with one); the others get
    --token-budget, 0.5 unless given."""
    assert finetune.parse_args(TINY).token_budget == 0.5
    assert finetune.parse_args(TINY + ["--policy", "fixed", "--token-budget", "0.3"]).token_budget == 0.3
    paper = finetune.parse_args(TINY + ["--policy", "paper"])
    assert paper.token_budget is None
    options = finetune.method_options("alast", paper, depth=2, seed=0, steps=4)
    assert "token_budget" not in options and options["policy"] == "paper"


def test_new_alast_options_reach_the_controller():
    import timm
    import alast_kernels as ak
    for argv, check in (
            (TINY_DEFAULT_TOKENS + ["--policy", "paper", "--lr", "0.002"],
             lambda c: c.alpha == 0.002 and c.tokens == "drop"),
            (TINY_DEFAULT_TOKENS + ["--token-budget", "0.6"], lambda c: c.tokens == "drop" and c.policy == "alast"),
            (TINY + ["--policy", "paper", "--tokens", "carry"], lambda c: c.tokens == "carry"),
            (TINY + ["--tokens", "drop", "--token-budget", "0.7"],
             lambda c: c.tokens == "drop" and c.token_budget == 0.7),
            (TINY + ["--flop-budget", "0.7"], lambda c: c.flop_budget == 0.7 and c.token_budget is None)):
        options = finetune.method_options("alast", finetune.parse_args(argv), depth=2, seed=3, steps=10)
        vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3)
        assert check(ak.methods.create("alast", vit, **options).controller), argv


def test_sample_reaches_the_controller():
    """--sample makes the job's ALaST controller draw its trained blocks; without it the highest budgets train."""
    import timm
    import alast_kernels as ak
    for argv, sample in ((TINY + ["--sample"], True), (TINY, False)):
        options = finetune.method_options("alast", finetune.parse_args(argv), depth=2, seed=3, steps=10)
        vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3)
        assert ak.methods.create("alast", vit, **options).controller.sample is sample


def test_freeze_embeddings_reaches_the_controller():
    """By default the job's ALaST trains the embeddings, as full fine-tuning does; --freeze-embeddings freezes
    them. Under alast+lora peft has frozen them either way."""
    import timm
    import alast_kernels as ak
    for name, argv, trained in (("alast", TINY, True), ("alast", TINY + ["--freeze-embeddings"], False),
                                ("alast+lora", TINY, False)):
        options = finetune.method_options(name, finetune.parse_args(argv), depth=2, seed=3, steps=10)
        vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3)
        assert ak.methods.create(name, vit, **options).controller.train_embeddings is trained, (name, argv)


def _write_image_folder(root, classes, per_class, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.rand(20, 20, 3, generator=g) * 60
            pixels[..., c % 3] += 150  # each class has its own dominant colour
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i}.png")


@pytest.mark.parametrize("layout", ["flat", "train_val"])
def test_image_folder_data(tmp_path, cache_dir, layout):
    root = tmp_path / "data"
    classes = ["cat", "cow", "dog"]
    if layout == "flat":
        _write_image_folder(root, classes, per_class=8)
        expected = (18, 6)  # a quarter of each class held out
    else:
        _write_image_folder(root / "train", classes, per_class=5)
        _write_image_folder(root / "val", classes, per_class=2, seed=1)
        expected = (15, 6)
    record = finetune.main(TINY + ["--data", str(root), "--out", str(tmp_path / "out"), "--cache-dir", cache_dir])
    assert record["data"]["classes"] == classes
    assert (record["data"]["train_size"], record["data"]["test_size"]) == expected
    assert record["start_weights"]["source"] in ("trained_now", "cache")
    assert all(0 <= record["runs"][k][0]["accuracy"] <= 1 for k in ("full", "alast"))


@pytest.mark.parametrize("damage", ["not_an_image", "truncated"])
def test_a_broken_image_is_named(tmp_path, damage):
    root = tmp_path / "data"
    _write_image_folder(root, ["cat", "dog"], per_class=4)
    broken = root / "dog" / "2.png"
    data = broken.read_bytes()
    broken.write_bytes(b"these bytes are no image" if damage == "not_an_image" else data[:len(data) // 2])
    with pytest.raises(SystemExit) as info:
        finetune.load_image_folder(str(root), 16, seed=0)
    assert str(info.value.code).startswith(f"--data {root}: cannot read the image {broken} (")


@pytest.mark.parametrize("damage", ["garbage", "wrong_content"])
def test_a_damaged_pretraining_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    from alast_finetune import starting_weights
    args = finetune.parse_args(TINY + ["--cache-dir", str(tmp_path)])
    path = starting_weights.pretrain_cache_path(args)
    if damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip file")
    else:  # a readable file that is not a pretraining: no weights
        torch.save({"accuracy": torch.tensor(0.5)}, path)
    with pytest.warns(RuntimeWarning, match=f"cached starting weights {path} are unreadable"):
        weights = starting_weights.starting_weights(args, starting_weights.create_model(args, 5), CPU, show=False)
    assert weights["source"] == "trained_now" and weights["path"] == path
    rebuilt = torch.load(path, weights_only=True)  # replaced by the new pretraining
    assert torch.equal(rebuilt["accuracy"], torch.tensor(weights["pretrain_accuracy"]))  # stored as float32
    model = starting_weights.create_model(args, 5)
    assert starting_weights.starting_weights(args, model, CPU, show=False)["source"] == "cache"
    assert torch.equal(model.blocks[0].attn.qkv.weight, rebuilt["state_dict"]["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--token-budget", "1.5"], "argument --token-budget: expected a number in (0, 1], got '1.5'"),
    (["--token-budget", "0"], "expected a number in (0, 1]"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--batch-size", "x"], "argument --batch-size: expected a positive integer, got 'x'"),
    (["--policy", "magic"], "--policy: invalid choice: 'magic'"),
    (["--policy", "fixed", "--sample"], "--sample: only with --policy alast"),
    (["--token-budget", "0.3", "--min-keep", "0.4"], "--min-keep: expected at most --token-budget=0.3"),
    (["--policy", "paper", "--token-budget", "0.5"], "--token-budget: --policy paper ignores it"),
    (["--flop-budget", "0.6", "--token-budget", "0.5"], "--flop-budget: only with --policy alast and without"),
    (["--policy", "paper", "--flop-budget", "0.6"], "--flop-budget: only with --policy alast"),
    (["--flop-budget", "0"], "argument --flop-budget: expected a number in (0, 1]"),
    (["--tokens", "shrink"], "--tokens: invalid choice: 'shrink'"),
    (["--data", "/no/such/dir"], "--data: expected a directory"),
    (["--checkpoint", "/no/such/file.pt"], "--checkpoint: no such file"),
    (["--pretrained", "--checkpoint", "x.pt"], "not allowed with argument"),
    (["--device", "banana"], "--device: Expected one of cpu, cuda"),
    (["--methods", "full,magic"], "--methods: unknown method(s) magic; expected some of full, linear"),
    (["--methods", "full,full"], "--methods: a method is named twice"),
    (["--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
    (["--policy", "paper", "--token-budget", "0.1"], "--token-budget: --policy paper ignores it"),
    (["--policy", "paper", "--token-budget", "0.5"], "--token-budget: --policy paper ignores it"),  # the default too
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        finetune.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def _exit_message(argv, tmp_path, cache_dir):
    with pytest.raises(SystemExit) as info:
        finetune.main(TINY + argv + ["--out", str(tmp_path / "out"), "--cache-dir", cache_dir])
    return str(info.value.code)


def test_errors_found_after_parsing(tmp_path, cache_dir, monkeypatch):
    assert "--train-layers: expected at most the model's depth 2, got 3" in \
        _exit_message(["--train-layers", "3"], tmp_path, cache_dir)
    assert "--model resnet18: expected a timm VisionTransformer" in \
        _exit_message(["--model", "resnet18"], tmp_path, cache_dir)
    assert "--model: Unknown model" in _exit_message(["--model", "no_such_vit"], tmp_path, cache_dir)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "cannot read it as a PyTorch state_dict" in \
        _exit_message(["--checkpoint", str(garbage)], tmp_path, cache_dir)
    deeper = tmp_path / "deeper.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=3).state_dict(), deeper)
    message = _exit_message(["--checkpoint", str(deeper)], tmp_path, cache_dir)
    assert "does not fit" in message and "blocks.2." in message

    # without network the hub download fails; the job says so and names the ways out
    real_create = timm.create_model

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(finetune.timm, "create_model", offline)
    message = _exit_message(["--pretrained"], tmp_path, cache_dir)
    assert message.startswith("--pretrained: could not get timm's hub weights") and "--checkpoint PATH" in message


@pytest.mark.parametrize("command", [["-m", "alast_finetune"], ["python/finetune.py"]])
def test_both_commands_start_the_job(command):
    """``python -m alast_finetune`` and ``python python/finetune.py`` (the docs' commands, from the repository
    root) start the same job."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, *command, "--help"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--methods" in done.stdout and "--resume" in done.stdout


@pytest.mark.distributed
def test_the_job_runs_under_torchrun(tmp_path, cache_dir):
    """Two ranks share every batch (DDP, gloo); rank 0 pretrains, prints and writes the results. With
    --equal-time every rank trains rank 0's step count (each rank's own wall time could differ: a hang)."""
    import subprocess
    import sys
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "alast_finetune",
           *TINY, "--methods", "full,alast", "--equal-time", "--out", str(out), "--cache-dir", cache_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["world_size"] == 2 and set(saved["runs"]) == {"full", "alast"}
    assert len(saved["runs"]["alast"][0]["history"]) == 4
    assert saved["runs"]["alast"][0]["equal_time"]["steps"] >= 1


def test_feature_cache_measurement(tmp_path, cache_dir, capsys):
    record = finetune.main(TINY + ["--methods", "losa", "--feature-cache", "256", "--out", str(tmp_path / "measured"),
                                   "--cache-dir", cache_dir])
    cache = record["feature_cache"]["losa"]
    assert len(cache["epoch_seconds"]) == 2 and cache["speedup_epoch2"] > 1
    assert cache["cache_bytes"] > 0
    assert "losa with its feature cache" in capsys.readouterr().out
    message = _exit_message(["--methods", "losa", "--feature-cache", "1"], tmp_path, cache_dir)
    assert "max_bytes" in message


@pytest.mark.parametrize("name", [n for n in ak.methods.available()
                                  if ak.methods.method_class(n).trains_backbone])
def test_head_lr_puts_only_the_new_classifier_in_its_own_group(name):
    """--head-lr: the classifier's parameters train at head_lr, every other trainable one at lr; without it,
    one group at lr (the job's behaviour before the option). For every method that trains the backbone,
    including those whose model wraps the ViT (EViT)."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3)
    method = ak.methods.create(name, vit, **({"policy": "paper", "alpha": 1e-3} if "alast" in name else {}))
    trainable = {id(p) for p in method.trainable_parameters()}
    head = {id(p) for p in vit.get_classifier().parameters()}
    assert head <= trainable
    (single,) = training.parameter_groups(method, 1e-5, None)
    assert single["lr"] == 1e-5 and {id(p) for p in single["params"]} == trainable
    body, new_head = training.parameter_groups(method, 1e-5, 2e-3)
    assert body["lr"] == 1e-5 and {id(p) for p in body["params"]} == trainable - head
    assert new_head["lr"] == 2e-3 and {id(p) for p in new_head["params"]} == head
    args = finetune.parse_args(["--head-lr", "2e-3"])
    assert args.head_lr == 2e-3 and finetune.parse_args([]).head_lr is None
