"""Space Patched Distillation, feature taps and the BiDM training objective (`bidm.distill`)."""

import math

import pytest
import torch

from bidm.diffusion import alphas_cumprod, make_betas
from bidm.distill import LOSSES, DistillObjective, FeatureTaps, l2_feature_loss, patch_index, spd_loss
from bidm.errors import ConfigError
from bidm.tbs import CrossTimestep
from bidm.unet import DDIMUNet, tiny_unet_config


def reference_spd(student, teacher, p=4, per_axis=False):
    """The official loop, written out: slices (cut off at the edge), row-Gram, global norm, un-squared distance."""
    total = 0.0
    for s, t in zip(student, teacher):
        height, width = s.shape[-2:]
        side_r = height if per_axis else width
        hr, hc = side_r // p, width // p
        for i in range(p):
            for j in range(p):
                r, c = i * side_r // p, j * width // p
                maps = []
                for f in (s, t):
                    patch = f[:, :, r : r + hr, c : c + hc]
                    gram = torch.einsum("bcik,bcjk->bcij", patch, patch)
                    norm = gram.norm()
                    maps.append(gram / norm if norm > 0 else gram)
                total += (maps[0] - maps[1]).norm().item() if maps[0].numel() else 0.0
    return total / (len(student) * p * p)


def test_patch_starts_follow_floor_linspace():
    assert patch_index(8, 4).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert patch_index(6, 4).tolist() == [[0], [1], [3], [4]]  # h = 1, gaps at 2 and 5
    assert patch_index(2, 4).shape == (4, 0)  # h = 0: empty patches
    for size in (5, 6, 7, 10, 13):
        starts = torch.linspace(0, size, 5, dtype=torch.float64)[:-1].floor().long()
        assert patch_index(size, 4)[:, 0].tolist() == starts.tolist()


def test_spd_hand_value_with_6x6_and_empty_2x2():
    # every 1x1 patch of the 6x6 pair: student channels (1, 1), teacher (1, 0) -> maps [1,1]/sqrt2 and [1,0]
    s6 = torch.ones(1, 2, 6, 6)
    t6 = torch.ones(1, 2, 6, 6)
    t6[:, 1] = 0
    s2, t2 = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)  # h = 0: contributes 0, counted
    expected = 16 * math.sqrt(2 - math.sqrt(2)) / (2 * 16)
    assert spd_loss([s6, s2], [t6, t2]).item() == pytest.approx(expected, rel=1e-6)
    assert spd_loss([s2], [t2]).item() == 0.0


def test_spd_ignores_pixels_between_6x6_patches():
    s = torch.randn(1, 2, 6, 6)
    t = s.clone()
    t[:, :, 2] += 5.0  # row 2 and column 5 lie in no patch
    t[:, :, :, 5] -= 3.0
    assert spd_loss([s], [t]).item() == 0.0
    t[:, :, 3, 4] += 1.0  # the (3, 4) patch
    assert spd_loss([s], [t]).item() > 0.0


@pytest.mark.parametrize("per_axis", [False, True])
def test_spd_matches_reference_loop(per_axis):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 8, 8), (2, 3, 6, 6), (2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 4, 8), (2, 3, 12, 8)]
    student = [torch.randn(s, generator=g) for s in shapes]
    teacher = [torch.randn(s, generator=g) for s in shapes]
    got = spd_loss(student, teacher, per_axis=per_axis).item()
    assert got == pytest.approx(reference_spd(student, teacher, per_axis=per_axis), rel=1e-5)


def test_spd_zero_for_identical_features_and_gradients_finite():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = spd_loss([s], [s.detach().clone()])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()
    z = torch.zeros(2, 3, 8, 8, requires_grad=True)  # all-zero maps: guarded, no NaN
    loss = spd_loss([z], [torch.randn(2, 3, 8, 8)])
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(z.grad).all()


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, 8, requires_grad=True)
    (spd_loss([s], [t]) + l2_feature_loss([s], [t])).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_l2_feature_loss_and_registry():
    s = [torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 4, 4)]
    t = [torch.zeros(1, 1, 2, 2), torch.full((1, 1, 4, 4), 2.0)]
    assert l2_feature_loss(s, t).item() == pytest.approx((1.0 + 4.0) / 2)
    assert sorted(LOSSES) == ["l2", "none", "spd"]
    with pytest.raises(ValueError, match="shape"):
        spd_loss([torch.zeros(1, 1, 4, 4)], [torch.zeros(1, 1, 8, 8)])


