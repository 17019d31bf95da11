"""`bidm analyze`: the paper's observations measured on a run, as PNG figures, one JSON file and an index page.

For a student run (teacher: ``--teacher`` or the run's ``binarize.teacher``):
    1. Obs. 1a  input ranges of the binarized convs along each model's own DDIM trajectory   (`bidm.observe`)
    2. Obs. 1b  step x step cosine similarity of every output block, and its mean at lag k   (`bidm.observe`)
    3. Obs. 2   L2 and SPD distance to the teacher per block and step; the training log       (`bidm.observe`)
    4. eps error vs teacher and true eps per timestep bucket                                (`bidm.analysis`)
    5. binarization diagnostics: flips, |W|, thresholds, k-conv, TBS alpha                  (`bidm.weight_stats`)
An FP run alone gets 1 and 2 (on the convs a binarizer would replace, `bidm.binarize.default_filter`).
Every model sees the same x_T; the DDIM settings default to the run's ``sample`` section.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from bidm import analysis, observe, weight_stats
from bidm import analyze_plots as plots
from bidm.errors import BidmError, ConfigError

LOG_KEYS = ("loss", "simple", "spd", "feat", "kd", "flip_ratio")
EPS_BUCKETS = (0, 100, 300, 600, 1000)  # per mille of T


def read_log(run_dir: str | Path, keys: tuple[str, ...] = LOG_KEYS) -> dict[str, dict]:
    """{key: {"step": [...], "value": [...]}} from ``run_dir/log.jsonl`` for each of ``keys`` that is ever
    non-zero (BiDM logs kd = 0, plain QAT spd = 0); {} without a log."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for key in keys:
        rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if any(value for _, value in rows):
            out[key] = {"step": [s for s, _ in rows], "value": [v for _, v in rows]}
    return out


def watched_convs(model: nn.Module) -> list[str]:
    """Obs. 1a layers, relative to the UNet: a student's binarized convs; for an FP model the convs that
    `binarize_` would replace."""
    from bidm.binarize import default_filter

    unet = observe.inner_unet(model)
    binary = [n for n in weight_stats.binarized_layer_names(unet) if unet.get_submodule(n).weight.dim() == 4]
    if binary:
        return binary
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and default_filter(m, n)]


