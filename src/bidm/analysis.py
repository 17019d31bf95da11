"""Where a binary student goes wrong: its epsilon error per timestep, against the FP teacher and the true noise.

Two pure measurements (no training, no files), used by the benches to explain a ranking:

`eps_error_by_timestep` -- the training distribution. For each t of a list, x_t = q_sample(x0, t, eps) of a fixed
batch with fixed eps; returns per t the student's MSE to the teacher's eps and to the true eps (the teacher's own
MSE to the true eps is the floor). A TBS student gets its cache from its own pass at t + ``cache_offset`` on the
same x0 and eps (the previous sampler step's timestep when ``cache_offset`` = T / sampler steps).

`trajectory_eps_error` -- the sampling distribution. The teacher runs DDIM from x_T; at every step the student
sees the teacher's x_t (and, for TBS, its own cache from the previous step of that trajectory), and the MSE of its
eps to the teacher's is recorded. Errors that only appear on the student's own trajectory (drift) are not in it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.diffusion import as_denoiser, ddim_step, ddim_timesteps, q_sample


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean())


def eps_gain(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """<student, teacher> / <teacher, teacher>: the share of the teacher's eps the student reproduces (1 = full
    magnitude; below 1, the student shrinks its eps and the x0 prediction keeps part of the noise)."""
    return float((student * teacher).sum() / teacher.square().sum().clamp_min(1e-30))


def colour_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """MSE of the per-image, per-channel spatial means of the two eps: the part of the error that shifts each
    image's colour as a whole."""
    return _mse(student.mean(dim=(-2, -1)), teacher.mean(dim=(-2, -1)))


@torch.no_grad()
def eps_error_by_timestep(
    student: nn.Module,
    teacher: nn.Module,
    x0: torch.Tensor,
    acp: torch.Tensor,
    t_values: list[int],
    *,
    seed: int = 0,
    cache_offset: int = 10,
) -> list[dict]:
    """Rows {"t", "student_vs_teacher", "student_vs_true", "teacher_vs_true"} (element-mean MSE) per t."""
    student.eval(), teacher.eval()
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    tbs = hasattr(student, "cache_pass")
    rows = []
    for t in t_values:
        tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        x_t = q_sample(x0, tt, eps, acp)
        e_teacher = teacher(x_t, tt)
        if tbs:
            tc = (tt + cache_offset).clamp(max=len(acp) - 1)
            cache = student.cache_pass(q_sample(x0, tc, eps, acp), tc)
            e_student = student(x_t, tt, cache=cache)
        else:
            e_student = student(x_t, tt)
        rows.append(
            {
                "t": int(t),
                "student_vs_teacher": _mse(e_student, e_teacher),
                "student_vs_true": _mse(e_student, eps),
                "teacher_vs_true": _mse(e_teacher, eps),
            }
        )
    return rows


@torch.no_grad()
def trajectory_eps_error(
    student: nn.Module,
    teacher: nn.Module,
    x_T: torch.Tensor,
    acp: torch.Tensor,
    *,
    steps: int = 100,
    eta: float = 0.0,
    clip_x0: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Rows {"t", "student_vs_teacher", "teacher_eps_power", "gain", "colour_error"} per DDIM step, on the
    teacher's trajectory (`eps_gain`, `colour_error`)."""
    student.eval(), teacher.eval()
    s_denoise, t_denoise = as_denoiser(student), as_denoiser(teacher)
    g = torch.Generator().manual_seed(seed)
    seq = ddim_timesteps(steps, len(acp))
    x, s_state, t_state, rows = x_T, None, None, []
    for t, t_prev in zip(reversed(seq), reversed([-1] + seq[:-1])):
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        e_teacher, t_state = t_denoise(x, tt, t_state)
        e_student, s_state = s_denoise(x, tt, s_state)
        rows.append(
            {
                "t": int(t),
                "student_vs_teacher": _mse(e_student, e_teacher),
                "teacher_eps_power": float(e_teacher.square().mean()),
                "gain": eps_gain(e_student, e_teacher),
                "colour_error": colour_error(e_student, e_teacher),
            }
        )
        a_prev = acp[t_prev] if t_prev >= 0 else torch.ones(())
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        x, _ = ddim_step(x, e_teacher, acp[t], a_prev, eta, noise, clip_x0=clip_x0)
    return rows


def bucket_means(rows: list[dict], key: str, edges: tuple[int, ...] = (0, 100, 300, 600, 1000)) -> dict[str, float]:
    """Mean of ``key`` over the rows whose t falls in each [edges[i], edges[i+1]) bucket, keyed "lo-hi"."""
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        values = [r[key] for r in rows if lo <= r["t"] < hi]
        if values:
            out[f"{lo}-{hi}"] = sum(values) / len(values)
    return out
