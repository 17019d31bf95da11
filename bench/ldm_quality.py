"""Latent diffusion at CPU scale (issue 11): a first stage trained here, an LDM teacher on its latents, XNOR and BiDM
students under one budget, samples decoded and scored with the Inception metrics against the images.

Stages (each cached in its run directory, so the bench resumes after an interruption; the first stage also
checkpoints every 200 steps):
    1. first stage: a KL autoencoder (diffusers AutoencoderKL, f = 2, 3 latent channels) trained on the CIFAR-10
       training images at 32x32 with L1 + 1e-6 KL (LDM's KL weight; no LPIPS/GAN at this scale); reconstruction
       PSNR on 1000 test images goes into every row;
    2. teacher: `bidm.ldm.unet.LDMUNet` trained on its 16x16x3 latents (scale_by_std, LDM's sqrt-linear schedule),
       latents cached on disk (`first_stage.latent_cache`);
    3. students: the teacher binarized with xnor and bidm, same recipe (configs/recipes/cpu_cifar16.yaml's budget and
       optimizer), same data order and x_T per seed;
    4. DDIM samples decoded by the first stage and scored (FID / sFID / precision / recall, Inception and domain
       spaces) against ``n_ref`` CIFAR-10 training images at 32x32.
The first stage's own reconstructions of the test images are scored the same way: the floor every latent model
decodes through. Rows (the quality bench's fields plus ``first_stage_psnr`` and ``first_stage_recon_fid``) go to
bench/results/ldm_cpu.json and are rendered into bench/RESULTS.md.

    python bench/ldm_quality.py                       # the full CPU run (2 h 15 min on a 2-core AMD EPYC)
    python bench/ldm_quality.py --smoke --out /tmp/s  # tiny end-to-end check on the built-in digits (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

from bidm.config import load_config  # noqa: E402
from bidm.pipeline import (  # noqa: E402
    ensure_metrics,
    ensure_samples,
    ensure_student,
    ensure_summary,
    ensure_teacher,
    student_config,
)

RESULTS_FILE = P.RESULTS / "ldm_cpu.json"
PROTOCOL = {
    "name": "ldm-cpu-v1",
    "dataset": "CIFAR-10 train, 32x32, through a KL-f2 first stage (16x16x3 latents) trained by this bench",
    "teacher_config": "bench/ldm_quality.py TEACHER (LDM UNet ch 32, mult [1,2,2], attn at 8x8, 3000 steps)",
    "recipe": "configs/recipes/cpu_cifar16.yaml's optimizer and losses at lr 5e-4 (its value when ldm-cpu-v1 was "
    "measured), 1500 steps, TBS on the last 2 output blocks",
    "n_samples": 1000,
    "n_ref": 5000,
    "sample_steps": 50,
    "eta": 1.0,
    "clip_x0": False,  # latents are not in [-1, 1]
    "features": ["inception", "domain"],
}
# Sized to finish inside one session on 2 cores (measured on a 2-core AMD EPYC: 2 h 15 min, ~20 min of it the
# 5000 Inception refs). Timed per step with 2 threads, the ch-64 models of the first attempt cost 5.0 s per AE
# step (batch 64), 0.9 s per teacher step and 2.6 s per 250-sample forward, about 7 h in all. At ch 32 an AE step
# at batch 32 is ~1 s, a teacher step 0.39 s, a 250-sample forward 1.0 s. The first stage's test PSNR and the FID
# of its own reconstructions go into every row, so a weaker first stage is visible.
FULL = dict(ae_steps=600, ae_batch=32, teacher_steps=3000, student_steps=1500, batch=32, methods=("xnor", "bidm"))
SMOKE = dict(ae_steps=4, ae_batch=8, teacher_steps=3, student_steps=2, batch=8, methods=("xnor", "bidm"))
FIRST_STAGE = ["first_stage.kind=kl", "first_stage.ch=32", "first_stage.ch_mult=[1, 2]",
               "first_stage.num_res_blocks=1", "first_stage.z_channels=3", "first_stage.embed_dim=3",
               "first_stage.scale_by_std=true"]  # fmt: skip
TEACHER = ["model.arch=ldm", "model.ch=32", "model.ch_mult=[1, 2, 2]", "model.num_res_blocks=2",
           "model.attn_resolutions=[8]", "model.num_head_channels=32", "model.dropout=0.0", "model.in_channels=3",
           "model.out_ch=3", "model.resolution=16", "diffusion.schedule=sqrt_linear", "diffusion.beta_start=0.0015",
           "diffusion.beta_end=0.0195", "train.lr=2e-4", "train.ema_decay=0.999", "train.ckpt_every=500"]  # fmt: skip
SMOKE_MODEL = ["first_stage.ch=32", "model.ch=32", "model.ch_mult=[1, 2]", "model.num_res_blocks=1",
               "model.resolution=8", "model.attn_resolutions=[4]", "model.num_head_channels=16"]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=str(P.ROOT.parent / "shared/data/cifar10"), help="CIFAR-10 .npz dir")
    p.add_argument("--out", default="bench/out/ldm_cpu", help="run directories")
    p.add_argument("--results", default=str(RESULTS_FILE), help="results file (rows are merged into it)")
    p.add_argument("--seeds", default="0", help="comma-separated student seeds")
    p.add_argument("--smoke", action="store_true", help="tiny models on the built-in digits, domain metrics only")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the CPU)")
    return p.parse_args(argv)


def data_overrides(args) -> list[str]:
    if args.smoke:
        return ["data.name=digits", "data.channels=3", "data.size=16", "data.workers=0"]
    return ["data.name=cifar10", f"data.path={args.data_path}", "data.size=32", "data.workers=0"]


AE_CKPT_EVERY = 200


def first_stage_config(args, ckpt: Path | None = None):
    smoke = SMOKE_MODEL[:1] if args.smoke else []
    return load_config(
        None, [*data_overrides(args), *FIRST_STAGE, *smoke, *([f"first_stage.ckpt={ckpt}"] if ckpt else [])]
    )


def reconstruct(fs, images: torch.Tensor) -> torch.Tensor:
    """``images`` through the first stage and back (posterior mean), in batches of 100."""
    with torch.no_grad():
        return torch.cat([fs.decode(fs.moments(b).chunk(2, dim=1)[0]) for b in images.split(100)])


def _save_ae_state(path: Path, ae, opt, g: torch.Generator, step: int) -> None:
    """The AE, its Adam moments, both RNG states and the step, atomically (safetensors), for an exact resume."""
    from safetensors.torch import save_file

    from bidm.fileio import atomic_write

    params = list(ae.parameters())
    tensors = {f"ae.{k}": v.contiguous() for k, v in ae.state_dict().items()}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).reshape(-1).clone()
    tensors["rng.data"], tensors["rng.torch"] = g.get_state(), torch.get_rng_state()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}))


def _load_ae_state(path: Path, ae, opt, g: torch.Generator) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ae.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ae.")})
    for i, p in enumerate(ae.parameters()):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = {k: (v.reshape(()) if k == "step" else v.reshape(p.shape)) for k, v in state.items()}
    g.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    return step


def train_first_stage(args, budget: dict, out: Path) -> tuple[Path, float]:
    """Train the KL autoencoder (cached); returns (its .safetensors, test PSNR in dB)."""
    from safetensors.torch import save_file

    from bidm.data import load_dataset
    from bidm.fileio import atomic_write, atomic_write_text
    from bidm.ldm.first_stage import FirstStage, build_autoencoder

    path, stats = out / "first_stage.safetensors", out / "first_stage.json"
    if path.is_file() and stats.is_file():
        return path, json.loads(stats.read_text())["psnr_db"]
    cfg = first_stage_config(args)
    d = cfg.data
    train, _ = load_dataset(d.name, path=d.path, split="train", size=d.size, channels=d.channels)
    test = train[-64:] if args.smoke else load_dataset(d.name, path=d.path, split="test", size=d.size)[0][:1000]
    torch.manual_seed(0)
    ae = build_autoencoder(cfg.first_stage).train()
    opt = torch.optim.Adam(ae.parameters(), lr=4.5e-4 if not args.smoke else 1e-3, betas=(0.5, 0.9))  # LDM's AE
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    partial = out / "first_stage.partial.safetensors"  # every AE_CKPT_EVERY steps: a kill loses at most that
    start = _load_ae_state(partial, ae, opt, g) if partial.is_file() else 0
    if start:
        print(f"first stage: resumed at step {start}", flush=True)
    for step in range(start, budget["ae_steps"]):
        if step > start and step % AE_CKPT_EVERY == 0:
            _save_ae_state(partial, ae, opt, g, step)
        x = train[torch.randint(0, len(train), (budget["ae_batch"],), generator=g)]
        post = ae.encode(x).latent_dist
        rec = ae.decode(post.sample(generator=None)).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % AE_CKPT_EVERY == 0:
            print(f"first stage step {step + 1}: loss {loss.item():.4f}", flush=True)
    rec = reconstruct(FirstStage(ae, "kl", 1.0), test)
    mse = ((rec - test.clamp(-1, 1)) / 2).pow(2).mean().item()  # in [0, 1] pixel units
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, tmp))
    atomic_write_text(stats, json.dumps({"psnr_db": psnr, "steps": budget["ae_steps"],
                                         "seconds": round(time.perf_counter() - t0)}) + "\n")  # fmt: skip
    partial.unlink(missing_ok=True)
    print(f"first stage: test PSNR {psnr:.2f} dB", flush=True)
    return path, psnr


def first_stage_floor(args, ae_path: Path, out: Path, teacher_cfg, n: int, n_ref: int, spaces: list[str]) -> dict:
    """Metrics of the first stage's reconstructions of the first ``n`` test images (cached in ``first_stage_recon``):
    the floor every latent model's samples are decoded through, scored exactly as they are."""
    from bidm.data import load_dataset
    from bidm.fileio import atomic_write_text
    from bidm.ldm.first_stage import FirstStage, load_autoencoder
    from bidm.npz_io import images_to_uint8, save_samples_npz

    run_dir = out / "first_stage_recon"
    if not (run_dir / "samples.json").is_file():
        cfg = first_stage_config(args, ae_path)
        d = cfg.data
        split, pick = ("train", slice(-n, None)) if args.smoke else ("test", slice(0, n))
        images = load_dataset(d.name, path=d.path, split=split, size=d.size, channels=d.channels)[0][pick]
        rec = reconstruct(FirstStage(load_autoencoder(cfg.first_stage)[0], "kl", 1.0), images)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_samples_npz(run_dir / "samples.npz", images_to_uint8(rec))
        atomic_write_text(run_dir / "samples.json", json.dumps({"n": n, "source": f"{split} reconstructions"}))
    return ensure_metrics(run_dir, teacher_cfg, feature_spaces={s: n for s in spaces}, n_ref=n_ref)


