#!/usr/bin/env python
"""Fine-tune a timm Vision Transformer twice from the same weights — full fine-tuning and ALaST — and compare.

Run with no arguments (``make demo``) it needs no download: it fine-tunes a small ViT (``vit_tiny_patch16_224``
with 48×48 inputs, 8×8 patches and 6 blocks) on scikit-learn's bundled handwritten digits 5–9 pasted on a mostly
empty canvas, starting from weights the job trains itself on digits 0–4 (once; cached). Both runs use
the same AdamW optimiser, learning-rate schedule and batches. It prints a side-by-side table (held-out
accuracy, wall time, training FLOPs, peak activation memory) and ALaST's last per-layer plan, and writes
``results.json`` and ``budgets.png`` (layer × step heat maps of the budgets, keep ratios and trained
layers) to ``--out``.

How the costs are measured: on ``--probes`` training steps spread evenly over each run, one extra
forward+backward on that step's batch is measured under that step's plan (``alast.step(update=False)``)
and its gradients dropped, so training is unchanged and the probes do not count in the wall time.
FLOPs: ``alast_kernels.measure.count_flops`` of forward+backward (matmuls, convolution and attention,
whose fused backward recomputes q·kᵀ); the total is the mean over the probes × the number of steps. Memory: on the CPU the bytes autograd saves for backward during the forward
(``saved_activation_bytes``), on CUDA the rise of the allocator's peak over forward+backward
(``peak_cuda_memory``); the table shows the maximum over the probes. Wall time: the training steps only
(forward, backward, optimiser), without data rendering, probes and evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import timm
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

import alast_kernels as ak
from alast_kernels.measure import count_flops, peak_cuda_memory, saved_activation_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_canvas import TensorImages, batches, digit_tasks  # noqa: E402
from report import comparison_table, layer_table, plot_budgets, write_json  # noqa: E402

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alast_kernels")
PRETRAIN_VERSION = 1  # bump when the pretraining recipe changes, so old cached weights are not reused


# ------------------------------------------------------------------------------------------- options
def _number(kind, accept, expected: str, name: str):
    """An argparse ``type`` converting with ``kind`` and rejecting values ``accept`` refuses."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer", "positive integer")
_non_negative = _number(int, lambda v: v >= 0, "an integer >= 0", "integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number", "positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0", "number >= 0")


