"""The job's model and its starting weights: a timm ViT, filled from a checkpoint, timm's hub, or the job's
own pretraining on digits 0–4 (a different task from the fine-tuning one), trained once and cached."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Dict, Optional

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import alast_kernels as ak
from .digits_canvas import digit_tasks
from .report import atomic_path
from .training import evaluate, train

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alast_kernels")
PRETRAIN_VERSION = 2  # bump when the pretraining recipe changes, so old cached weights are not reused
PRETRAIN_LR = 2e-3

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
           "version": PRETRAIN_VERSION}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.cache_dir, f"pretrain-digits0-4-{args.model}-{digest}.pt")


def read_cache(path: str) -> Optional[Dict]:
    """The cached pretraining at ``path`` (``{"state_dict": name -> tensor, "accuracy": tensor}``), or None
    when there is none or it is unreadable; an unreadable one is named in a warning, and the caller rebuilds
    it (the cache is only a saving: the job can always pretrain again)."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict)
                and all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values())
                and isinstance(saved.get("accuracy"), torch.Tensor)):
            raise ValueError("expected {'state_dict': name -> tensor, 'accuracy': tensor}")
    # torch.load reports a damaged file in many types (UnpicklingError, RuntimeError from the zip reader,
    # EOFError, ...); each means the same here, and the message and type are passed on in the warning.
    except Exception as e:
        warnings.warn(f"cached starting weights {path} are unreadable ({type(e).__name__}: {e}); pretraining "
                      "again and replacing them", RuntimeWarning, stacklevel=2)
        return None
    return saved


def pretrain(args, device: torch.device, show: bool) -> Dict:
    """The job's own starting weights: the same ViT trained from scratch on digits 0–4 (a different task).

    Seeded with 0 whatever ``--seed`` is, so runs with different fine-tuning seeds start from the same
    weights (the seed varies the head, the batches and the methods' own randomness only)."""
    train_set, test_set = digit_tasks(args.img_size, seed=0, grid=args.patch_size)["pretrain"]
    torch.manual_seed(0)
    method = ak.methods.create("full", create_model(args, train_set.num_classes).to(device))
    run = train(method, train_set, steps=args.pretrain_steps, batch_size=args.batch_size, lr=PRETRAIN_LR,
                weight_decay=args.weight_decay, seed=1000, device=device, desc="pretrain on digits 0-4", show=show)
    model = method.model
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
    saved = read_cache(path)
    if saved is not None:
        load_backbone(model, saved["state_dict"], f"cached weights {path}")
        return {"source": "cache", "path": path, "pretrain_accuracy": float(saved["accuracy"]),
                "text": f"loaded from cache {path} (pretrained by this job on digits 0-4, held-out accuracy "
                        f"{100 * float(saved['accuracy']):.1f}%)"}
    made = pretrain(args, device, show)
    os.makedirs(args.cache_dir, exist_ok=True)
    with atomic_path(path) as tmp:  # another job reading the cache meanwhile sees no half-written file
        torch.save({"state_dict": made["state_dict"], "accuracy": torch.tensor(made["accuracy"])}, tmp)
    load_backbone(model, made["state_dict"], "the job's pretraining")
    return {"source": "trained_now", "path": path, "pretrain_accuracy": made["accuracy"],
            "pretrain_seconds": made["train_seconds"],
            "text": f"trained now on digits 0-4 ({args.pretrain_steps} steps, {made['train_seconds']:.1f} s, held-out "
                    f"accuracy {100 * made['accuracy']:.1f}%), cached at {path}"}


