"""The CPU-scale protocol at a larger budget on a lent GPU: train and sample there, score here.

A device call carries at most 64 MiB and keeps nothing, so it can hold neither what scoring needs (the Inception
weights, 84 MB, and the 10,000 reference images) nor CIFAR-10 itself (150 MB). The study runs in three steps:

    python bench/device_budget.py pack-data --out .carry/cifar16_train.npz        # here, once: 38 MB
    # on the device (the `run` tool with carry [".carry"], from a clean tree; the commit is passed in):
    python bench/device_budget.py train --data .carry/cifar16_train.npz --methods bidm,bbcu --seeds 0 \\
        --set train.steps=20000 --commit <git rev-parse HEAD> --bundle $OUT
    # here, on the files that came back:
    python bench/device_budget.py score <files_at> --results bench/results/budget_device_cifar16.json

``pack-data`` writes the protocol's training images (CIFAR-10 train, 50,000, resized to 16x16 exactly as the
protocol's loader does) rounded to uint8: that rounding (at most 1/510 of the pixel range) is the one way the data
differs from the CPU protocol's, and the results file's protocol (``<name>-device``) says so. ``train`` trains each
student with the protocol's own config (bench/protocol.py; v3 unless ``--protocol``) on ``train.device=auto``,
samples it on the device from the protocol's x_T (drawn on the CPU, so only the arithmetic differs), and writes one
tar per run into ``--bundle`` as soon as the run is done (EMA weights only, samples, log, and a manifest with the
commit, the device and the timings), so a call cut off at its limit still returns the runs it finished. ``score``
unpacks them, refuses a run whose config hash differs from the one the protocol gives it here, scores its samples
exactly as bench/quality.py does (same reference images, so the reference cache is shared) and appends the rows,
marked with the device that trained them, to ``--results`` (one budget per file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402
import render_results  # noqa: E402
from gpu import step_time  # noqa: E402

from bidm import checkpoint  # noqa: E402
from bidm.config import from_dict  # noqa: E402
from bidm.qat import resolve_recipe  # noqa: E402

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what a device call returns from $OUT
RUN_FILES = ("checkpoint.safetensors", "samples.npz", "samples.json", "samples.png", "log.jsonl", "manifest.json")
DEVICE_NOTE = ("students trained and sampled on a GPU (bench/device_budget.py) from the protocol's 16x16 training "
               "images rounded to uint8; scored on the CPU like the protocol")  # fmt: skip


def device_protocol(proto: dict) -> dict:
    return {**proto, "name": f"{proto['name']}-device", "note": DEVICE_NOTE}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack_data(args) -> None:
    from bidm.data import load_dataset
    from bidm.npz_io import images_to_uint8

    cfg = P.teacher_config(args.data_path, args.teacher)
    d = cfg.data
    images, _ = load_dataset(d.name, path=d.path, split=d.split, size=d.size, channels=d.channels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images_to_uint8(images))
    print(f"wrote {out}: {len(images)} images {tuple(images.shape[1:])}, {out.stat().st_size / 2**20:.1f} MiB, "
          f"sha256 {sha256(out)}")  # fmt: skip


def student_cfg(args, proto: dict, method: str, seed: int, run_dir: Path, data_path: str, overrides: list[str]):
    extra = ["data.name=npz", *overrides]
    return P.student(Path(args.teacher), method, seed, run_dir, data_path, extra, protocol=proto)


def slim_checkpoint(run_dir: Path) -> None:
    """Keep the EMA weights only (what sampling and scoring read), as a checkpoint of the same step and config."""
    ck = checkpoint.load(run_dir)
    checkpoint.save(run_dir / checkpoint.CKPT_NAME, model=ck.weights(use_ema=True), config=ck.config, step=ck.step)


def bundle_run(run_dir: Path, bundle: Path) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    tar_path = bundle / f"{run_dir.name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                tar.add(run_dir / name, arcname=f"{run_dir.name}/{name}")
    if tar_path.stat().st_size > MAX_FILE_BYTES:
        raise SystemExit(f"{tar_path} is {tar_path.stat().st_size / 2**20:.1f} MiB, over a device file's 16 MiB")
    return tar_path


def check_deadline(args, proto: dict, runs: list[tuple[str, int]], data: Path, work: Path) -> None:
    """Time ``--calibrate-steps`` steps of each method (logged step time, warm-up left out) and refuse, before any
    real run starts, a plan whose training alone would not end inside ``--deadline`` seconds (a cut-off call
    returns only the runs it finished)."""
    steps = resolve_recipe(student_cfg(args, proto, runs[0][0], 0, work / "x", str(data), args.overrides)).train.steps
    per_step = {}
    for method in dict.fromkeys(m for m, _ in runs):
        run_dir = work / method
        overrides = ["train.device=auto", *args.overrides, f"train.steps={args.calibrate_steps}",
                     f"train.log_every={max(args.calibrate_steps // 5, 1)}"]  # fmt: skip
        P.train_student(student_cfg(args, proto, method, 0, run_dir, str(data), overrides))
        per_step[method] = step_time(run_dir)
    estimate = sum(steps * per_step[m] for m, _ in runs)
    print(
        "calibration: "
        + ", ".join(f"{m} {t * 1e3:.1f} ms/step" for m, t in per_step.items())
        + f"; {len(runs)} runs x {steps} steps = {estimate:.0f} s of training (deadline {args.deadline} s)"
    )
    if estimate > 0.8 * args.deadline:
        fit = int(0.8 * args.deadline / sum(per_step[m] for m, _ in runs))
        raise SystemExit(f"the plan needs ~{estimate:.0f} s of training, over 80% of --deadline {args.deadline} s; "
                         f"at most ~{fit} steps per run fit (or fewer runs)")  # fmt: skip


def train(args) -> int:
    from bidm.pipeline import ensure_samples

    proto = P.get_protocol(args.protocol)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work, bundle = Path(args.work), Path(args.bundle)
    runs = [(m, int(s)) for m in args.methods.split(",") for s in args.seeds.split(",")]
    if len(runs) > MAX_FILES:
        raise SystemExit(f"{len(runs)} runs: a device call returns at most {MAX_FILES} files (one tar per run)")
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"{data}: no training images; make them with `python bench/device_budget.py pack-data`")
    data_sha = sha256(data)
    if args.deadline:
        check_deadline(args, proto, runs, data, work / "calibrate")
    for method, seed in runs:
        run_dir = work / f"{method}_s{seed}"
        cfg = student_cfg(args, proto, method, seed, run_dir, str(data), ["train.device=auto", *args.overrides])
        t0 = time.perf_counter()
        P.train_student(cfg)
        t1 = time.perf_counter()
        ensure_samples(run_dir, n=proto["n_samples"], steps=proto["sample_steps"], eta=proto["eta"],
                       clip_x0=proto["clip_x0"], seed=seed, batch_size=args.sample_batch, device=device)  # fmt: skip
        t2 = time.perf_counter()
        slim_checkpoint(run_dir)
        manifest = {
            "run": run_dir.name, "method": method, "seed": seed, "protocol": proto["name"],
            "overrides": list(args.overrides), "config_hash": P.config_hash(resolve_recipe(cfg)),
            "commit": args.commit or P.code_version()["commit"], "dirty": False, "epoch": P.CODE_EPOCH,
            "machine": P.machine(), "train_seconds": round(t1 - t0), "sample_seconds": round(t2 - t1),
            "data_sha256": data_sha,
        }  # fmt: skip
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tar_path = bundle_run(run_dir, bundle)
        print(
            f"{run_dir.name}: trained {t1 - t0:.0f} s, sampled {t2 - t1:.0f} s on {device} -> {tar_path}", flush=True
        )
    return 0


def unpack(tar_path: Path, out: Path) -> Path:
    """Extract one run's tar (plain files under one folder, nothing else) into ``out``; returns the run dir."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        names = {m.name.split("/", 1)[0] for m in members}
        bad = [m.name for m in members if not m.isfile() or m.name.count("/") != 1 or m.name.split("/")[1]
               not in RUN_FILES]  # fmt: skip
        if len(names) != 1 or bad or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", next(iter(names))):
            raise SystemExit(f"{tar_path}: not a run bundle of bench/device_budget.py (unexpected {bad or names})")
        run_dir = out / names.pop()
        run_dir.mkdir(parents=True, exist_ok=True)
        for m in members:
            with tar.extractfile(m) as src:
                (run_dir / m.name.split("/")[1]).write_bytes(src.read())
    return run_dir


