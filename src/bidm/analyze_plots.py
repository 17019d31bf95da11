"""Figures of `bidm analyze` (matplotlib, no pyplot state): one function per figure, each takes the numbers that
`bidm.analyze` writes to JSON and a path, and returns the path.

Conventions: time axes show the diffusion timestep t with t = T - 1 on the left, so sampling runs left to right;
every axis is labelled; long layer names sit on the y axis of horizontal bar charts, one per row, so they never
overlap; figure heights grow with the number of rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DPI = 110
STUDENT, TEACHER = "C0", "0.45"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def _time_axis(ax, label: bool = True) -> None:
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    if label:
        ax.set_xlabel("timestep t (sampling runs left to right)")


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _block_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- observation 1


def activation_ranges(group: str, t: list[int], layers: dict, path, *, teacher: dict | None = None) -> Path:
    """Obs. 1a, one layer group: per layer, the input's p1-p99 band (shaded) and min/max (dashed) over t.

    ``layers`` and ``teacher``: {panel title: {"min", "p01", "p99", "max"} lists over ``t``}, the same titles."""
    rows, cols = _grid(len(layers), 3)
    fig = _figure(4.2 * cols, 2.6 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, stats) in zip(axes, layers.items()):
        series = [("student" if teacher else "model", stats, STUDENT)]
        if teacher and name in teacher:
            series.insert(0, ("teacher", teacher[name], TEACHER))
        for label, s, color in series:
            ax.fill_between(t, s["p01"], s["p99"], color=color, alpha=0.3, lw=0, label=f"{label} p1-p99")
            ax.plot(t, s["min"], color=color, ls="--", lw=0.8, label=f"{label} min / max")
            ax.plot(t, s["max"], color=color, ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("input activation")
        _time_axis(ax)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle(f"Obs. 1a: input range of the watched convs, {group}", fontsize=10)
    return _save(fig, path)


def _step_ticks(ax, t: list[int], n: int = 6) -> None:
    idx = np.linspace(0, len(t) - 1, min(n, len(t))).round().astype(int)
    ax.set_xticks(idx, [str(t[i]) for i in idx], fontsize=7)
    ax.set_yticks(idx, [str(t[i]) for i in idx], fontsize=7)


def similarity_heatmaps(t: list[int], matrices: dict, path, *, title: str) -> Path:
    """Obs. 1b: per block, the step x step cosine similarity of its output (axes labelled with t)."""
    rows, cols = _grid(len(matrices), 4)
    fig = _figure(3.0 * cols + 0.8, 2.9 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    low = min(0.0, min(float(np.min(m)) for m in matrices.values()))
    image = None
    for ax, (name, m) in zip(axes, matrices.items()):
        image = ax.imshow(np.asarray(m), vmin=low, vmax=1.0, cmap="magma", origin="upper")
        _step_ticks(ax, t)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("timestep t", fontsize=8)
        ax.set_ylabel("timestep t", fontsize=8)
    for ax in axes[len(matrices) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(matrices)].tolist(), label="cosine similarity", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lag_similarity(lags: dict[str, dict], path) -> Path:
    """Obs. 1b: mean cosine similarity of a block's output between steps i and i + k, against k (one panel per
    model, one line per block)."""
    fig = _figure(5.2 * len(lags) + 1.8, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(lags), squeeze=False)).ravel()
    for ax, (model, per_block) in zip(axes, lags.items()):
        colors = _block_colors(len(per_block))
        for color, (block, curve) in zip(colors, per_block.items()):
            ks = [int(k) for k in curve]
            ax.plot(ks, list(curve.values()), marker="o", ms=3, color=color, label=block)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("lag k (sampler steps)")
        ax.set_ylabel("mean cosine(step i, step i + k)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="output block")
    fig.suptitle("Obs. 1b: neighbouring sampler steps give similar block outputs", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- observation 2


def feature_distances(dist: dict, path) -> Path:
    """Obs. 2: per block, L2 and SPD distance of student to teacher features against t, and the per-block means
    (each distance divided by its largest block mean, so both fit one axis)."""
    t, blocks = dist["t"], dist["blocks"]
    fig = _figure(15, 0.8 + max(3.6, 0.22 * len(blocks)))
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 0.8])
    colors = _block_colors(len(blocks))
    for ax, key, label in zip(axes, ("l2", "spd"), ("L2 (element MSE)", "SPD")):
        for color, b in zip(colors, blocks):
            ax.plot(t, dist[key][b], color=color, lw=1, label=b)
        ax.set_yscale("log")
        ax.set_ylabel(f"{label} distance, student vs teacher")
        ax.set_title(f"{label} per block", fontsize=10)
        _time_axis(ax)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, ncols=2, title="block", title_fontsize=7)
    ax = axes[2]
    y = np.arange(len(blocks))
    for offset, key, color in ((-0.2, "l2", "C1"), (0.2, "spd", "C2")):
        means = np.array([np.mean(dist[key][b]) for b in blocks])
        ax.barh(y + offset, means / max(means.max(), 1e-30), height=0.4, color=color, label=key.upper())
    ax.set_yticks(y, blocks, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean over t / largest block mean")
    ax.set_title("per block (execution order)", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle("Obs. 2: student-teacher feature distance on the teacher's trajectory", fontsize=10)
    return _save(fig, path)


def training_log(log: dict[str, dict], path) -> Path:
    """Obs. 2: the logged training losses (and sign-flip ratio) against the training step, one panel per key."""
    rows, cols = _grid(len(log), 3)
    fig = _figure(4.4 * cols, 2.8 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (key, series) in zip(axes, log.items()):
        ax.plot(series["step"], series["value"], marker="o", ms=2.5, lw=1)
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        if min(series["value"]) > 0 and max(series["value"]) > 20 * min(series["value"]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(log) :]:
        ax.set_visible(False)
    fig.suptitle("Training log (log.jsonl)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- eps error


EPS_COLORS = {
    "student vs teacher (trajectory)": "C0",
    "student vs teacher (q_sample)": "C1",
    "student vs true (q_sample)": "C2",
    "teacher vs true (q_sample)": TEACHER,
}


def eps_error(train_rows: list[dict], traj_rows: list[dict], buckets: dict[str, dict], path) -> Path:
    """Where a student goes wrong: eps MSE against t (training distribution and teacher trajectory) and per
    timestep bucket; a series has the same colour in both panels."""
    fig = _figure(12, 4.2)
    ax, bx = fig.subplots(1, 2, width_ratios=[1.4, 1])
    series = [("student vs teacher (trajectory)", traj_rows, "student_vs_teacher", "-")]
    if train_rows:
        series += [
            ("student vs teacher (q_sample)", train_rows, "student_vs_teacher", "o-"),
            ("student vs true (q_sample)", train_rows, "student_vs_true", "s-"),
            ("teacher vs true (q_sample)", train_rows, "teacher_vs_true", "--"),
        ]
    for label, rows, key, style in series:
        ax.plot(
            [r["t"] for r in rows], [r[key] for r in rows], style, ms=3, lw=1.2, color=EPS_COLORS[label], label=label
        )
    ax.set_yscale("log")
    ax.set_ylabel("eps MSE")
    _time_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    names = list(next(iter(buckets.values())).keys()) if buckets else []
    x = np.arange(len(names))
    width = 0.8 / max(len(buckets), 1)
    for i, (label, values) in enumerate(buckets.items()):
        offset = (i - (len(buckets) - 1) / 2) * width
        bx.bar(x + offset, [values[n] for n in names], width, label=label, color=EPS_COLORS.get(label))
    bx.set_xticks(x, names)
    bx.set_xlabel("timestep bucket")
    bx.set_ylabel("mean eps MSE")
    bx.set_yscale("log")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="y", which="both")
    fig.suptitle("Where the student goes wrong: eps error per timestep", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- binarization


def layer_bars(rows: list[dict], path) -> Path:
    """Per binarized layer: flipped-sign fraction, mean |latent W| (teacher's as a tick) and |W| > 1 share."""
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    fig = _figure(14, 1.0 + 0.2 * len(rows))
    axes = fig.subplots(1, 3, sharey=True)
    flips = [r["flip_fraction"] or 0.0 for r in rows]
    axes[0].barh(y, flips, color="C3")
    axes[0].set_xlabel("fraction of weight signs flipped vs teacher")
    axes[1].barh(y, [r["mean_abs"] for r in rows], color=STUDENT, label="student (latent)")
    if rows and rows[0]["teacher_mean_abs"] is not None:
        axes[1].scatter([r["teacher_mean_abs"] for r in rows], y, marker="|", s=80, color="k", label="teacher")
    axes[1].set_xlabel("mean |W|")
    axes[1].legend(fontsize=7, loc="lower right")
    clipped = [r["clipped"] for r in rows]
    axes[2].barh(y, clipped, color="C4")
    axes[2].set_xlim(0, max(max(clipped, default=0.0) * 1.1, 1e-3))  # all zero: a visible [0, 0.001] axis
    if not any(clipped):
        axes[2].text(0.5, 0.5, "no layer has |W| > 1", transform=axes[2].transAxes, ha="center", va="center")
    axes[2].set_xlabel("fraction with |W| > 1 (no STE gradient)")
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Binarized layers: weights", fontsize=10)
    return _save(fig, path)


def thresholds(rows: list[dict], path) -> Path:
    """Learned activation thresholds (act_shift): per layer box plot over channels, and the pooled histogram."""
    rows = [r for r in rows if "thresholds" in r]
    fig = _figure(12, 1.2 + 0.2 * len(rows))
    ax, hx = fig.subplots(1, 2, width_ratios=[1.6, 1])
    import matplotlib

    new_api = tuple(int(part) for part in matplotlib.__version__.split(".")[:2]) >= (3, 10)  # vert= deprecated
    horizontal = {"orientation": "horizontal"} if new_api else {"vert": False}
    ax.boxplot([r["thresholds"]["values"] for r in rows], widths=0.6, flierprops={"ms": 2}, **horizontal)
    ax.set_yticks(np.arange(1, len(rows) + 1), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("threshold b_c (init 0)")
    ax.grid(alpha=0.3, axis="x")
    pooled = np.concatenate([r["thresholds"]["values"] for r in rows])
    hx.hist(pooled, bins=60, color=STUDENT)
    hx.set_xlabel("threshold b_c, all layers")
    hx.set_ylabel("channels")
    fig.suptitle("Learned activation thresholds (RSign act_shift)", fontsize=10)
    return _save(fig, path)


def k_conv(rows: list[dict], path) -> Path:
    """BiDM k-conv: each weight times kh*kw (1 = the 1/(kh*kw) init), one row of dots per layer."""
    rows = [r for r in rows if "k_conv" in r]
    fig = _figure(8, 1.2 + 0.2 * len(rows))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        ratio = r["k_conv"]["ratio"]
        ax.scatter(ratio, [i] * len(ratio), s=8, color=STUDENT)
    ax.axvline(1.0, color="k", lw=0.8, ls="--", label="init 1/(kh*kw)")
    ax.set_yticks(np.arange(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("k-conv weight x kh*kw")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle("BiDM learnable k-conv weights vs initialisation", fontsize=10)
    return _save(fig, path)


def alpha_heatmap(table: dict, path) -> Path:
    """TBS alpha table as a heat map: rows = timestep buckets (t ranges), columns = mixed output blocks."""
    alpha = np.asarray(table["alpha"])
    n_b, n_t = table["num_buckets"], table["num_timesteps"]
    fig = _figure(2.2 + 1.1 * alpha.shape[1], 5.5)
    ax = fig.subplots()
    image = ax.imshow(alpha, aspect="auto", cmap="viridis", interpolation="nearest")
    rows = np.arange(0, n_b, math.ceil(n_b / 10))
    ax.set_yticks(rows, [f"{r * n_t // n_b}-{(r + 1) * n_t // n_b - 1}" for r in rows], fontsize=7)
    ax.set_ylabel("timestep bucket (t range)")
    ax.set_xticks(np.arange(alpha.shape[1]), table["blocks"], rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("mixed output block")
    fig.colorbar(image, ax=ax, label="alpha (weight of the previous step)")
    fig.suptitle("TBS cross-timestep alpha", fontsize=10)
    return _save(fig, path)
