"""Render the committed results (bench/results/*.json: quality, ablation, kernel) into bench/RESULTS.md.

Each results file owns one section of RESULTS.md between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers;
everything outside the markers is left as written. Run after any bench that adds rows:

    python bench/render_results.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

from bidm import METHODS  # noqa: E402

RESULTS_MD = P.ROOT / "bench" / "RESULTS.md"
SECTIONS = {
    "quality_v3_cifar16": "method",  # bench/quality.py (protocol v3, the default)
    "ablation_v3_cifar16": "variant",  # bench/ablation.py
    "quality_cifar16": "method",  # bench/quality.py --protocol v2 (lr 5e-4)
    "ablation_cifar16": "variant",  # bench/ablation.py --protocol v2
    "budget_cifar16": "method",  # bench/quality.py --set train.steps=N --results bench/results/budget_cifar16.json
    "budget_v3_cifar16": "method",  # the same at protocol v3 (--protocol v3, bench/results/budget_v3_cifar16.json)
    "budget_device_cifar16": "method",  # bench/device_budget.py score (trained and sampled on a lent GPU)
    "eta0_cifar16": "method",  # bench/eta_study.py --eta 0
    "ldm_cpu": "method",
}
GOALS = {"step": {1: 2.5, 64: 3.0}, "conv": 5.0}  # issue 12: full step / trajectory ratios per batch, per conv


def _meta(part: dict) -> str:
    load = part.get("loadavg_1min")
    load = "/".join(f"{v:.2f}" for v in load) if isinstance(load, list) else f"{load:.2f}" if load else "?"
    commit = (part.get("commit") or "?")[:7] + (" (dirty)" if part.get("dirty") else "")
    return f"commit {commit}, {part.get('machine', part.get('cpu', '?'))}, {part.get('threads')} threads, load {load}"


def _goal(ratio: float, target: float) -> str:
    return f"**{ratio:.2f}x** {'✓' if ratio >= target else '✗'}"


def kernel_section(data: dict) -> str:
    """bench/results/kernel.json (keys ``kernel`` from bench/kernel.py, ``norms`` from norm_speed.py,
    ``trajectories`` from sample_speed.py)."""
    import kernel as K

    out = []
    part = data.get("kernel")
    if part:
        out.append(f"`bench/kernel.py`: {_meta(part)}; kernel {part['kernel'].get('backend')} "
                   f"`{part['kernel'].get('flags', '')}`.\n")  # fmt: skip
        convs = [r for r in part["convs"] if r["net"] == "ddim-cifar10"]
        worst = min(convs, key=lambda r: r["speedup"]) if convs else None
        out.append(K.conv_table(part["convs"]) + "\n")
        if worst:
            ratio = _goal(worst["speedup"], GOALS["conv"])
            out.append(f"Slowest DDIM CIFAR-10 shape: {worst['cin']}→{worst['cout']} {worst['h']}x{worst['w']} "
                       f"batch {worst['batch']}, {ratio} (goal ≥ {GOALS['conv']}x).\n")  # fmt: skip
        out.append("| net | batch | FP32 ms | packed ms | speed-up |\n|---|---|---|---|---|")
        out += [f"| {r['net']} | {r['batch']} | {r['fp_ms']:.1f} | {r['packed_ms']:.1f} | **{r['speedup']:.2f}x** |"
                for r in part["conv_totals"]]  # fmt: skip
        if part.get("steps"):
            out.append("\nOne full denoising step `model(x, t)`, DDIM CIFAR-10 UNet:\n")
            out.append("| method | batch | FP32 ms | packed ms | speed-up (goal) | packed profile (ms) |")
            out.append("|---|---|---|---|---|---|")
            for r in part["steps"]:
                goal = GOALS["step"].get(r["batch"], GOALS["step"][64])
                prof = ", ".join(f"{k} {v:.0f}" for k, v in r["profile_ms"].items())
                out.append(f"| {r['method']} | {r['batch']} | {r['fp_ms']:.0f} | {r['packed_ms']:.0f} "
                           f"| {_goal(r['speedup'], goal)} (≥ {goal}x) | {prof} |")  # fmt: skip
    norms = data.get("norms")
    if norms:
        import norm_speed

        out.append(f"\nGroupNorm + SiLU (`bench/norm_speed.py`, {norms['net']}): {_meta(norms)}.\n")
        out.append(norm_speed.norm_table(norms["rows"]))
    for key, part in (data.get("ab") or {}).items():
        switch, batch = key.split("@")
        how = f"{part['net']}, {part['rounds']} rounds of {part['calls']} steps per side, interleaved in one process"
        out.append(f"\nA/B of `{switch}` at batch {batch} (`bench/ab_step.py`, {how}): {_meta(part)}.\n")
        out.append(f"| method | {switch}=1 ms (min / median) | =0 ms | speed-up (min / median) | max abs diff |")
        out.append("|---|---|---|---|---|")
        out += [f"| {r['method']} | {r['on_min_ms']:.1f} / {r['on_median_ms']:.1f} | {r['off_min_ms']:.1f} / "
                f"{r['off_median_ms']:.1f} | {r['speedup_min']:.2f}x / {r['speedup_median']:.2f}x "
                f"| {r['max_abs_diff']:.1e} |" for r in part["rows"]]  # fmt: skip
    traj = data.get("trajectories")
    if traj:
        out.append(f"\nWhole DDIM trajectories (`bench/sample_speed.py`, {traj['net']}): {_meta(traj)}.\n")
        out.append("| model | batch | steps | seconds | ms/step | images/s | peak RSS MB | speed-up (goal) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in traj["rows"]:
            goal = GOALS["step"].get(r["batch"], GOALS["step"][64])
            speed = f"{_goal(r['speedup'], goal)} (≥ {goal}x)" if "speedup" in r else "1"
            out.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['seconds']:.1f} | {r['step_ms']:.0f} "
                       f"| {r['images_per_s']:.3f} | {r['peak_rss_mb']:.0f} | {speed} |")  # fmt: skip
    return "\n".join(out) + "\n"


def replace_block(md: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}{end}"
    if begin in md and end in md:
        return md[: md.index(begin)] + block + md[md.index(end) + len(end) :]
    return md.rstrip("\n") + f"\n\n## {name} (rendered)\n\n{block}\n"


def headline(data: dict) -> str:
    """The issue-9 goal figures: FID(bidm) / FID(best baseline) and the gap against the seed spread."""
    groups = {g["name"]: g for g in P.aggregate(data["rows"], "method")}
    fid = {k: [r["fid"] for r in g["inception"]] for k, g in groups.items() if g["inception"]}
    missing = sorted(set(METHODS) - set(fid))
    baselines = {k: v for k, v in fid.items() if k not in ("fp32", "bidm")}
    if "bidm" not in fid or not baselines:
        return f"Not yet measured under this protocol: {', '.join(missing)}.\n" if missing else ""
    best = min(baselines, key=lambda k: P.mean_std(baselines[k])[0])
    (mb, sb), (mx, sx) = P.mean_std(fid["bidm"]), P.mean_std(baselines[best])
    ratio = mb / mx
    spread = max(v for v in (sb, sx) if not math.isnan(v)) if not (math.isnan(sb) and math.isnan(sx)) else None
    gap = mx - mb
    rank = 1 + sum(P.mean_std(v)[0] < mb for v in baselines.values())
    text = (
        f"FID(bidm) / FID(best baseline = {best}) = {mb:.1f} / {mx:.1f} = **{ratio:.2f}**; "
        f"bidm ranks {rank} of {len(baselines) + 1} binary methods by mean FID"
    )
    if spread is not None:
        text += f"; gap {gap:.1f} vs twice the larger seed std {2 * spread:.1f}"
    if missing:
        text += f". Not yet measured under this protocol: {', '.join(missing)}"
    return text + ".\n"


def section(name: str, group: str) -> str | None:
    path = P.RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data = P.load_results(path)
    proto = data["protocol"]
    rows = data["rows"]
    fresh = [r for r in rows if r["feature_space"] == "inception"]
    extra = proto.get("student_overrides") or []
    overrides = " + " + " ".join(f"`{o}`" for o in extra) if extra else ""
    machines = sorted({r["machine"] for r in fresh})
    text = (
        f"Protocol `{proto['name']}`: {proto['dataset']}; teacher `{proto['teacher_config']}`, students "
        f"`{proto['recipe']}`{overrides}; {proto['n_samples']} samples per model, DDIM {proto['sample_steps']} "
        f"steps (eta "
        f"{proto['eta']}{', x0 clipped' if proto.get('clip_x0', True) else ''}), Inception FID/sFID/precision/recall "
        f"against {proto['n_ref']} training "
        f"images; domain FID = the small CNN feature space (secondary). mean ± sample std over seeds. "
        f"Rendered from `bench/results/{name}.json` by `bench/render_results.py`. Machines: {'; '.join(machines)}.\n\n"
    )
    psnr = sorted({r["first_stage_psnr"] for r in rows if r.get("first_stage_psnr") is not None})
    if psnr:
        text += f"First-stage reconstruction PSNR on the test images: {', '.join(f'{v:.2f}' for v in psnr)} dB"
        floor = sorted({r["first_stage_recon_fid"] for r in fresh if r.get("first_stage_recon_fid") is not None})
        if floor:  # the same images decoded from their own latents, scored like the samples
            text += f"; Inception FID of those reconstructions (the decoder's floor): {', '.join(map(str, floor))}"
        text += ".\n\n"
    if group == "method" and name.startswith(("quality", "budget")):  # Table 1 and its budget studies
        text += headline(data) + "\n"
    return text + P.render_markdown(data, group)


def main(argv=None) -> int:
    md = RESULTS_MD.read_text()
    for name, group in SECTIONS.items():
        body = section(name, group)
        if body is not None:
            md = replace_block(md, name, body)
    kernel_json = P.RESULTS / "kernel.json"
    if kernel_json.is_file():
        md = replace_block(md, "kernel", kernel_section(json.loads(kernel_json.read_text())))
    RESULTS_MD.write_text(md)
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