def test_feature_taps_record_each_forward():
    model = DDIMUNet(tiny_unet_config(resolution=8))
    names = model.feature_blocks()
    taps = FeatureTaps(model, names)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    model(x, t)
    first = taps.get()
    assert len(first) == len(names) and first[0].shape == (1, 32, 8, 8)
    model(x + 1, t)
    assert not torch.equal(taps.get()[0], first[0])
    taps.clear()
    with pytest.raises(RuntimeError, match="did not run"):
        taps.get()
    taps.remove()
    model(x, t)
    assert taps.features == {}


def make_student_and_objective(tbs=True, **kw):
    torch.manual_seed(0)
    teacher = DDIMUNet(tiny_unet_config(resolution=8))
    student = DDIMUNet(tiny_unet_config(resolution=8))
    student.load_state_dict(teacher.state_dict())
    if tbs:
        student = CrossTimestep(student, n_blocks=2)
    return student, DistillObjective(teacher, alphas_cumprod(make_betas()), **kw)


class Wrapped(torch.nn.Module):
    """Stands in for a DDP/Accelerate wrapper: the student is its ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize(
    ("tbs", "kw", "feat_key"),
    [
        (True, {}, "spd"),
        (False, {"feature_loss": "l2", "loss_reduction": "sum", "loss_kind": "l1", "output_kd": 0.5}, "feat"),
        (True, {"feature_loss": "none", "antithetic": True}, "feat"),
    ],
)
def test_objective_forward_backward(tbs, kw, feat_key):
    student, objective = make_student_and_objective(tbs, **kw)
    x0 = torch.randn(4, 3, 8, 8)
    loss, logs = objective(Wrapped(student), x0, torch.Generator().manual_seed(1))
    loss.backward()
    assert set(logs) == {"loss", "simple", feat_key, "kd"}
    assert logs["loss"] == pytest.approx(
        logs["simple"] + objective.lam * logs[feat_key] + objective.output_kd * logs["kd"]
    )
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert student.unet.conv_out.weight.grad is not None if tbs else student.conv_out.weight.grad is not None
    if tbs:
        assert student.alpha.grad is not None and student.alpha.grad.abs().sum() > 0
    # the same generator state gives the same loss (exact resume)
    loss2, _ = objective(student, x0, torch.Generator().manual_seed(1))
    assert loss2.item() == loss.item()


def test_objective_spd_zero_when_student_equals_teacher_without_cache():
    student, objective = make_student_and_objective(tbs=False)
    _, logs = objective(student, torch.randn(2, 3, 8, 8), torch.Generator().manual_seed(0))
    assert logs["spd"] == pytest.approx(0.0, abs=1e-6)
    assert objective.teacher.training is False
    objective.train()
    assert objective.teacher.training is False
    assert [p.requires_grad for p in objective.parameters()] == [False] * len(list(objective.parameters()))


def test_objective_rejects_bad_options():
    student, objective = make_student_and_objective(tbs=False)
    with pytest.raises(ConfigError, match="feature_loss"):
        DistillObjective(objective.teacher, objective.acp, feature_loss="kl")
    with pytest.raises(ConfigError, match="need a teacher"):
        DistillObjective(None, objective.acp)
    with pytest.raises(ConfigError, match="CrossTimestep"):
        DistillObjective(objective.teacher, objective.acp, tbs=True)(
            student, torch.randn(1, 3, 8, 8), torch.Generator()
        )


def test_tiling_patches_take_the_reshape_path_and_equal_the_gather():
    from bidm.distill import gather_patches, patch_index

    feat = torch.randn(2, 3, 8, 8)
    rows = cols = patch_index(8, 4)
    gathered = feat[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    fast = gather_patches(feat, rows, cols)
    assert fast.shape == gathered.shape == (2, 3, 4, 4, 2, 2)
    assert torch.equal(fast, gathered)
    assert fast.data_ptr() == feat.data_ptr()  # a view: no copy
    odd = torch.randn(1, 2, 6, 6)
    r6 = patch_index(6, 4)
    assert torch.equal(gather_patches(odd, r6, r6), odd[:, :, r6[:, None, :, None], r6[None, :, None, :]])
