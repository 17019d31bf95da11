import pytest
import torch

from bidm.errors import CheckpointError, ConfigError
from bidm.unet import (
    DDIMUNet,
    DiffusersUNet,
    UNetConfig,
    load_official_ddim,
    read_official_state_dict,
    tiny_unet_config,
)

# A handful of keys of the official pesser/pytorch_diffusion CIFAR-10 checkpoint (model-790000.ckpt).
OFFICIAL_KEYS = [
    "temb.dense.0.weight",
    "temb.dense.1.bias",
    "conv_in.weight",
    "down.0.block.0.norm1.weight",
    "down.0.block.0.conv1.weight",
    "down.0.block.0.temb_proj.weight",
    "down.1.block.0.nin_shortcut.weight",
    "down.1.attn.0.q.weight",
    "down.1.attn.1.proj_out.bias",
    "down.0.downsample.conv.weight",
    "mid.block_1.conv2.weight",
    "mid.attn_1.k.weight",
    "up.3.block.2.nin_shortcut.weight",
    "up.1.attn.2.v.weight",
    "up.1.upsample.conv.weight",
    "norm_out.weight",
    "conv_out.bias",
]


def test_cifar_unet_has_official_size_and_keys():
    model = DDIMUNet(UNetConfig())
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    keys = set(model.state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert len(model.feature_blocks()) == 25 and model.num_output_blocks() == 12


def test_forward_shape_and_bad_input():
    model = DDIMUNet(tiny_unet_config())
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="expects"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))


def test_feature_blocks_are_modules_in_execution_order():
    model = DDIMUNet(tiny_unet_config())
    names = model.feature_blocks()
    modules = dict(model.named_modules())
    order = []
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in names]
    model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    for h in hooks:
        h.remove()
    assert order == names


class PickledObject:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse it."""


def _official_layout_checkpoint(tmp_path, cfg, layout):
    model = DDIMUNet(cfg)
    sd = model.state_dict()
    if layout == "plain":
        obj = sd
    elif layout == "ddim_list":  # ermongroup/ddim ckpt.pth: [model, optimizer, epoch, step, ema] with DataParallel
        ema = {f"module.{k}": v + 1 for k, v in sd.items()}
        obj = [{f"module.{k}": v for k, v in sd.items()}, {}, 3, 100, ema]
        sd = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    return path, sd


@pytest.mark.parametrize("layout", ["plain", "ddim_list"])
def test_load_checkpoint_in_official_key_layout(tmp_path, layout):
    cfg = tiny_unet_config()
    path, sd = _official_layout_checkpoint(tmp_path, cfg, layout)
    model = load_official_ddim(path, cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    cfg = tiny_unet_config()
    sd = DDIMUNet(cfg).state_dict()
    sd.pop("conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*conv_in.weight.*unexpected 1 keys.*extra.weight"):
        load_official_ddim(tmp_path / "bad.ckpt", cfg)


def test_missing_or_pickled_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="model-790000.ckpt"):
        read_official_state_dict(tmp_path / "nope.ckpt")

    torch.save({"x": PickledObject()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_official_state_dict(tmp_path / "evil.ckpt")


def test_diffusers_unet_loads_from_local_directory(tmp_path):
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    unet.save_pretrained(tmp_path / "unet")
    model = DiffusersUNet.from_pretrained(tmp_path / "unet")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    torch.testing.assert_close(model(x, t), unet(x, t).sample)
    modules = dict(model.named_modules())
    assert all(name in modules for name in model.feature_blocks())
    with pytest.raises(CheckpointError, match="config.json"):
        DiffusersUNet.from_pretrained(tmp_path)


def test_resblock_adds_in_place_only_without_autograd_and_at_the_same_dtype():
    from bidm.unet import _add_to_fresh

    h, other = torch.ones(2, 3), torch.full((2, 3), 2.0)
    with torch.no_grad():
        out = _add_to_fresh(h, other)
    assert out is h and torch.equal(h, torch.full((2, 3), 3.0))  # written into the fresh tensor
    low = torch.ones(2, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        out = _add_to_fresh(low, other)  # as under autocast: the sum is float32, like low + other
    assert out.dtype == torch.float32 and out is not low and torch.equal(low, torch.ones(2, 3, dtype=torch.bfloat16))
    h = torch.ones(2, 3, requires_grad=True)
    out = _add_to_fresh(h, other)
    assert out is not h and out.requires_grad


def test_fp_unet_traces_into_one_graph_without_breaks():
    """``torch.compile`` sees the whole FP UNet as one graph (no Python-side dtype checks breaking it), with and
    without autograd."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = DDIMUNet(tiny_unet_config()).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            dynamo.reset()
            report = dynamo.explain(model)(x, t)
            assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
