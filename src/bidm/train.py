"""The one training loop (FP teachers and binarized students alike), on HF Accelerate.

The loop knows nothing about binarization: it calls an *objective* ``objective(model, x0, generator, shard) ->
(loss, logs)``, steps Adam/AdamW with gradient clipping, updates an EMA, logs (tqdm, TensorBoard, ``log.jsonl``) and
checkpoints atomically. A run directory is locked while a run writes it (`bidm.lock`); a resumed run checks the new
config against the stored one (`bidm.resume`) and drops ``log.jsonl`` entries past the checkpoint. Exact resume:
every random draw of step k comes from generators seeded by (seed, step), and the data order of epoch e from
(seed, e), so a run killed and resumed from its last checkpoint ends bit-identical (on CPU) to an uninterrupted
one; nothing but weights, EMA, optimizer state and the step needs saving. Weights or EMA holding NaN/inf are never
saved (`TrainingDiverged`; the last good checkpoint stays).

Data parallel (``accelerate launch`` / ``torchrun``): process r of W trains on rows r, r+W, ... of each global batch
(`bidm.shard.BatchShard`), gradients are averaged by DDP, and t, eps and every other per-sample draw come from a
generator seeded alike on every process and drawn for the whole global batch, so a run's weights do not depend on
the process count (up to float summation order) and it resumes on any number of processes. Only dropout masks are
drawn per process. The frozen teacher lives in the objective, which is never wrapped for gradient sync. EMA, logs
and checkpoints are on the main process; the logged values are global-batch means.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm.auto import tqdm

from bidm import checkpoint
from bidm.config import Config, from_dict, save_yaml, to_dict
from bidm.diffusion import alphas_cumprod, eps_loss, make_betas, q_sample
from bidm.errors import BidmError, CheckpointError, ConfigError, TrainingDiverged
from bidm.fileio import atomic_write_text
from bidm.shard import BatchShard, whole
from bidm.stream import stream_batches, tensor_batches


class EpsObjective(nn.Module):
    """Plain DDPM training: L_simple(eps_hat, eps) at a uniformly drawn t."""

    def __init__(self, acp: torch.Tensor, *, reduction: str = "mean", kind: str = "l2"):
        super().__init__()
        self.register_buffer("acp", acp, persistent=False)
        self.reduction, self.kind = reduction, kind

    def forward(self, model, x0, generator, shard: BatchShard | None = None):
        shard = shard or whole(x0)
        t = shard.take(torch.randint(0, len(self.acp), (shard.n,), generator=generator)).to(x0.device)
        eps = shard.randn(tuple(x0.shape[1:]), generator).to(x0.device)
        loss = eps_loss(model(q_sample(x0, t, eps, self.acp), t), eps, self.reduction, self.kind)
        return loss, {"loss": loss.item()}


class EMA:
    """EMA of every float tensor of the state dict, with LDM's warm-up: decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def follow(self, model: nn.Module) -> None:
        """Move every shadow tensor to the device of the model's tensor of the same name (after the model was
        moved, e.g. by ``accelerator.prepare``); an EMA left on the CPU would fail at the first CUDA update."""
        state = model.state_dict()
        self.shadow = {k: v.to(state[k].device) if k in state else v for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                self.shadow[name].copy_(value)


def schedule(cfg: Config) -> torch.Tensor:
    d = cfg.diffusion
    return alphas_cumprod(make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)).float()


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay or 0.01)
    raise ConfigError(f"train.optimizer must be 'adam' or 'adamw', got {t.optimizer!r}")


def warmup_factor(step: int, warmup_steps: int, start: float = 1e-6) -> float:
    """LDM's LambdaLinearScheduler (one cycle): the lr factor rises linearly from ``start`` to 1 over
    ``warmup_steps``, then stays 1."""
    if step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


