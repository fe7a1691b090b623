"""Fine-tune a timm Vision Transformer with several methods from the same weights and compare them.

Run with no arguments (``make demo``) it needs no download: it fine-tunes a small ViT
(``vit_tiny_patch16_224`` with 48×48 inputs, 8×8 patches and 6 blocks) on scikit-learn's bundled handwritten
digits 5–9 pasted on a mostly empty canvas, starting from weights the job trains itself on digits 0–4 (once;
cached), with each method of ``--methods`` (default: full fine-tuning, ALaST, Sparse-Tuning, LoRA, SynQT,
LoSA — those this install has). Every method gets the same batches and the same AdamW schedule; methods
that train the backbone use ``--lr``, the others (adapters, queries, side networks, heads) ``--adapter-lr``.

It prints one table (held-out accuracy, train wall time, median step, training FLOPs, peak activation
memory, trainable parameters, inference FLOPs and time per image), ALaST's last per-layer plan, and writes
``results.json``, ``pareto.png`` (accuracy against train time and against memory, one point per method)
and ``budgets.png`` (ALaST's layer × step heat maps) to ``--out``; each finished run is written there at once, and
``--resume`` continues an interrupted job (see :mod:`job_output`). ``--seeds N`` repeats everything with N
seeds and reports mean ± standard deviation; ``--equal-time`` also trains every method for as many steps
as fit in full fine-tuning's wall time. Under ``torchrun --nproc-per-node K`` the ranks share each batch
(DistributedDataParallel, gloo on the CPU); rank 0 prints and writes. See :mod:`training` for how costs
are measured.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Dict, List, Optional

import timm
import torch
import torch.distributed as dist

import alast_kernels as ak
from alast_kernels.controller import default_train_layers

from .digits_canvas import DigitCanvas, TensorImages, digit_tasks
from . import real_backbone
from .job_output import JobOutput, job_settings, state_digest
from .report import layer_table, method_table, plot_budgets, plot_pareto, write_json
from .starting_weights import DEFAULT_CACHE, create_model, model_kwargs_text
from .training import cached_epochs, evaluate, inference_cost, train

# The default comparison, in this order; methods this install lacks are left out with a note.
DEFAULT_METHODS = ("full", "alast", "sparse_tuning", "lora", "synqt", "losa")
ALAST_METHODS = ("alast", "alast+lora")
CACHE_METHODS = ("synqt", "losa")  # methods with a feature cache


TEST_VIEWS = 4  # positions each held-out digit is rendered at
PRETRAIN_STEPS = 400
STEPS = 300
ADAPTER_LR = 5e-3
TOKEN_BUDGET = 0.5
POLICIES_WITHOUT_TOKEN_BUDGET = ("paper",)  # its budgets adapt in [0.5, 1] by themselves


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
        description="Fine-tune a timm ViT with several methods from the same weights; print and save the "
                    "comparison.",
        formatter_class=_HelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods to compare, or 'all' (alast_kernels.methods.available())")
    p.add_argument("--seeds", type=_positive, default=1,
                   help="repeat every run with seeds --seed, --seed+1, ...; the table shows mean ± std")
    p.add_argument("--equal-time", action="store_true",
                   help="also train each method for as many steps as fit in full fine-tuning's wall time")
    p.add_argument("--feature-cache", type=_positive, default=None, metavar="MIB",
                   help="also measure the frozen-backbone methods' feature cache (at most MIB MiB): two epochs "
                        "over the training images rendered once (no augmentation), the first filling the cache")
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR",
                      help="ImageFolder data (DIR/<class>/<image>, or DIR/train and DIR/val|test); held in "
                           "memory, resized to --img-size. Default: the embedded digits 5-9 on a canvas")
    data.add_argument("--seed", type=int, default=0,
                      help="first seed: data order, splits, head and the methods' own randomness")
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
    model.add_argument("--pretrain-steps", type=_positive, default=PRETRAIN_STEPS,
                       help="steps of the job's own pretraining on digits 0-4 (used without --pretrained "
                            "or --checkpoint; the result is cached)")
    model.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the job's pretrained weights are cached")
    real_backbone.add_options(model, data)
    train_ = p.add_argument_group("fine-tuning")
    train_.add_argument("--steps", type=_positive, default=STEPS, help="training steps of each run")
    train_.add_argument("--batch-size", type=_positive, default=32, help="images per training step")
    train_.add_argument("--lr", type=_positive_float, default=1e-3,
                        help="AdamW peak learning rate of methods that train the backbone (5%% linear warm-up, "
                             "cosine decay)")
    train_.add_argument("--head-lr", type=_positive_float, default=None,
                        help="AdamW peak learning rate of the new classifier of methods that train the backbone "
                             "(default: --lr, as the rest of the model)")
    train_.add_argument("--adapter-lr", type=_positive_float, default=ADAPTER_LR,
                        help="AdamW peak learning rate of methods that keep the backbone frozen")
    train_.add_argument("--weight-decay", type=_non_negative_float, default=0.05, help="AdamW weight decay")
    train_.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    train_.add_argument("--threads", type=_positive, default=None,
                        help="CPU threads for torch (default: the CPUs this process may use, shared by the ranks)")
    alast = p.add_argument_group("ALaST (methods alast and alast+lora)")
    alast.add_argument("--policy", choices=("alast", "paper", "fixed"), default="alast",
                       help="budget policy; 'fixed' keeps --token-budget in every layer and trains the "
                            "--train-layers deepest ones")
    alast.add_argument("--token-budget", type=_fraction("token_budget"), default=None,
                       help=f"mean fraction of patch tokens the blocks process, in (0, 1] (default: {TOKEN_BUDGET:g}); "
                            "not with --policy paper, which ignores it")
    alast.add_argument("--flop-budget", type=_fraction("flop_budget"), default=None,
                       help="policy 'alast', instead of --token-budget: each step's forward+backward FLOPs as a "
                            "fraction of full fine-tuning's, in (0, 1]")
    alast.add_argument("--tokens", choices=("carry", "drop"), default=None,
                       help="unkept tokens pass through a block ('carry') or are dropped for every later block "
                            "('drop'); default: 'drop' ('carry' for --policy fixed)")
    alast.add_argument("--train-layers", type=_positive, default=None,
                       help="blocks trained per step (default: ceil(0.75 * depth))")
    alast.add_argument("--min-keep", type=_fraction("min_keep"), default=0.2,
                       help="lowest keep ratio of a block, at most --token-budget")
    alast.add_argument("--sample", action="store_true",
                       help="policy 'alast': draw the trained blocks with probability proportional to their "
                            "budgets (seeded) instead of taking the highest budgets")
    alast.add_argument("--freeze-embeddings", action="store_true",
                       help="method alast: keep the patch/position embeddings and class token frozen (blocks below "
                            "the lowest trained one then run without a graph); by default they train, as in full "
                            "fine-tuning")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=os.path.join("runs", "finetune"),
                     help="output directory, checked (created, writable) before anything runs; each finished run is "
                          "written there at once. A new job refuses a non-empty --out (nothing is replaced or left "
                          "stale): give a new one, or --resume")
    out.add_argument("--resume", action="store_true",
                     help="continue the job in --out: same settings (any difference is refused, named), the runs "
                          "already written are kept and skipped")
    out.add_argument("--probes", type=_positive, default=5, help="measured steps per run (FLOPs and memory)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    available = ak.methods.available()
    if args.methods.strip() == "all":
        args.methods = available
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        explicit = args.methods != parser.get_default("methods")
        unknown = [n for n in names if n not in available]
        if explicit and unknown:
            parser.error(f"--methods: unknown method(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(available)} or 'all'")
        if len(set(names)) != len(names):
            parser.error(f"--methods: a method is named twice in {args.methods!r}")
        args.methods = [n for n in names if n in available]
        if not args.methods:
            parser.error("--methods: expected at least one method")
    real_backbone.resolve(args, parser)
    if args.flop_budget is not None and (args.policy != "alast" or args.token_budget is not None):
        parser.error("--flop-budget: only with --policy alast and without --token-budget (it replaces the token "
                     "budget)")
    if args.sample and args.policy != "alast":
        parser.error(f"--sample: only with --policy alast ('paper' always samples, 'fixed' trains the blocks it is "
                     f"given), got --policy {args.policy}")
    if args.policy in POLICIES_WITHOUT_TOKEN_BUDGET:
        if args.token_budget is not None:
            parser.error(f"--token-budget: --policy {args.policy} ignores it (its budgets adapt by themselves); "
                         "leave --token-budget out, or use --policy alast or fixed")
    elif args.token_budget is None and args.flop_budget is None:
        args.token_budget = TOKEN_BUDGET
    if args.policy == "alast" and args.token_budget is not None and args.min_keep > args.token_budget:
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
        images = []
        for i, (file, _) in enumerate(ds.samples):
            try:
                images.append(ds[i][0])
            # PIL's errors for a broken file: UnidentifiedImageError (an OSError), OSError for a truncated one,
            # SyntaxError from some format parsers, ValueError for bad header values.
            except (OSError, SyntaxError, ValueError) as e:
                raise SystemExit(f"--data {root}: cannot read the image {file} ({type(e).__name__}: {e})") from None
        return torch.stack(images), torch.tensor(ds.targets, dtype=torch.int64), ds.classes

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


# ------------------------------------------------------------------------------------------- methods
def method_options(name: str, args, depth: int, seed: int, steps: int) -> Dict:
    """The job's options of method ``name``: ALaST's from the command line; the others' run-dependent ones
    from the method itself (``run_options``: EViT's schedule scaled to the run), else their defaults."""
    if name not in ALAST_METHODS:
        return ak.methods.method_class(name).run_options(steps)
    options = {"train_layers": args.train_layers, "policy": args.policy, "seed": seed, "tokens": args.tokens}
    if args.policy == "alast":
        options["min_keep"] = args.min_keep
        if args.flop_budget is not None:
            options["flop_budget"] = args.flop_budget
        else:
            options["token_budget"] = args.token_budget
    elif args.policy == "paper":
        # The authors update the budgets at the optimizer's (peak) learning rate: the adapters' for alast+lora.
        options["alpha"] = args.adapter_lr if name == "alast+lora" else args.lr
    if args.sample:
        options["sample"] = True
    if args.freeze_embeddings:
        options["train_embeddings"] = False
    if args.policy == "fixed":
        trained = args.train_layers or default_train_layers(depth)
        options.update(keep_ratios=[args.token_budget] * depth, train=[l >= depth - trained for l in range(depth)])
    return options


def fine_tune(name: str, start: torch.nn.Module, train_set, test_set, args, device: torch.device, seed: int,
              steps: int, show: bool, probes: int, rank: int = 0, world: int = 1,
              extra_options: Optional[Dict] = None) -> Dict:
    """One run of method ``name`` from a copy of ``start``: training, accuracy, costs. ``extra_options``
    override the method's options from the command line (the study's compute levels)."""
    torch.manual_seed(seed)
    options = {**method_options(name, args, len(start.blocks), seed, steps), **(extra_options or {})}
    method = ak.methods.create(name, copy.deepcopy(start), **options)
    model = method.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(method.model, find_unused_parameters=True)
    lr = args.lr if method.trains_backbone else args.adapter_lr
    run = train(method, train_set, steps=steps, batch_size=args.batch_size, lr=lr,
                weight_decay=args.weight_decay, seed=seed, device=device, desc=f"{name} (seed {seed})",
                show=show, probes=probes, model=model, rank=rank, world=world,
                head_lr=args.head_lr if method.trains_backbone else None)
    probes_done = run.pop("probes")
    result = {"accuracy": evaluate(method.model, test_set, device), "lr": lr,
              "head_lr": args.head_lr if method.trains_backbone else None, "steps": steps,
              "final_loss": sum(run["losses"][-10:]) / len(run["losses"][-10:]), **run,
              "trainable_parameters": method.num_trainable()}
    if probes_done:
        result.update({
            "probe_steps": [p["step"] for p in probes_done],
            "flops_per_step_probes": [p["flops"] for p in probes_done],
            "train_flops": sum(p["flops"] for p in probes_done) / len(probes_done) * steps,
            "activation_bytes_probes": [p["activation_bytes"] for p in probes_done],
            "peak_activation_bytes": max(p["activation_bytes"] for p in probes_done),
            "memory_kind": "cuda_peak" if device.type == "cuda" else "saved_for_backward",
            **{f"inference_{k}": v for k, v in inference_cost(method.model, test_set, device).items()},
        })
    controller = getattr(method, "controller", None)
    if controller is not None:
        last = controller.history[-1]
        result.update({
            "controller_overhead_seconds": controller.overhead_seconds, "history": controller.history,
            "final_keep_ratios": last["keep_ratio"], "final_keep_tokens": last["keep"],
            "final_trained_layers": [i for i, t in enumerate(last["train"]) if t], "final_budgets": last["budget"],
        })
    return result


def summarise(runs: List[Dict]) -> Dict:
    """Mean, standard deviation (0 for one run), min and max over seeds of every number the runs share."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {}
    for k in keys:
        values = [float(r[k]) for r in runs if k in r]
        out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values)}
    return out


ALAST_TARGET = (2.0, 0.6)  # ALaST's held-out accuracy within 2 points of full fine-tuning at <= 0.6x its FLOPs


def alast_target(summary: Dict) -> Dict:
    """ALaST's mean accuracy minus full fine-tuning's (points) and its FLOP ratio, against ``ALAST_TARGET``."""
    gap = 100 * (summary["alast"]["accuracy"]["mean"] - summary["full"]["accuracy"]["mean"])
    flops = summary["alast"]["train_flops"]["mean"] / summary["full"]["train_flops"]["mean"]
    points, ratio = ALAST_TARGET
    return {"accuracy_gap_points": gap, "flops_ratio": flops, "target_points": points, "target_flops_ratio": ratio,
            "met": gap >= -points and flops <= ratio}


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
    """Run the job with command-line ``argv``; returns the record it writes to ``results.json`` (rank 0)."""
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // world))
    started_dist = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
        started_dist = True
    try:
        return run_job(args, rank=dist.get_rank() if world > 1 else 0, world=world)
    finally:
        torch.set_num_threads(threads)  # main() called from Python (tests) leaves the caller's setting
        if started_dist:
            dist.destroy_process_group()


def _from_rank0(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (DDP ranks must run the same number of steps, or they hang); the
    tensor is on the ranks' device, as nccl needs."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def load_data(args):
    if args.data:
        train_set, test_set, classes = load_image_folder(args.data, args.img_size, args.seed)
        text = (f"ImageFolder {args.data}: {len(classes)} classes, "
                f"{len(train_set)} train / {len(test_set)} held-out images")
    elif args.task == "clutter":
        train_set, test_set, classes, text = real_backbone.load_task(args)
    else:
        train_set, test_set = digit_tasks(args.img_size, seed=args.seed, grid=args.patch_size,
                                          test_views=TEST_VIEWS)["finetune"]
        classes = [str(d) for d in range(5, 10)]
        text = (f"embedded digits 5-9 (scikit-learn) on a {args.img_size}x{args.img_size} canvas: "
                f"{len(train_set)} train / {len(test_set) // TEST_VIEWS} held-out images, each held-out digit at "
                f"{TEST_VIEWS} positions")
    return train_set, test_set, classes, text


def run_job(args: argparse.Namespace, rank: int = 0, world: int = 1) -> Dict:
    job_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    main_rank = rank == 0
    show = not args.quiet and main_rank
    say = print if main_rank else (lambda *a, **k: None)

    # --out first: a path that cannot take the results, or a job there that is not this one, stops the job
    # before it loads or trains anything.
    settings = job_settings(args, world)
    out = JobOutput(args.out, settings, args.resume) if main_rank else None
    if world > 1:
        dist.barrier()  # rank 0 has checked (and maybe created) --out before the others read it
        if not main_rank:
            out = JobOutput(args.out, settings, args.resume, validate=False)
    seeds = list(range(args.seed, args.seed + args.seeds))
    done = out.finished([(name, seed) for seed in seeds for name in args.methods]) if args.resume else {}

    train_set, test_set, classes, data_text = load_data(args)
    torch.manual_seed(args.seed)
    start = create_model(args, len(classes))
    depth = len(start.blocks)
    if args.train_layers is not None and args.train_layers > depth:
        raise SystemExit(f"--train-layers: expected at most the model's depth {depth}, got {args.train_layers}")
    num_patches = start.patch_embed.num_patches
    say(f"data:     {data_text}")
    say(f"model:    {args.model} ({model_kwargs_text(start)}, {num_patches} patches, "
        f"{sum(p.numel() for p in start.parameters()) / 1e6:.2f} M parameters) on {device}, "
        f"{torch.get_num_threads()} threads" + (f" x {world} ranks" if world > 1 else ""), flush=True)
    if main_rank:
        weights = real_backbone.load_start(args, start, device, show)
    if world > 1:
        dist.barrier()  # rank 0 pretrained and cached; the others load the cache
        if not main_rank:
            weights = real_backbone.load_start(args, start, device, show)
    say(f"weights:  {weights.pop('text')}")
    if main_rank:
        out.check_start_weights(state_digest(start))
    skipped = [m for m in DEFAULT_METHODS if m not in ak.methods.available()]
    say(f"methods:  {', '.join(args.methods)}" + (f" (not in this install: {', '.join(skipped)})" if skipped else ""))
    head = f", its new head {args.head_lr:g}" if args.head_lr else ""
    say(f"training: {args.steps} steps x batch {args.batch_size}, AdamW (warm-up + cosine), lr {args.lr:g} "
        f"(backbone{head}) / {args.adapter_lr:g} (frozen-backbone methods), same batches for every method; "
        + (f"seeds {args.seed}..{args.seed + args.seeds - 1}" if args.seeds > 1 else f"seed {args.seed}"), flush=True)

    if args.resume:
        say(f"resumed:  {len(done)} of {len(seeds) * len(args.methods)} runs already in {out.runs_dir}, kept")
    equal_time = args.equal_time and "full" in args.methods
    # Under --equal-time full fine-tuning goes first in each seed: its wall time sets the others' steps, so each
    # run is written with its equal-time rerun. The order changes no result: every run starts from its own
    # seed and a copy of the seed's starting model.
    order = sorted(args.methods, key=lambda n: n != "full") if equal_time else args.methods
    runs: Dict[str, List[Dict]] = {name: [] for name in args.methods}
    for seed in seeds:
        torch.manual_seed(seed)
        head_start = copy.deepcopy(start)
        head_start.reset_classifier(len(classes))  # a new, seeded head for the new task
        head_start.to(device)
        for name in order:
            run = done.get((name, seed))
            if run is None:
                run = fine_tune(name, head_start, train_set, test_set, args, device, seed, args.steps, show,
                                args.probes, rank, world)
                if equal_time and name == "full":
                    run["equal_time"] = {"steps": args.steps, "accuracy": run["accuracy"],
                                         "train_seconds": run["train_seconds"]}
                elif equal_time:
                    steps = max(1, round(args.steps * runs["full"][-1]["train_seconds"] / run["train_seconds"]))
                    if world > 1:  # wall times differ between ranks: every rank must train rank 0's count
                        steps = _from_rank0(steps, device)
                    again = fine_tune(name, head_start, train_set, test_set, args, device, seed, steps, show, 0,
                                      rank, world)
                    run["equal_time"] = {"steps": steps, "accuracy": again["accuracy"],
                                         "train_seconds": again["train_seconds"]}
                if main_rank:
                    run = out.save_run(name, seed, run)
            runs[name].append(run)
    cache = {}
    if args.feature_cache and not isinstance(train_set, DigitCanvas):
        say("feature cache: measured on the embedded digits only (their training images can be rendered once)")
    elif args.feature_cache:
        fixed = train_set.fixed(args.seed + 7)  # every training digit once, at a fixed position
        for name in (n for n in CACHE_METHODS if n in args.methods):
            torch.manual_seed(args.seed)
            method = ak.methods.create(name, copy.deepcopy(head_start))
            try:
                cache[name] = cached_epochs(method, fixed, epochs=2, batch_size=args.batch_size, lr=args.adapter_lr,
                                            weight_decay=args.weight_decay, seed=args.seed, device=device,
                                            max_bytes=args.feature_cache * 2**20)
            except ValueError as e:  # the cache would not fit the limit given: the message has both sizes
                raise SystemExit(f"--feature-cache {args.feature_cache}: {e}") from None
    summary = {name: summarise(r) for name, r in runs.items()}
    for name, r in runs.items():
        if all("equal_time" in x for x in r):
            summary[name]["equal_time_accuracy"] = summarise([x["equal_time"] for x in r])["accuracy"]

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device), "world_size": world,
        "args": vars(args),
        "data": {"text": data_text, "classes": classes, "train_size": len(train_set), "test_size": len(test_set),
                 "num_patches": num_patches},
        "start_weights": weights, "methods": args.methods, "seeds": seeds,
        "runs": runs, "summary": summary, "feature_cache": cache,
    }
    if "full" in summary:
        full = summary["full"]
        record["ratios_to_full"] = {
            name: {k: s[k]["mean"] / full[k]["mean"] for k in ("train_flops", "peak_activation_bytes", "train_seconds",
                                                             "inference_flops_per_image") if k in s and full[k]["mean"]}
            for name, s in summary.items()}
        if "alast" in summary:
            record["alast_target"] = alast_target(summary)
    if not main_rank:
        return record

    say()
    say(method_table(summary, seeds=args.seeds, memory_kind=runs[args.methods[0]][0].get("memory_kind")))
    say(f"\nFLOPs: forward+backward matmuls and attention (torch.utils.flop_counter), mean of {args.probes} measured "
        f"steps x {args.steps} steps; memory: max over the same steps; inference on 64 held-out images.")
    if "alast_target" in record:
        t = record["alast_target"]
        say(f"\nALaST against full fine-tuning: {t['accuracy_gap_points']:+.1f} accuracy points (mean of {args.seeds} "
            f"seed(s)) at {t['flops_ratio']:.2f}x the training FLOPs; target within {ALAST_TARGET[0]:g} points at "
            f"<= {ALAST_TARGET[1]:g}x: {'met' if t['met'] else 'MISSED'}")
    for name, c in cache.items():
        say(f"{name} with its feature cache ({c['cache_bytes'] / 2**20:.1f} MiB, {len(train_set)} images rendered "
            f"once): epoch 1 {c['epoch_seconds'][0]:.1f} s (fills it), epoch 2 {c['epoch_seconds'][1]:.1f} s "
            f"-> {c['speedup_epoch2']:.1f}x")
    paths = [os.path.join(args.out, "pareto.png")]
    plot_pareto(summary, paths[0], f"{args.model} ({model_kwargs_text(start)}), {args.steps} steps, "
                f"{args.seeds} seed(s), {record['machine']['cpu'] or device}")
    for name in ALAST_METHODS:
        if name in runs:
            history = runs[name][0]["history"]
            path = os.path.join(args.out, "budgets.png" if name == "alast" else f"budgets-{name}.png")
            budget = "" if args.token_budget is None else f", token budget {args.token_budget:g}"
            plot_budgets(history, path, f"{name} on {args.model} ({args.policy} policy{budget}): per-layer plan "
                         f"over {args.steps} steps (seed {args.seed})")
            paths.append(path)
            last = runs[name][0]
            say(f"\n{name}'s last plan per layer (seed {args.seed}):")
            say(layer_table(last["final_keep_ratios"], last["final_keep_tokens"],
                            [i in last["final_trained_layers"] for i in range(depth)], last["final_budgets"]))
    record["job_seconds"] = time.perf_counter() - job_start
    json_path = os.path.join(args.out, "results.json")
    write_json(record, json_path)
    say(f"\nwrote {json_path}, {', '.join(paths)}; whole job {record['job_seconds']:.1f} s")
    return record


if __name__ == "__main__":
    main()
