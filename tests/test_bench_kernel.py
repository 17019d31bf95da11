"""bench/sample_speed.py and bench/kernel.py run end to end at toy size, and render_results renders their JSON
(no timings are checked: speed targets live in bench/)."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_speed_quick_writes_rows_and_kernel_table_renders(tmp_path):
    speed, kernel, render = (_bench_module(n) for n in ("sample_speed", "kernel", "render_results"))
    out = tmp_path / "kernel.json"
    assert speed.main(["--quick", "--batches", "1", "--steps", "1", "--out", str(out)]) == 0
    traj = json.loads(out.read_text())["trajectories"]
    assert {"commit", "machine", "threads", "loadavg_1min", "rows"} <= set(traj)
    fp, xnor = traj["rows"]
    assert (fp["model"], xnor["model"], xnor["batch"], xnor["steps"]) == ("fp32", "xnor", 1, 1)
    assert xnor["finite"] and xnor["peak_rss_mb"] > 0 and xnor["speedup"] > 0
    shape = {"cin": 70, "cout": 13, "h": 6, "w": 5, "stride": 1, "padding": 1, "count": 2, "example": "x"}
    row = {"net": "ddim-cifar10", **kernel.bench_conv(shape, 1, 1)}
    assert row["packed_ms"] > 0 and row["gemm_ms"] > 0
    kernel.merge_json(out, "kernel", {"commit": "abc", "machine": "m", "threads": 2, "loadavg_1min": 0.1,
                                      "kernel": {"backend": "c"}, "convs": [row], "conv_totals": kernel.totals([row]),
                                      "steps": []})  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data) == {"trajectories", "kernel"}
    md = render.kernel_section(data)
    assert "70→13" in md and "images/s" in md and "| xnor | 1 | 1 |" in md


def test_gemm_micro_runs_every_shape(capsys):
    import pytest

    from bidm.export import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    micro = _bench_module("gemm_micro")
    assert micro.main(["--threads", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "MR" in out and out.count(" ms") == len(micro.SHAPES)


def test_full_step_with_bf16_reference_on_the_tiny_unet():
    kernel = _bench_module("kernel")
    (row,) = kernel.bench_steps(kernel.tiny_unet_config(), "xnor", [1], 1, bf16=True)
    assert row["fp_ms"] > 0 and row["packed_ms"] > 0 and row["fp_bf16_ms"] > 0
    assert 0 < row["fp_bf16_rel_err"] < 0.1  # bfloat16 keeps ~3 significant digits
    assert row["packed_bf16_rel_err"] >= 0
    assert abs(row["speedup_vs_bf16"] - row["fp_bf16_ms"] / row["packed_ms"]) < 1e-9 * row["speedup_vs_bf16"]


def test_norm_speed_quick_writes_rows_that_render(tmp_path):
    import pytest

    from bidm.export import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    speed, render = _bench_module("norm_speed"), _bench_module("render_results")
    out = tmp_path / "kernel.json"
    assert speed.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    norms = json.loads(out.read_text())["norms"]
    assert norms["net"] == "tiny" and {r["batch"] for r in norms["rows"]} == {1, 2}
    assert all(r["fused_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in norms["rows"])
    assert sum(r["count"] for r in norms["rows"] if r["batch"] == 1) > 5  # every GroupNorm of the forward
    md = render.kernel_section(json.loads(out.read_text()))
    assert "GroupNorm + SiLU" in md and "All GroupNorm + SiLU of one forward" in md


def test_ab_step_toggles_a_switch_in_one_process(tmp_path, monkeypatch):
    import os

    ab = _bench_module("ab_step")
    monkeypatch.setenv("BIDM_PREPARED", "1")
    out = tmp_path / "ab.json"
    argv = ["--switch", "BIDM_PREPARED", "--quick", "--methods", "bidm", "--rounds", "2", "--calls", "1",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    assert ab.main(argv) == 0
    assert os.environ["BIDM_PREPARED"] == "1"  # restored
    (row,) = json.loads(out.read_text())["ab"]["BIDM_PREPARED@1"]["rows"]
    assert row["n_per_side"] == 2 and row["on_min_ms"] > 0 and row["off_min_ms"] > 0
    assert row["max_abs_diff"] == 0.0  # the prepared and the general calls run the same C code on the same data


def test_packed_parity_on_a_tiny_student(tmp_path, capsys):
    from tiny import TINY

    from bidm import checkpoint
    from bidm.config import from_dict, load_config, to_dict
    from bidm.models import build_model

    cfg = from_dict(to_dict(load_config(None, TINY + ["binarize.method=bidm", "binarize.tbs_blocks=2"])))
    state = build_model(cfg).state_dict()
    checkpoint.save(tmp_path / "run" / checkpoint.CKPT_NAME, model=state, ema=state, config=to_dict(cfg), step=1)
    parity = _bench_module("packed_parity")
    rows = parity.parity(str(tmp_path / "run"), 2, [999, 10])
    assert [r["t"] for r in rows] == [999, 10]
    assert all(r["generic"] == 0.0 and r["fused"] < 1e-4 for r in rows)
    assert parity.main([str(tmp_path / "run"), "--n", "2", "--t", "5"]) == 0
    assert "| 5 |" in capsys.readouterr().out
