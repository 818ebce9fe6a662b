"""Benchmark figures (matplotlib, Agg backend: files only, no display needed).

* ``accuracy_per_round.png``: personalized (solid) and global (dashed) mean accuracy per evaluated round,
  one colour per run, read from each run's ``metrics.jsonl``;
* ``per_user_accuracy.png``: the distribution of per-user personalized accuracy per run (box plot, every
  user drawn as a dot), new users beside the training users where a run has them;
* ``accuracy_by_pairs.png``: personalized accuracy against the user's number of training pairs (binned,
  log scale): where federation helps;
* with a heterogeneous population (issue 25, ``population_plots``): ``accuracy_by_simulated_time.png``,
  personalized (solid) and global (dashed) mean accuracy against simulated hours, and
  ``accuracy_by_group.png``, personalized accuracy per group (device tier, availability quartile, privacy
  group, training-pair quartile; from each run's ``summary.json``), one bar per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    except FileNotFoundError:
        pass
    return rows


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy_curves(out: Path, runs: list[dict[str, Any]], x_key: str, x_scale: float, xlabel: str,
                     title: str, name: str, whole_x: bool) -> Path:
    """Mean personalized (solid) and global (dashed) accuracy of each run's evaluated rounds against
    ``row[x_key] / x_scale`` (rows without it skipped), one colour per run, saved as ``out / name``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        rows = [r for r in _read_rows(out / run["out"] / "metrics.jsonl")
                if r.get("personalized_accuracy_mean") is not None and r.get(x_key) is not None]
        if not rows:
            continue
        xs = [r[x_key] / x_scale for r in rows]
        colour = colours(i % 10)
        ax.plot(xs, [r["personalized_accuracy_mean"] for r in rows], "-o", ms=3, color=colour, label=run["run"])
        ax.plot(xs, [r["global_accuracy_mean"] for r in rows], "--", color=colour, alpha=0.6)
    ax.set_xlabel(xlabel)
    if whole_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers: no 2.5 tick
    ax.set_ylabel("mean held-out pairwise accuracy")
    ax.set_title(title)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / name)


def accuracy_per_round(out: Path, runs: list[dict[str, Any]]) -> Path:
    return _accuracy_curves(out, runs, "round", 1, "round", "personalized (solid) and global (dashed) accuracy per "
                            "round", "accuracy_per_round.png", whole_x=True)


def per_user_accuracy(out: Path, runs: list[dict[str, Any]]) -> Path:
    plt = _pyplot()
    labels, data, new_data = [], [], []
    for run in runs:
        per_user = _read_json(out / run["out"] / "per_user.json", [])
        if not per_user:
            continue
        labels.append(run["run"])
        data.append([e["personalized"] for e in per_user])
        new_data.append([e["personalized"] for e in _read_json(out / run["out"] / "new_users.json", [])])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels) + 2), 5))
    if data:
        positions = np.arange(1, len(data) + 1)
        has_new = any(new_data)
        width = 0.35 if has_new else 0.6
        offset = width / 2 + 0.02 if has_new else 0.0
        ax.boxplot(data, positions=positions - offset, widths=width, showfliers=False)
        rng = np.random.default_rng(0)
        for x, values in zip(positions - offset, data, strict=True):
            ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=8, alpha=0.6, color="tab:blue")
        if has_new:
            boxes = [v if v else [np.nan] for v in new_data]
            ax.boxplot(boxes, positions=positions + offset, widths=width, showfliers=False,
                       boxprops={"color": "tab:orange"}, medianprops={"color": "tab:orange"})
            for x, values in zip(positions + offset, new_data, strict=True):
                ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=8, alpha=0.6,
                           color="tab:orange")
            ax.scatter([], [], color="tab:blue", label="training users")
            ax.scatter([], [], color="tab:orange", label="new users (few-shot private fit)")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("per-user personalized accuracy")
    ax.set_title("per-user accuracy distribution")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, out / "per_user_accuracy.png")