def add_rows(path: Path, rows: list[dict]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    keys = {(r["method"], r["seed"], r["feature_space"]) for r in rows}
    kept = [r for r in data["rows"] if (r["method"], r["seed"], r["feature_space"]) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": PROTOCOL, "rows": kept + rows}, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = SMOKE if args.smoke else FULL
    out = Path(args.out)
    n, n_ref, steps, eta = (PROTOCOL[k] for k in ("n_samples", "n_ref", "sample_steps", "eta"))
    spaces = ["domain"] if args.smoke else PROTOCOL["features"]
    if args.smoke:
        n, n_ref, steps = 16, 64, 4
    version = P.code_version()
    ae_path, psnr = train_first_stage(args, budget, out)
    common = [*data_overrides(args), *FIRST_STAGE, f"first_stage.ckpt={ae_path}",
              f"first_stage.latent_cache={out / 'latents'}"]  # fmt: skip
    teacher = [*common, *TEACHER, *(SMOKE_MODEL if args.smoke else []), f"out_dir={out / 'teacher'}",
               f"train.steps={budget['teacher_steps']}", f"train.batch_size={budget['batch']}"]  # fmt: skip
    teacher_cfg = load_config(None, teacher)
    t0 = time.perf_counter()
    teacher_dir = ensure_teacher(teacher_cfg)
    runs = [("fp32", 0, teacher_dir, time.perf_counter() - t0)]
    recipe = P.ROOT / "configs/recipes/cpu_cifar16.yaml"
    for method in budget["methods"]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            overrides = [f"train.seed={seed}", f"sample.seed={seed}", f"train.steps={budget['student_steps']}",
                         f"train.batch_size={budget['batch']}", "train.lr=5e-4", "binarize.train_cache=t+1",
                         "binarize.train_cache_noise=same"]  # fmt: skip
            cfg = student_config(teacher_dir, method, out / f"{method}_s{seed}", overrides, recipe=recipe)
            t0 = time.perf_counter()
            runs.append((method, seed, ensure_student(cfg), time.perf_counter() - t0))
    rows = []
    for method, seed, run_dir, train_s in runs:
        t0 = time.perf_counter()
        ensure_samples(run_dir, n=n, steps=steps, eta=eta, clip_x0=False, seed=seed, batch_size=250)
        t1 = time.perf_counter()
        summary = ensure_summary(run_dir)
        metrics = ensure_metrics(run_dir, teacher_cfg, feature_spaces={s: n for s in spaces}, n_ref=n_ref)
        result = {"metrics": metrics, "summary": summary, "sample_s": t1 - t0, "score_s": time.perf_counter() - t1}
        label = {"method": method, "variant": None, "seed": seed, "dataset": "digits" if args.smoke else "cifar10"}
        for row in P.rows_for(label, run_dir, version, result, train_s=train_s):
            rows.append({**row, "first_stage_psnr": round(psnr, 2)})
        space = spaces[0]
        print(f"{method} seed {seed}: {space} FID {metrics['by_space'][space]['fid']:.2f}", flush=True)
    floor = first_stage_floor(args, ae_path, out, teacher_cfg, n, n_ref, spaces)
    for row in rows:
        row["first_stage_recon_fid"] = round(floor["by_space"][row["feature_space"]]["fid"], 2)
    print(f"first-stage reconstructions: {space} FID {floor['by_space'][space]['fid']:.2f}", flush=True)
    add_rows(Path(args.results), rows)
    if Path(args.results).resolve() == RESULTS_FILE.resolve():
        import render_results

        render_results.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