class BatchOrder:
    """Epoch-wise seeded permutations: the global batch of step k is the same however the run was interrupted."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the dataset size {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size  # the last partial batch is dropped
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def trim_log(text: str, step: int) -> str:
    """The ``log.jsonl`` lines up to and including ``step`` (entries a resumed run would repeat are dropped, as is
    a line cut short by a kill)."""
    kept = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            kept.append(line + "\n")
    return "".join(kept)


def _restore(ck, cfg: Config, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer) -> list[str]:
    """Load a checkpoint into the run after checking the config change (`bidm.resume`); returns the notes."""
    from bidm.resume import check_resume
    from bidm.unet import load_state_dict_reporting

    notes = check_resume(to_dict(from_dict(ck.config)), to_dict(cfg), source=str(ck.path))
    if ck.optimizer is None:
        raise CheckpointError(f"{ck.path} holds no optimizer state, so it cannot be resumed exactly")
    load_state_dict_reporting(model, ck.model, source=str(ck.path))
    if ema is not None:  # the main process keeps the EMA
        ema_state = ck.weights(use_ema=True)
        if set(ema_state) != set(ema.shadow):
            raise CheckpointError(f"{ck.path}: its EMA tensors do not match the model's state dict")
        ema.shadow = {k: v.clone() for k, v in ema_state.items()}
    fresh = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ck.optimizer)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{ck.path}: its optimizer state does not fit the model ({err})") from None
    for group, values in zip(optimizer.param_groups, fresh):  # the config's lr / weight decay, not the stored ones
        group.update(values)
    return notes


def use_cpu(device: str) -> bool:
    """``train.device`` -> Accelerate's ``cpu`` flag; asking for CUDA where there is none is an error, not a silent
    fall-back to the CPU. (Which GPU a process gets is the launcher's choice: ``LOCAL_RANK``.)"""
    if device == "auto":
        return not torch.cuda.is_available()
    if device == "cpu":
        return True
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available here (use auto or cpu)")
        return False
    raise ConfigError(f"train.device must be auto, cpu or cuda, got {device!r}")


def run(
    cfg: Config,
    model: nn.Module,
    objective: nn.Module,
    images: torch.Tensor,
    *,
    out_dir: str | Path,
    resume: bool = False,
    extra_meta: dict[str, str] | None = None,
) -> Path:
    """Train ``model`` on ``images`` (float [N,C,H,W] in [-1, 1], or a dataset of such items streamed through a
    DataLoader, `bidm.stream`) and return the checkpoint path.

    The main process holds `bidm.lock.RunLock` on ``out_dir`` for the whole run.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / checkpoint.CKPT_NAME
    if ckpt_path.exists() and not resume:
        raise BidmError(f"{ckpt_path} exists: pass --resume to continue it, or choose another output directory")
    torch.manual_seed(cfg.train.seed)
    accelerator = Accelerator(
        cpu=use_cpu(cfg.train.device),
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(out_dir),
    )
    from bidm.lock import RunLock

    with RunLock(out_dir) if accelerator.is_main_process else contextlib.nullcontext():
        return _run_locked(cfg, model, objective, images, accelerator, out_dir, resume, extra_meta)


def _run_locked(cfg, model, objective, images, accelerator, out_dir: Path, resume: bool, extra_meta) -> Path:
    t = cfg.train
    ckpt_path = out_dir / checkpoint.CKPT_NAME
    if ckpt_path.exists() and not resume:  # again, under the lock: another run may have written it meanwhile
        raise BidmError(f"{ckpt_path} exists: pass --resume to continue it, or choose another output directory")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    main = accelerator.is_main_process
    ema = EMA(model, t.ema_decay) if main else None  # EMA, logs and checkpoints live on the main process only
    start = 0
    if resume and ckpt_path.exists():
        ck = checkpoint.load(ckpt_path)
        notes = _restore(ck, cfg, model, ema, optimizer)
        start = ck.step
        if ema is not None:
            ema.num_updates = start
        if start > t.steps:
            raise ConfigError(
                f"{ckpt_path} is at step {start}, past train.steps={t.steps}: raise train.steps to go on"
            )
        accelerator.print(f"resumed {ckpt_path} at step {start}")
        for note in notes:
            accelerator.print(f"  resume: {note}")
    log_path = out_dir / "log.jsonl"
    if accelerator.is_main_process and log_path.exists():
        text = log_path.read_text(errors="replace")
        kept = trim_log(text, start)
        if kept != text:
            atomic_write_text(log_path, kept)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = objective.to(accelerator.device)
    raw_model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.follow(raw_model)  # built (and resumed) from the model before prepare moved it
    if main:
        save_yaml(cfg, out_dir / "config.yaml")
    accelerator.init_trackers("tensorboard")
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.print(f"training on {world} process{'es' if world > 1 else ''} ({accelerator.device}), global batch "
                      f"{t.batch_size}")  # fmt: skip
    order = BatchOrder(len(images), t.batch_size, t.seed)
    if isinstance(images, torch.Tensor):
        batches = tensor_batches(images, order, start, t.steps, rank=rank, world=world)
    else:  # a streamed dataset (bidm.stream): the same order, read by DataLoader workers
        batches = stream_batches(images, order, start, t.steps, rank=rank, world=world, workers=cfg.data.workers)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def save(step: int) -> None:
        bad = checkpoint.first_nonfinite(raw_model.state_dict()) or (ema and checkpoint.first_nonfinite(ema.shadow))
        if bad is not None:
            raise TrainingDiverged(
                f"tensor {bad!r} holds NaN/inf after step {step} (the weights diverged); not saved. The last good "
                f"checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Lower train.lr."
            )
        if main:
            checkpoint.save(
                ckpt_path,
                model=raw_model.state_dict(),
                ema=ema.shadow,
                optimizer=optimizer.state_dict(),
                config=to_dict(cfg),
                step=step,
                extra_meta=extra_meta,
            )

    log_file = open(log_path, "a") if main else None
    try:
        bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="train", disable=not main)
        tick = time.perf_counter()
        for step in bar:
            torch.manual_seed(step_seed(t.seed, step, rank))  # dropout masks: the one per-process draw
            generator = torch.Generator().manual_seed(step_seed(t.seed, step) + 1)  # t, eps, ...: global (shard)
            shard = BatchShard(t.batch_size, rank, world)
            x0 = next(batches).to(accelerator.device)  # rows shard.take(order.indices(step)) of the data
            if t.warmup_steps:  # a function of the step alone, so a resumed run gets the same rate
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * warmup_factor(step, t.warmup_steps)
            if hasattr(objective, "before_step"):
                objective.before_step(raw_model, step, t.steps)
            model.train()
            loss, logs = objective(model, x0, generator, shard)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step}; stopped without saving. The last good checkpoint "
                    f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Lower train.lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients; weight each by its rows so unequal shards give the global mean
            accelerator.backward(loss * (shard.size * world / shard.n) if shard.n % world else loss)
            if t.grad_clip > 0:
                logs["grad_norm"] = float(accelerator.clip_grad_norm_(params, t.grad_clip))
            optimizer.step()
            if ema is not None:
                ema.update(raw_model)
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                logs = _global_mean(accelerator, logs, shard)
                logs["step_time_s"] = (time.perf_counter() - tick) / t.log_every
                tick = time.perf_counter()
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=step + 1)
                if log_file:
                    log_file.write(json.dumps({"step": step + 1, **logs}) + "\n")
                    log_file.flush()
            if (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps:
                save(step + 1)
    finally:
        if log_file:
            log_file.close()
    accelerator.wait_for_everyone()  # the checkpoint is complete before any process returns
    accelerator.end_training()
    return ckpt_path


def _global_mean(accelerator, logs: dict[str, float], shard: BatchShard) -> dict[str, float]:
    """The logged values as means over the global batch (each process's value weighted by its rows)."""
    if shard.world == 1:
        return logs
    keys = sorted(logs)
    local = torch.tensor([float(logs[k]) * shard.size for k in keys] + [float(shard.size)], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    return {k: float(v / total[-1]) for k, v in zip(keys, total[:-1])}


def train_teacher(cfg: Config, *, resume: bool = False) -> Path:
    """Train the FP UNet of ``cfg.model`` on ``cfg.data``; returns the checkpoint path."""
    from bidm.data import load_training_images
    from bidm.unet import build_unet

    if cfg.binarize.method != "none":
        raise ConfigError("train_teacher trains FP models; binarized students go through bidm.qat.train_student")
    images = load_training_images(cfg)
    objective = EpsObjective(schedule(cfg), reduction=cfg.train.loss_reduction, kind=cfg.train.loss_kind)
    if cfg.first_stage.kind != "none":  # latent diffusion: the UNet learns the first stage's latents
        from bidm.ldm.latents import prepare_latents

        cfg, images, wrap = prepare_latents(cfg, images)
        objective = wrap(objective)
    else:
        c, h = images[0].shape[0], images[0].shape[-1]
        if c != cfg.model.in_channels or h != cfg.model.resolution:
            raise ConfigError(
                f"data gives [{c}, {h}, {h}] images but the model expects in_channels={cfg.model.in_channels}, "
                f"resolution={cfg.model.resolution}: set model.in_channels/model.out_ch/model.resolution or data.size"
            )
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    model = build_unet(cfg.model)
    return run(cfg, model, objective, images, out_dir=cfg.out_dir, resume=resume)