def accuracy_by_pairs(out: Path, runs: list[dict[str, Any]], train_pairs: dict[str, int]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    counts = np.array(sorted(train_pairs.values()))
    edges = np.unique(np.quantile(counts, [0, 1 / 3, 2 / 3, 1])) if len(counts) else np.array([0, 1])
    for run in runs:
        per_user = _read_json(out / run["out"] / "per_user.json", [])
        if not per_user:
            continue
        n = np.array([train_pairs.get(str(e["user_index"]), np.nan) for e in per_user], dtype=float)
        acc = np.array([e["personalized"] for e in per_user], dtype=float)
        centres, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = (n >= lo) & ((n <= hi) if hi == edges[-1] else (n < hi))
            if mask.any():
                centres.append(float(np.exp(np.mean(np.log(n[mask])))))
                means.append(float(acc[mask].mean()))
        ax.plot(centres, means, "-o", label=run["run"])
    ax.set_xscale("log")
    ax.set_xlabel("training pairs of the user (bins: thirds of the users)")
    ax.set_ylabel("mean personalized accuracy")
    ax.set_title("accuracy by data quantity")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "accuracy_by_pairs.png")


def accuracy_by_simulated_time(out: Path, runs: list[dict[str, Any]]) -> Path:
    """Mean personalized (solid) and global (dashed) accuracy against the simulated hours at each evaluated
    round's end (``simulated_end_s`` of ``metrics.jsonl``), one colour per run."""
    return _accuracy_curves(out, runs, "simulated_end_s", 3600, "simulated hours (the population's devices)",
                            "personalized (solid) and global (dashed) accuracy against simulated time",
                            "accuracy_by_simulated_time.png", whole_x=False)


def accuracy_by_group(out: Path, runs: list[dict[str, Any]]) -> Path:
    """Personalized accuracy per group of users (``summary.json``'s ``accuracy_by_group``: ``tier:slow``,
    ``availability:q1``, ``privacy:strict``, ``pairs:q4``, ...), one bar per run, groups of a kind together."""
    plt = _pyplot()
    tables = [(run["run"], _read_json(out / run["out"] / "summary.json", {}).get("accuracy_by_group") or {})
              for run in runs]
    labels = list(dict.fromkeys(label for _, table in tables for label in table))
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(labels) * max(len(tables), 1) ** 0.5 + 3), 5))
    width = 0.8 / max(len(tables), 1)
    x = np.arange(len(labels))
    for i, (name, table) in enumerate(tables):
        values = [(table.get(label) or {}).get("personalized_accuracy_mean") for label in labels]
        ax.bar(x + (i - (len(tables) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean personalized accuracy of the group")
    ax.set_title("personalized accuracy per group (device tier, availability, privacy, training pairs)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0.3, 1.0)
    if tables:
        ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, out / "accuracy_by_group.png")


def population_plots(out_dir: str | Path, runs: list[dict[str, Any]]) -> list[Path]:
    """The two population figures for ``runs`` (each ``{"run": label, "out": folder under out_dir}``), written
    where some run has a heterogeneous population (a population other than uniform in its summary); else none."""
    out = Path(out_dir)
    populated = [r for r in runs if _read_json(out / r["out"] / "summary.json", {}).get("population")
                 not in (None, "uniform")]
    return [accuracy_by_simulated_time(out, runs), accuracy_by_group(out, runs)] if populated else []


def write_plots(out_dir: str | Path, result: dict[str, Any]) -> list[str]:
    """Write every figure for a benchmark ``result``; returns their paths relative to ``out_dir``."""
    out = Path(out_dir)
    runs = [r for r in result["runs"] if not r.get("error")]
    paths = [accuracy_per_round(out, runs), per_user_accuracy(out, runs),
             accuracy_by_pairs(out, runs, result.get("train_pairs", {})), *population_plots(out, runs)]
    return [str(p.relative_to(out)) for p in paths]