def layer_level(name: str) -> str:
    """The UNet level of a layer name: its first part plus the level index if one follows ("down.1", "mid",
    "up_blocks.0")."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def layer_groups(shapes: dict[str, list[int]]) -> dict[str, list[str]]:
    """Layers grouped by UNet level, in layer order, keyed "level (inputs HxW, ...)" with the input sizes seen."""
    levels: dict[str, list[str]] = {}
    for name in shapes:
        levels.setdefault(layer_level(name), []).append(name)
    groups = {}
    for level, names in levels.items():
        sizes = dict.fromkeys(f"{shapes[n][-2]}x{shapes[n][-1]}" for n in names)
        groups[f"{level} (inputs {', '.join(sizes)})"] = names
    return groups


def shared_inputs(ranges: dict[str, dict]) -> list[list[str]]:
    """Layers grouped by identical input statistics (attention q, k, v read one tensor), in layer order."""
    groups: dict[str, list[str]] = {}
    for name, stats in ranges.items():
        groups.setdefault(json.dumps(stats), []).append(name)
    return list(groups.values())


def joint_name(names: list[str]) -> str:
    """``["a.q", "a.k", "a.v"]`` -> ``"a.{q,k,v}"``; one name stays as it is."""
    if len(names) == 1:
        return names[0]
    prefix = names[0][: len(os.path.commonprefix(names))].rpartition(".")[0]
    return f"{prefix}.{{{','.join(n[len(prefix) + 1 :] for n in names)}}}" if prefix else ", ".join(names)


def _similarity(trajectory: dict, blocks: list[str]) -> dict:
    matrices = {b: observe.cosine_matrix(trajectory["features"][b]) for b in blocks}
    lags = observe.default_lags(len(trajectory["t"]))
    return {
        "matrix": {b: m.tolist() for b, m in matrices.items()},
        "lags": {b: observe.lag_similarity(m, lags) for b, m in matrices.items()},
    }


def _eps_section(student, teacher, cfg, x_T, acp, traj_opts: dict, n_eps: int) -> dict:
    from bidm.data import load_training_images

    T = len(acp)
    edges = tuple(e * T // 1000 for e in EPS_BUCKETS)
    section = {"train": [], "note": None}
    try:
        x0 = load_training_images(cfg)[:n_eps]
    except (BidmError, FileNotFoundError, OSError) as err:  # the run's data is not here: trajectory part only
        section["note"] = f"training images not available ({err}); q_sample rows skipped"
    else:
        t_values = list(range(T // 200, T, T // 20))
        section["train"] = analysis.eps_error_by_timestep(
            student, teacher, x0, acp, t_values, seed=traj_opts["seed"], cache_offset=T // traj_opts["steps"]
        )
    section["trajectory"] = analysis.trajectory_eps_error(student, teacher, x_T, acp, **traj_opts)
    buckets = {
        "student vs teacher (trajectory)": analysis.bucket_means(section["trajectory"], "student_vs_teacher", edges)
    }
    for key in ("student_vs_teacher", "student_vs_true", "teacher_vs_true") if section["train"] else ():
        buckets[f"{key.replace('_', ' ')} (q_sample)"] = analysis.bucket_means(section["train"], key, edges)
    section["buckets"] = buckets
    return section


def _summary(result: dict) -> dict:
    """The few numbers that say whether each observation holds on this run."""
    s: dict = {"obs1a_range_variation": {}, "obs1b_lag_similarity": {}}
    for label, ranges in result["obs1a"].items():
        ratios = {n: observe.range_variation(r["p01"], r["p99"]) for n, r in ranges["ranges"].items()}
        worst = max(ratios, key=ratios.get)
        s["obs1a_range_variation"][label] = {
            "median": float(torch.tensor(list(ratios.values())).median()),
            "max": ratios[worst],
            "max_layer": worst,
        }
    for label, sim in result["obs1b"].items():
        per_k: dict[int, list[float]] = {}
        for curve in sim["lags"].values():
            for k, v in curve.items():
                per_k.setdefault(k, []).append(v)
        s["obs1b_lag_similarity"][label] = {k: sum(v) / len(v) for k, v in per_k.items()}
    if "obs2" in result:
        d = result["obs2"]["distances"]
        for key in ("l2", "spd"):
            per_block = {b: sum(v) / len(v) for b, v in d[key].items()}
            s[f"obs2_mean_{key}"] = sum(per_block.values()) / len(per_block)
            s[f"obs2_worst_{key}_block"] = max(per_block, key=per_block.get)
        s["obs2_log_first_last"] = {k: [v["value"][0], v["value"][-1]] for k, v in result["obs2"]["log"].items()}
    if "eps" in result:
        traj = result["eps"]["buckets"]["student vs teacher (trajectory)"]
        s["eps_trajectory_buckets"] = traj
        s["eps_worst_bucket"] = max(traj, key=traj.get)
    if "binarization" in result:
        rows = result["binarization"]["layers"]
        sizes = [torch.Size(r["shape"]).numel() for r in rows]
        if rows and rows[0]["flip_fraction"] is not None:
            s["flip_fraction"] = sum(r["flip_fraction"] * n for r, n in zip(rows, sizes)) / sum(sizes)
        s["mean_abs_w"] = sum(r["mean_abs"] * n for r, n in zip(rows, sizes)) / sum(sizes)
        values = [v for r in rows if "thresholds" in r for v in r["thresholds"]["values"]]
        if values:
            s["thresholds"] = weight_stats.summarize(torch.tensor(values))
        devs = [r["k_conv"]["mean_abs_dev"] for r in rows if "k_conv" in r]
        if devs:
            s["k_conv_mean_abs_dev"] = sum(devs) / len(devs)
        table = result["binarization"]["alpha"]
        if table:
            s["alpha"] = {k: table[k] for k in ("mean", "std", "min", "max")}
    return s


def _figures(result: dict, out: Path, final: dict[str, torch.Tensor]) -> list[tuple[str, Path]]:
    """Draw every figure of ``result`` into ``out``; returns (caption, path) in page order."""
    from bidm.evaluate import side_by_side
    from bidm.npz_io import images_to_uint8

    figs: list[tuple[str, Path]] = []
    images = {label: images_to_uint8(x.clamp(-1, 1))[:8] for label, x in final.items()}
    figs.append(("Final samples of each analysed trajectory (same x_T)", side_by_side(images, out / "samples.png")))
    ranges = result["obs1a"]
    main = "student" if "student" in ranges else "model"
    t = ranges[main]["t"]
    teacher = ranges["teacher"]["ranges"] if "teacher" in ranges else None
    for i, (group, names) in enumerate(layer_groups(ranges[main]["shapes"]).items()):
        shared = shared_inputs({name: ranges[main]["ranges"][name] for name in names})
        layers = {joint_name(same): ranges[main]["ranges"][same[0]] for same in shared}
        reference = {joint_name(same): teacher[same[0]] for same in shared} if teacher else None
        path = plots.activation_ranges(group, t, layers, out / f"obs1a_ranges_{i}.png", teacher=reference)
        figs.append((f"Obs. 1a: input activation range per timestep, {group}", path))
    for label, sim in result["obs1b"].items():
        title = f"Obs. 1b: step x step cosine similarity of each output block ({label})"
        figs.append((title, plots.similarity_heatmaps(t, sim["matrix"], out / f"obs1b_sim_{label}.png", title=title)))
    lags = {label: sim["lags"] for label, sim in result["obs1b"].items()}
    figs.append(
        ("Obs. 1b: similarity against the step distance k", plots.lag_similarity(lags, out / "obs1b_lags.png"))
    )
    if "obs2" in result:
        path = plots.feature_distances(result["obs2"]["distances"], out / "obs2_feature_distance.png")
        figs.append(("Obs. 2: L2 and SPD distance to the teacher per block and timestep", path))
        if result["obs2"]["log"]:
            path = plots.training_log(result["obs2"]["log"], out / "obs2_training_log.png")
            figs.append(("Obs. 2: training losses from log.jsonl", path))
    if "eps" in result:
        e = result["eps"]
        path = plots.eps_error(e["train"], e["trajectory"], e["buckets"], out / "eps_error.png")
        figs.append(("Where the student goes wrong: eps error per timestep and bucket", path))
    if "binarization" in result:
        rows, table = result["binarization"]["layers"], result["binarization"]["alpha"]
        path = plots.layer_bars(rows, out / "bin_weights.png")
        figs.append(("Binarized layers: flipped signs, mean |W|, clipped share", path))
        if any("thresholds" in r for r in rows):
            figs.append(("Learned activation thresholds", plots.thresholds(rows, out / "bin_thresholds.png")))
        if any("k_conv" in r for r in rows):
            figs.append(("BiDM k-conv weights vs 1/(kh*kw)", plots.k_conv(rows, out / "bin_kconv.png")))
        if table:
            figs.append(("TBS alpha table (bucket x block)", plots.alpha_heatmap(table, out / "tbs_alpha.png")))
    return figs


def _fmt_map(values: dict, digits: int = 3) -> str:
    return ", ".join(f"{k}: {v:.{digits}g}" for k, v in values.items())


def _summary_lines(s: dict) -> list[str]:
    """The summary as one Markdown bullet per observation."""
    lines = []
    for label, r in s["obs1a_range_variation"].items():
        lines.append(
            f"- Obs. 1a ({label}): a conv input's p1-p99 width changes x{r['median']:.2f} across t for the "
            f"median layer, up to x{r['max']:.2f} ({r['max_layer']})"
        )
    for label, r in s["obs1b_lag_similarity"].items():
        lines.append(f"- Obs. 1b ({label}): mean cosine of output blocks between steps i and i + k: {_fmt_map(r)}")
    if "obs2_mean_l2" in s:
        log = ", ".join(f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in s["obs2_log_first_last"].items())
        l2 = f"mean L2 {s['obs2_mean_l2']:.3g} (worst block {s['obs2_worst_l2_block']})"
        spd = f"mean SPD {s['obs2_mean_spd']:.3g} (worst {s['obs2_worst_spd_block']})"
        lines.append(f"- Obs. 2: {l2}, {spd}; training log first -> last: {log}")
    if "eps_trajectory_buckets" in s:
        buckets = _fmt_map(s["eps_trajectory_buckets"])
        lines.append(
            f"- eps MSE student vs teacher on the trajectory, per t bucket: {buckets} (worst {s['eps_worst_bucket']})"
        )
    if "mean_abs_w" in s:
        parts = [f"mean |W| {s['mean_abs_w']:.3g}"]
        if "flip_fraction" in s:
            parts.insert(0, f"signs flipped vs teacher {s['flip_fraction']:.2%}")
        if "thresholds" in s:
            parts.append(f"thresholds {_fmt_map(s['thresholds'])}")
        if "k_conv_mean_abs_dev" in s:
            parts.append(f"k-conv mean |k kh kw - 1| {s['k_conv_mean_abs_dev']:.3g}")
        if "alpha" in s:
            parts.append(f"TBS alpha {_fmt_map(s['alpha'])}")
        lines.append("- Binarization: " + "; ".join(parts))
    return lines


def _index(result: dict, figs: list[tuple[str, Path]]) -> str:
    s = result["settings"]
    who = f"{s['method']} student of {s['teacher']}" if s["teacher"] else "FP run"
    lines = [
        f"# bidm analyze: {s['ckpt']}",
        "",
        f"{who}; DDIM {s['steps']} steps, eta {s['eta']}, batch {s['n']}, seed {s['seed']}; "
        f"{s['seconds']:.0f} s. Every number is in `analysis.json`.",
        "",
        "## Summary",
        "",
    ]
    lines += _summary_lines(result["summary"]) + [""]
    note = result.get("eps", {}).get("note")
    lines += [f"> note: {note}", ""] if note else []
    for caption, path in figs:
        lines += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    return "\n".join(lines)


def analyze_run(
    ckpt: str | Path,
    out: str | Path,
    *,
    teacher: str | Path | None = None,
    n: int = 16,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    sim_batch: int = 8,
    n_eps: int = 64,
    log=print,
) -> dict:
    """Analyse the run ``ckpt`` into ``out`` (module docstring); returns the JSON-able result (with "files").

    ``n``: trajectory batch (x_T seeded by ``seed``); ``sim_batch``: samples kept for the similarity matrices;
    ``n_eps``: training images for the eps error; ``steps`` / ``eta``: DDIM (default: the run's sample section).
    """
    from bidm.diffusion import initial_noise
    from bidm.models import load_model, load_teacher
    from bidm.train import schedule

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_model(ckpt)
    is_student = cfg.binarize.method != "none"
    if not is_student and teacher is not None:
        raise ConfigError(f"{ckpt} is an FP run: --teacher only applies to a binarized student")
    teacher_spec = (teacher or cfg.binarize.teacher) if is_student else None
    if is_student and not teacher_spec:
        raise ConfigError(f"{ckpt} names no teacher (binarize.teacher); pass --teacher DIR")
    fp = load_teacher(teacher_spec, cfg.model)[0] if is_student else None
    acp = schedule(cfg)
    steps = steps or cfg.sample.steps
    eta = cfg.sample.eta if eta is None else eta
    opts = {"steps": steps, "eta": eta, "clip_x0": cfg.sample.clip_x0, "seed": seed}
    x_T = initial_noise(n, (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution), seed)
    models = {"teacher": fp, "student": model} if is_student else {"model": model}
    layers = watched_convs(model)
    n_out = model.num_output_blocks()
    result: dict = {"obs1a": {}, "obs1b": {}}
    final = {}
    for label, m in models.items():
        log(f"[analyze] obs. 1: {label} trajectory ({steps} steps, {len(layers)} convs watched)")
        outputs = list(m.feature_blocks())[-n_out:]
        traj = observe.record_trajectory(m, x_T, acp, layers=layers, sim_batch=sim_batch, blocks=outputs, **opts)
        result["obs1a"][label] = {"t": traj["t"], "ranges": traj["ranges"], "shapes": traj["shapes"]}
        result["obs1b"][label] = _similarity(traj, outputs)
        final[label] = traj["x0"]
    if is_student:
        log("[analyze] obs. 2: student vs teacher features on the teacher's trajectory")
        distances = observe.feature_distances(model, fp, x_T, acp, p=cfg.binarize.spd_p, **opts)
        result["obs2"] = {"distances": distances, "log": read_log(ckpt)}
        log("[analyze] eps error per timestep")
        result["eps"] = _eps_section(model, fp, cfg, x_T, acp, opts, n_eps)
        result["binarization"] = {
            "layers": weight_stats.layer_diagnostics(model, fp),
            "alpha": weight_stats.alpha_table(model),
        }
    result["summary"] = _summary(result)
    log("[analyze] figures")
    figs = _figures(result, out, final)
    result["settings"] = {
        "ckpt": str(ckpt),
        "method": cfg.binarize.method,
        "teacher": str(teacher_spec) if teacher_spec else None,
        "n": n,
        "sim_batch": sim_batch,
        "seconds": time.perf_counter() - start,
        **opts,
    }
    result["files"] = {
        "json": str(out / "analysis.json"),
        "index": str(out / "index.md"),
        "figures": [str(p) for _, p in figs],
    }
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / "index.md").write_text(_index(result, figs))
    return result
