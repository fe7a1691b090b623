"""Output of the fine-tuning job: the side-by-side table, the budget heat map (PNG) and the JSON record."""
from __future__ import annotations

import json
import os
from typing import Dict, List

__all__ = ["comparison_table", "layer_table", "plot_budgets", "write_json"]


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def comparison_table(full: Dict, alast: Dict) -> str:
    """The two runs side by side, with ALaST's ratio to full fine-tuning where a ratio means something."""
    memory_label = {"saved_for_backward": "peak activation memory (saved for backward)",
                    "cuda_peak": "peak activation memory (CUDA peak rise)"}[full["memory_kind"]]
    rows = [
        ("held-out accuracy", f"{100 * full['accuracy']:.1f}%", f"{100 * alast['accuracy']:.1f}%",
         f"{100 * (alast['accuracy'] - full['accuracy']):+.1f} pt"),
        ("final training loss", f"{full['final_loss']:.3f}", f"{alast['final_loss']:.3f}", ""),
        ("train wall time (steps only)", f"{full['train_seconds']:.1f} s", f"{alast['train_seconds']:.1f} s",
         f"{alast['train_seconds'] / full['train_seconds']:.2f}x"),
        ("median step time", f"{1e3 * full['median_step_seconds']:.0f} ms",
         f"{1e3 * alast['median_step_seconds']:.0f} ms",
         f"{alast['median_step_seconds'] / full['median_step_seconds']:.2f}x"),
        ("training FLOPs (fwd+bwd, total)", _si(full["train_flops"], "FLOP"), _si(alast["train_flops"], "FLOP"),
         f"{alast['train_flops'] / full['train_flops']:.2f}x"),
        (memory_label, _mib(full["peak_activation_bytes"]), _mib(alast["peak_activation_bytes"]),
         f"{alast['peak_activation_bytes'] / full['peak_activation_bytes']:.2f}x"),
        ("ALaST controller overhead", "", f"{1e3 * alast['controller_overhead_seconds']:.0f} ms",
         f"{100 * alast['controller_overhead_seconds'] / alast['train_seconds']:.1f}% of train time"),
    ]
    header = ("", "full fine-tuning", "ALaST", "ALaST / full")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def layer_table(keep_ratios: List[float], keep: List[int], train: List[bool], budgets: List[float]) -> str:
    """ALaST's last plan per layer: budget, keep ratio, kept patch tokens, whether the layer trained."""
    cells = [
        ["layer"] + [str(i) for i in range(len(keep))],
        ["budget"] + [f"{b:.2f}" for b in budgets],
        ["keep ratio"] + [f"{r:.2f}" for r in keep_ratios],
        ["kept tokens"] + [str(k) for k in keep],
        ["trained"] + ["yes" if t else "-" for t in train],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def plot_budgets(history: List[Dict], path: str, title: str) -> None:
    """Heat maps (layer × step) of ALaST's budgets, keep ratios and trained layers, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from matplotlib.colors import ListedColormap, LogNorm, Normalize

    steps = [h["step"] for h in history]
    budgets = np.array([h["budget"] for h in history]).T
    # Budgets of the "alast" policy span orders of magnitude (one layer can take most of L), so a log
    # scale shows the small ones too; "paper" budgets can reach 0 and stay linear in [0, 1].
    budget_norm = LogNorm(budgets.min(), budgets.max()) if budgets.min() > 0 else Normalize(0, max(1, budgets.max()))
    panels = [
        ("budget b (before the step's update)", budgets, "viridis", budget_norm),
        ("keep ratio r (fraction of patch tokens processed)", np.array([h["keep_ratio"] for h in history]).T,
         "magma", Normalize(0, 1)),
        ("trained or frozen", np.array([h["train"] for h in history], dtype=float).T,
         ListedColormap(["#d9d9d9", "#1f4e9c"]), Normalize(0, 1)),
    ]
    num_layers = budgets.shape[0]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 1.9 * len(panels)), sharex=True,
                             constrained_layout=True)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, num_layers - 0.5, -0.5)
    for ax, (label, values, cmap, norm) in zip(axes, panels):
        image = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, extent=extent, interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_yticks(range(num_layers))
        ax.set_title(label, fontsize=10)
        bar = fig.colorbar(image, ax=ax, label=label.split(" (")[0])
        if label == "trained or frozen":
            bar.set_ticks([0.25, 0.75], labels=["frozen", "trained"])
    axes[-1].set_xlabel("training step")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(record: Dict, path: str) -> None:
    """Write ``record`` to ``path`` atomically (a crash leaves the old file, never half a new one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