def _fraction(name: str):
    return _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]", name)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default unless it has none or its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune a timm ViT with full fine-tuning and with ALaST from the same weights; "
                    "print and save the comparison.",
        formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR",
                      help="ImageFolder data (DIR/<class>/<image>, or DIR/train and DIR/val|test); held in "
                           "memory, resized to --img-size. Default: the embedded digits 5-9 on a canvas")
    data.add_argument("--seed", type=int, default=0, help="seed of the data order, splits, head and controller")
    model = p.add_argument_group("model and starting weights")
    model.add_argument("--model", default="vit_tiny_patch16_224", help="any timm VisionTransformer name")
    model.add_argument("--img-size", type=_positive, default=48, help="input size (overrides the model's)")
    model.add_argument("--patch-size", type=_positive, default=8, help="patch size (overrides the model's)")
    model.add_argument("--depth", type=_non_negative, default=6,
                       help="number of blocks (overrides the model's); 0 keeps the model's own depth, as "
                            "timm's hub weights of deeper models need")
    start = model.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true",
                       help="start from timm's hub weights (needs network access or a filled HF cache)")
    start.add_argument("--checkpoint", metavar="PATH",
                       help="start from this state_dict (the classifier head is replaced)")
    model.add_argument("--pretrain-steps", type=_positive, default=200,
                       help="steps of the job's own pretraining on digits 0-4 (used without --pretrained "
                            "or --checkpoint; the result is cached)")
    model.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the job's pretrained weights are cached")
    train = p.add_argument_group("fine-tuning")
    train.add_argument("--steps", type=_positive, default=120, help="training steps of each run")
    train.add_argument("--batch-size", type=_positive, default=32, help="images per training step")
    train.add_argument("--lr", type=_positive_float, default=1e-3,
                       help="AdamW peak learning rate (5%% linear warm-up, cosine decay)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=0.05, help="AdamW weight decay")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    train.add_argument("--threads", type=_positive, default=None,
                       help="CPU threads for torch (default: the CPUs this process may use)")
    alast = p.add_argument_group("ALaST")
    alast.add_argument("--policy", choices=("alast", "paper", "fixed"), default="alast",
                       help="budget policy; 'fixed' keeps --token-budget in every layer and trains the "
                            "--train-layers deepest ones")
    alast.add_argument("--token-budget", type=_fraction("token_budget"), default=0.5,
                       help="mean fraction of patch tokens the blocks process, in (0, 1]")
    alast.add_argument("--train-layers", type=_positive, default=None,
                       help="blocks trained per step (default: ceil(0.75 * depth))")
    alast.add_argument("--min-keep", type=_fraction("min_keep"), default=0.2,
                       help="lowest keep ratio of a block, at most --token-budget")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=os.path.join("runs", "finetune"), help="output directory")
    out.add_argument("--probes", type=_positive, default=5, help="measured steps per run (FLOPs and memory)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.policy == "alast" and args.min_keep > args.token_budget:
        parser.error(f"--min-keep: expected at most --token-budget={args.token_budget}, got {args.min_keep}")
    if args.data is not None and not os.path.isdir(args.data):
        parser.error(f"--data: expected a directory in ImageFolder layout, {args.data!r} is not a directory")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint: no such file: {args.checkpoint!r}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    return args


# ---------------------------------------------------------------------------------------------- data
def load_image_folder(root: str, img_size: int, seed: int):
    """(train, test) :class:`TensorImages` from an ImageFolder directory, resized to ``img_size``.

    ``root/train`` with ``root/val`` or ``root/test`` are used as given; otherwise a seeded 75/25 split
    per class.
    """
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def load(path: str):
        try:
            ds = datasets.ImageFolder(path, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"--data {root}: {e}") from None
        if len(ds.classes) < 2:
            raise SystemExit(f"--data {root}: expected at least 2 class folders in {path}, found {ds.classes}")
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        return images, torch.tensor(ds.targets, dtype=torch.int64), ds.classes

    held_out = next((os.path.join(root, n) for n in ("val", "test") if os.path.isdir(os.path.join(root, n))), None)
    if os.path.isdir(os.path.join(root, "train")) and held_out:
        x, y, classes = load(os.path.join(root, "train"))
        xt, yt, test_classes = load(held_out)
        if test_classes != classes:
            raise SystemExit(f"--data {root}: train classes {classes} differ from {held_out} classes {test_classes}")
        return TensorImages(x, y, len(classes)), TensorImages(xt, yt, len(classes)), classes
    x, y, classes = load(root)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(len(classes)):
        members = (y == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        n_test = len(members) // 4
        if n_test == 0 or n_test == len(members):
            raise SystemExit(f"--data {root}: class {classes[c]!r} has {len(members)} image(s); a held-out "
                             "split needs at least 2 per class (or give train/ and val/ folders)")
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    return (TensorImages(x[train_idx], y[train_idx], len(classes)),
            TensorImages(x[test_idx], y[test_idx], len(classes)), classes)


# --------------------------------------------------------------------------------------------- model
def model_kwargs(args) -> Dict:
    kwargs = {"img_size": args.img_size, "patch_size": args.patch_size}
    if args.depth:
        kwargs["depth"] = args.depth
    return kwargs


def create_model(args, num_classes: int, pretrained: bool = False) -> VisionTransformer:
    if not timm.is_model(args.model):
        raise SystemExit(f"--model: Unknown model {args.model!r} (timm.list_models('vit_*') lists the ViTs)")
    try:
        model = timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, **model_kwargs(args))
    except TypeError as e:  # a model family that does not take img_size / patch_size / depth
        raise SystemExit(f"--model {args.model}: expected a timm VisionTransformer ({e})") from None
    if not isinstance(model, VisionTransformer):
        raise SystemExit(f"--model {args.model}: expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "cls_token", None) is None:
        raise SystemExit(f"--model {args.model}: ALaST needs a class token and this model has none")
    return model


def load_backbone(model: torch.nn.Module, state: Dict[str, torch.Tensor], origin: str) -> None:
    """Load every weight of ``state`` except the classifier head into ``model``; complain about the rest."""
    head = model.get_classifier()
    head_keys = {k for k in model.state_dict() if k.startswith("head.")} if head is not None else set()
    body = {k: v for k, v in state.items() if k not in head_keys}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise SystemExit(f"{origin}: does not fit --model {model.default_cfg.get('architecture', '?')} with "
                         f"{model_kwargs_text(model)}: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(--depth 0 keeps the model's own depth)")


def model_kwargs_text(model) -> str:
    (h, w), (ph, pw) = model.patch_embed.img_size, model.patch_embed.patch_size
    return f"{h}x{w} input, {ph}x{pw} patches, depth {len(model.blocks)}"


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code, ... all mean the same to the user
        raise SystemExit(f"--checkpoint {path}: cannot read it as a PyTorch state_dict ({e})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"--checkpoint {path}: expected a state_dict (name -> tensor)")
    return state


def pretrain_cache_path(args) -> str:
    key = {"model": args.model, **model_kwargs(args), "steps": args.pretrain_steps, "batch": args.batch_size,
           "seed": args.seed, "version": PRETRAIN_VERSION}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.cache_dir, f"pretrain-digits0-4-{args.model}-{digest}.pt")


def pretrain(args, device: torch.device, show: bool) -> Dict:
    """The job's own starting weights: the same ViT trained from scratch on digits 0–4 (a different task)."""
    train_set, test_set = digit_tasks(args.img_size, seed=args.seed, grid=args.patch_size)["pretrain"]
    torch.manual_seed(args.seed)
    model = create_model(args, train_set.num_classes).to(device)
    run = train(model, None, train_set, args, steps=args.pretrain_steps, lr=2e-3, seed=args.seed + 1000,
                device=device, desc="pretrain on digits 0-4", show=show)
    accuracy = evaluate(model, test_set, device)
    return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "accuracy": accuracy,
            "train_seconds": run["train_seconds"]}


def starting_weights(args, model: torch.nn.Module, device: torch.device, show: bool) -> Dict:
    """Fill ``model``'s backbone with the starting weights; returns where they came from."""
    if args.checkpoint:
        load_backbone(model, read_checkpoint(args.checkpoint), f"--checkpoint {args.checkpoint}")
        return {"source": "checkpoint", "path": os.path.abspath(args.checkpoint),
                "text": f"loaded from --checkpoint {args.checkpoint}"}
    if args.pretrained:
        try:
            hub = create_model(args, num_classes=0, pretrained=True)
        except SystemExit:
            raise
        except Exception as e:  # network errors come as many different types
            raise SystemExit(f"--pretrained: could not get timm's hub weights for {args.model} ({type(e).__name__}: "
                             f"{e}). They are downloaded from the Hugging Face hub; without network access give "
                             "--checkpoint PATH, or leave both out to use the job's own digits 0-4 pretraining."
                             ) from None
        load_backbone(model, hub.state_dict(), f"timm hub weights of {args.model}")
        tag = hub.pretrained_cfg.get("hf_hub_id") or hub.pretrained_cfg.get("tag") or args.model
        return {"source": "timm_hub", "path": tag, "text": f"timm hub weights ({tag})"}
    path = pretrain_cache_path(args)
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        load_backbone(model, saved["state_dict"], f"cached weights {path}")
        return {"source": "cache", "path": path, "pretrain_accuracy": float(saved["accuracy"]),
                "text": f"loaded from cache {path} (pretrained by this job on digits 0-4, held-out accuracy "
                        f"{100 * float(saved['accuracy']):.1f}%)"}
    made = pretrain(args, device, show)
    os.makedirs(args.cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state_dict": made["state_dict"], "accuracy": torch.tensor(made["accuracy"])}, tmp)
    os.replace(tmp, path)
    load_backbone(model, made["state_dict"], "the job's pretraining")
    return {"source": "trained_now", "path": path, "pretrain_accuracy": made["accuracy"],
            "pretrain_seconds": made["train_seconds"],
            "text": f"trained now on digits 0-4 ({args.pretrain_steps} steps, {made['train_seconds']:.1f} s, held-out "
                    f"accuracy {100 * made['accuracy']:.1f}%), cached at {path}"}


# ------------------------------------------------------------------------------------------ training
def lr_factor(step: int, steps: int) -> float:
    """5% linear warm-up, then cosine decay to 0."""
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorImages, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``data`` in eval mode (every token and every layer)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(data)


def measure_step(model, alast, x, y, device: torch.device) -> Dict:
    """FLOPs and activation memory of one training step on ``(x, y)``, leaving model and controller as they were."""

    def in_step(fn):
        if alast is None:
            return fn()
        with alast.step(update=False):  # this step's plan, without recording or updating the budgets
            return fn()

    def forward_backward():
        F.cross_entropy(model(x), y).backward()

    flops = in_step(lambda: count_flops(forward_backward))
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        memory = in_step(lambda: peak_cuda_memory(forward_backward, device))
    else:
        memory = in_step(lambda: saved_activation_bytes(lambda: F.cross_entropy(model(x), y), model.parameters()))
    model.zero_grad(set_to_none=True)
    return {"flops": flops, "activation_bytes": memory}


def train(model, alast, source, args, steps: int, lr: float, seed: int, device: torch.device, desc: str,
          show: bool, probes: int = 0) -> Dict:
    """``steps`` AdamW steps on batches of ``source``; with ``alast`` each step runs inside ``alast.step()``."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    probe_steps = {round(i * (steps - 1) / max(1, probes - 1)) for i in range(probes)} if probes else set()
    step_seconds, losses, measured = [], [], []
    bar = tqdm(batches(source, args.batch_size, steps, seed), total=steps, desc=desc, disable=not show,
               leave=True, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step in probe_steps:
            measured.append({"step": step, **measure_step(model, alast, x, y, device)})
        _sync(device)
        start = time.perf_counter()
        with alast.step() if alast is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    return {"train_seconds": sum(step_seconds), "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
            "losses": losses, "probes": measured}


def fine_tune(kind: str, start: torch.nn.Module, train_set, test_set, args, device: torch.device,
              show: bool) -> Dict:
    """One fine-tuning run (``kind`` ``"full"`` or ``"alast"``) from a copy of ``start``."""
    model = copy.deepcopy(start)
    alast = None
    if kind == "alast":
        depth = len(model.blocks)
        fixed = {}
        if args.policy == "fixed":
            train_layers = args.train_layers or math.ceil(0.75 * depth)
            fixed = {"keep_ratios": [args.token_budget] * depth,
                     "train": [layer >= depth - train_layers for layer in range(depth)]}
        alast = ak.ALaST(ak.convert(model), token_budget=args.token_budget, train_layers=args.train_layers,
                         policy=args.policy, min_keep=args.min_keep, seed=args.seed, **fixed)
    torch.manual_seed(args.seed)
    run = train(model, alast, train_set, args, steps=args.steps, lr=args.lr, seed=args.seed, device=device,
                desc=f"fine-tune: {'full' if kind == 'full' else 'ALaST'}", show=show, probes=args.probes)
    probes = run.pop("probes")
    result = {
        "accuracy": evaluate(model, test_set, device),
        "final_loss": sum(run["losses"][-10:]) / len(run["losses"][-10:]),
        **run,
        "flops_per_step_probes": [p["flops"] for p in probes],
        "train_flops": sum(p["flops"] for p in probes) / len(probes) * args.steps,
        "peak_activation_bytes": max(p["activation_bytes"] for p in probes),
        "activation_bytes_probes": [p["activation_bytes"] for p in probes],
        "probe_steps": [p["step"] for p in probes],
        "memory_kind": "cuda_peak" if device.type == "cuda" else "saved_for_backward",
        "controller_overhead_seconds": alast.overhead_seconds if alast is not None else 0.0,
    }
    if alast is not None:
        last = alast.history[-1]
        result.update({
            "final_keep_ratios": last["keep_ratio"], "final_keep_tokens": last["keep"],
            "final_trained_layers": [i for i, t in enumerate(last["train"]) if t],
            "final_budgets": last["budget"], "history": alast.history,
        })
    return result


# ------------------------------------------------------------------------------------------------ main
def _machine(device: torch.device) -> Dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "timm": timm.__version__, "alast_kernels": ak.__version__,
            "python": platform.python_version(), "commit": commit}


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the job with command-line ``argv``; returns the record it writes to ``results.json``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    try:
        return run_job(args)
    finally:
        torch.set_num_threads(threads)  # main() called from Python (tests) leaves the caller's setting


def run_job(args: argparse.Namespace) -> Dict:
    job_start = time.perf_counter()
    device = torch.device(args.device)
    show = not args.quiet

    if args.data:
        train_set, test_set, classes = load_image_folder(args.data, args.img_size, args.seed)
        data_text = f"ImageFolder {args.data}: {len(classes)} classes, {len(train_set)} train / {len(test_set)} held-out images"
    else:
        train_set, test_set = digit_tasks(args.img_size, seed=args.seed, grid=args.patch_size)["finetune"]
        classes = [str(d) for d in range(5, 10)]
        data_text = (f"embedded digits 5-9 (scikit-learn) on a {args.img_size}x{args.img_size} canvas: "
                     f"{len(train_set)} train / {len(test_set)} held-out images")

    torch.manual_seed(args.seed)
    start = create_model(args, len(classes))
    depth = len(start.blocks)
    if args.train_layers is not None and args.train_layers > depth:
        raise SystemExit(f"--train-layers: expected at most the model's depth {depth}, got {args.train_layers}")
    num_patches = start.patch_embed.num_patches
    print(f"data:     {data_text}")
    print(f"model:    {args.model} ({model_kwargs_text(start)}, {num_patches} patches, "
          f"{sum(p.numel() for p in start.parameters()) / 1e6:.2f} M parameters) on {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    weights = starting_weights(args, start, device, show)
    torch.manual_seed(args.seed)
    start.reset_classifier(len(classes))  # a new, seeded head for the new task
    start.to(device)
    print(f"weights:  {weights.pop('text')}")
    print(f"training: {args.steps} steps x batch {args.batch_size}, AdamW lr {args.lr:g} (warm-up + cosine), "
          f"same batches for both runs; ALaST policy {args.policy!r}, token budget {args.token_budget:g}, "
          f"train layers {args.train_layers or math.ceil(0.75 * depth)} of {depth}")

    runs = {kind: fine_tune(kind, start, train_set, test_set, args, device, show) for kind in ("full", "alast")}
    full, alast = runs["full"], runs["alast"]

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "budgets.png")
    plot_budgets(alast["history"], png, f"ALaST on {args.model} ({args.policy} policy, token budget "
                 f"{args.token_budget:g}): per-layer plan over {args.steps} steps")
    print()
    print(comparison_table(full, alast))
    print(f"\nFLOPs: forward+backward matmuls and attention (torch.utils.flop_counter), mean of "
          f"{len(full['probe_steps'])} measured steps x {args.steps} steps; memory: max over the same steps.")
    print("\nALaST's last plan per layer:")
    print(layer_table(alast["final_keep_ratios"], alast["final_keep_tokens"],
                      [i in alast["final_trained_layers"] for i in range(depth)], alast["final_budgets"]))
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "args": vars(args),
        "data": {"text": data_text, "classes": classes, "train_size": len(train_set), "test_size": len(test_set),
                 "num_patches": num_patches},
        "start_weights": weights,
        "runs": runs,
        "ratios": {"flops": alast["train_flops"] / full["train_flops"],
                   "activation_bytes": alast["peak_activation_bytes"] / full["peak_activation_bytes"],
                   "train_seconds": alast["train_seconds"] / full["train_seconds"]},
        "job_seconds": time.perf_counter() - job_start,
    }
    json_path = os.path.join(args.out, "results.json")
    write_json(record, json_path)
    print(f"\nwrote {json_path} and {png}; whole job {record['job_seconds']:.1f} s")
    return record


if __name__ == "__main__":
    main()