def score(args) -> int:
    proto = P.get_protocol(args.protocol)
    results = Path(args.results)
    dproto = device_protocol(proto)
    P.check_results_file(results, dproto)
    torch.set_num_threads(args.threads)
    teacher_cfg = P.teacher_config(args.data_path, args.teacher)
    tars = sorted(t for src in args.bundles for t in (Path(src).glob("*.tar") if Path(src).is_dir() else [Path(src)]))
    if not tars:
        raise SystemExit(f"no run bundles (*.tar) in {args.bundles}")
    for tar_path in tars:
        run_dir = unpack(tar_path, Path(args.out))
        man = json.loads((run_dir / "manifest.json").read_text())
        if man["protocol"] != proto["name"]:
            raise SystemExit(f"{tar_path}: trained under {man['protocol']}, not {proto['name']} (pass --protocol)")
        wanted = P.config_hash(resolve_recipe(student_cfg(args, proto, man["method"], man["seed"], run_dir,
                                                          args.data_path, man["overrides"])))  # fmt: skip
        saved = P.config_hash(from_dict(checkpoint.load(run_dir).config))
        if not saved == man["config_hash"] == wanted:
            raise SystemExit(f"{tar_path}: config hash {saved} (manifest {man['config_hash']}) is not the {wanted} "
                             f"the protocol gives {man['run']} here; was it trained from another commit?")  # fmt: skip
        t0 = time.perf_counter()
        result = P.evaluate_run(run_dir, teacher_cfg, n=proto["n_samples"], n_ref=proto["n_ref"],
                                steps=proto["sample_steps"], eta=proto["eta"], seed=man["seed"],
                                features=args.features.split(",") if args.features else None)  # fmt: skip
        result["sample_s"] = man["sample_seconds"]  # sampled on the device: the local call reused its samples
        label = {"method": man["method"], "variant": None, "seed": man["seed"], "dataset": "cifar10"}
        version = {k: man[k] for k in ("commit", "dirty", "epoch")}
        rows = P.rows_for(label, run_dir, version, result, train_s=man["train_seconds"])
        for row in rows:
            row.update(machine=man["machine"], scored_on=P.machine(), data_sha256=man["data_sha256"])
        P.add_rows(results, rows, protocol=dproto)
        inc = result["metrics"]["by_space"].get("inception") or next(iter(result["metrics"]["by_space"].values()))
        print(f"{man['run']} ({rows[0]['steps']} steps, {man['machine']}): FID {inc['fid']:.2f} "
              f"recall {inc['recall']:.4f} (scored in {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if results.resolve().parent == P.RESULTS.resolve() and results.stem in render_results.SECTIONS:
        render_results.main([])  # a committed file with its own bench/RESULTS.md section
    else:
        print(P.render_markdown(P.load_results(results)))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--protocol", default="v3", help="v3 (default) or v2")
    common.add_argument("--teacher", default="bench/teachers/cifar16", help="the committed teacher run")
    common.add_argument("--data-path", default=str(P.ROOT.parent / "shared/data/cifar10"),
                        help="the protocol's CIFAR-10 (pack-data, and the reference images of score)")  # fmt: skip
    a = sub.add_parser("pack-data", parents=[common], help="the protocol's training images as uint8 16x16 (here)")
    a.add_argument("--out", default=".carry/cifar16_train.npz")
    a = sub.add_parser("train", parents=[common], help="train + sample on the device, one tar per run")
    a.add_argument("--data", default=".carry/cifar16_train.npz", help="what pack-data wrote (carried)")
    a.add_argument("--methods", default="bidm,bbcu")
    a.add_argument("--seeds", default="0")
    a.add_argument("--set", dest="overrides", action="append", default=[], help="student overrides (train.steps=..)")
    a.add_argument("--commit", default=None, help="the commit of the tree sent (the device copy has no .git)")
    a.add_argument("--work", default="/tmp/device_budget", help="run directories on the device")
    a.add_argument("--bundle", required=True, help="where the tars go ($OUT on the device)")
    a.add_argument("--sample-batch", type=int, default=1000)
    a.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds the call may take: time each method first and refuse a plan that would not fit",
    )
    a.add_argument("--calibrate-steps", type=int, default=50)
    a = sub.add_parser("score", parents=[common], help="score returned bundles here, append rows to --results")
    a.add_argument("bundles", nargs="+", help="tar files, or folders holding them")
    a.add_argument("--results", required=True, help="the committed results file (one budget per file)")
    a.add_argument("--out", default="bench/out/device_budget", help="where the runs are unpacked")
    a.add_argument("--features", default=None, help="feature spaces (default: the protocol's)")
    a.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "pack-data":
        pack_data(args)
        return 0
    return train(args) if args.command == "train" else score(args)


if __name__ == "__main__":
    sys.exit(main())
