"""Output of the fine-tuning job: the side-by-side table, the budget heat map (PNG) and the JSON record."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Dict, Iterator, List

__all__ = ["method_table", "layer_table", "plot_budgets", "plot_pareto", "write_json", "atomic_path"]


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def _table(header, rows) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


def method_table(summary: Dict[str, Dict], seeds: int, memory_kind: str = "saved_for_backward") -> str:
    """One row per method: means over seeds (± standard deviation with several), and ratios to ``full``."""
    full = summary.get("full")

    def cell(stats, key, fmt, ratio=False):
        if key not in stats:
            return "-"
        text = fmt(stats[key]["mean"])
        if seeds > 1 and key == "accuracy":
            text += f" ± {100 * stats[key]['std']:.1f}"
        if ratio and full is not None and key in full and full[key]["mean"]:
            text += f" ({stats[key]['mean'] / full[key]['mean']:.2f}x)"
        return text

    memory = {"saved_for_backward": "act. memory (saved)", "cuda_peak": "act. memory (CUDA peak)"}.get(
        memory_kind, "act. memory")
    header = ("method", "accuracy %", "train time", "median step", "train FLOPs", memory, "trainable",
              "infer FLOPs/img", "infer ms/img")
    rows = []
    for name, stats in summary.items():
        rows.append((
            name,
            cell(stats, "accuracy", lambda v: f"{100 * v:.1f}"),
            cell(stats, "train_seconds", lambda v: f"{v:.1f} s", ratio=True),
            cell(stats, "median_step_seconds", lambda v: f"{1e3 * v:.0f} ms"),
            cell(stats, "train_flops", lambda v: _si(v, "FLOP"), ratio=True),
            cell(stats, "peak_activation_bytes", _mib, ratio=True),
            cell(stats, "trainable_parameters", lambda v: _si(v, "").strip()),
            cell(stats, "inference_flops_per_image", lambda v: _si(v, "FLOP"), ratio=True),
            cell(stats, "inference_seconds_per_image", lambda v: f"{1e3 * v:.2f}"),
        ))
    table = _table(header, rows)
    if any("equal_time_accuracy" in s for s in summary.values()):
        eq = [(name, f"{100 * s['accuracy']['mean']:.1f}", f"{100 * s['equal_time_accuracy']['mean']:.1f}")
              for name, s in summary.items() if "equal_time_accuracy" in s]
        table += "\n\nEqual time (each method trains for full fine-tuning's wall time):\n" + _table(
            ("method", "accuracy %, equal steps", "accuracy %, equal time"), eq)
    return table


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_pareto(summary: Dict[str, Dict], path: str, title: str) -> None:
    """Held-out accuracy against train time and against peak activation memory, one point per method (mean
    over seeds, bars from min to max), the Pareto front joined; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_seconds", "train wall time (s)", 1.0), ("peak_activation_bytes", "peak activation memory (MiB)",
                                                                 2.0 ** -20)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for ax, (key, label, scale) in zip(axes, panels):
        points = []
        for i, (name, s) in enumerate(summary.items()):
            if key not in s:
                continue
            x, acc = s[key]["mean"] * scale, 100 * s["accuracy"]["mean"]
            xerr = [[x - s[key]["min"] * scale], [s[key]["max"] * scale - x]]
            yerr = [[acc - 100 * s["accuracy"]["min"]], [100 * s["accuracy"]["max"] - acc]]
            ax.errorbar(x, acc, xerr=xerr, yerr=yerr, fmt="o", color=colours(i % 10), capsize=3, ms=8)
            ax.annotate(name, (x, acc), textcoords="offset points", xytext=(6, 6), fontsize=9)
            points.append((x, acc))
        # The front: no other method is both cheaper and more accurate.
        front = sorted(p for p in points if not any(q[0] <= p[0] and q[1] > p[1] or q[0] < p[0] and q[1] >= p[1]
                                                    for q in points))
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", lw=1, label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary file name beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    The rename (``os.replace``, atomic within one file system, hence the same directory) means a reader or a
    job killed mid-write sees the old file or the whole new one, never half of one. On an error the temporary
    file is removed and the error propagates."""
    directory, name = os.path.split(os.path.abspath(path))
    # A name unique to this process and call (not mkstemp, whose file would keep mode 0600 after the rename).
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(record: Dict, path: str) -> None:
    """Write ``record`` to ``path`` atomically (a crash leaves the old file, never half a new one)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
