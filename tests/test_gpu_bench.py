"""bench/gpu.py (the GPU machine's one script) runs every path on CPU with --device cpu --smoke, and fails loudly."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_smoke_runs_every_path_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _gpu_bench().main(["--device", "cpu", "--smoke", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["smoke"]
    paths = {r["path"]: r for r in result["rows"]}
    assert list(paths) == ["teacher", "xnor", "xnor packed", "bidm", "bidm packed"]
    for name in ("teacher", "xnor", "bidm"):
        assert paths[name]["step_s"] > 0 and paths[name]["img_per_s_fp32"] > 0 and paths[name]["peak_mib"] > 0
    assert paths["bidm packed"]["packed_bytes"] > 0 and paths["bidm packed"]["img_per_s"] > 0
    assert "| bidm packed |" in capsys.readouterr().out


def test_gpu_bench_exits_non_zero_when_a_path_fails(tmp_path):
    out = tmp_path / "gpu.json"
    rc = _gpu_bench().main(["--device", "cpu", "--smoke", "--methods", "nosuchmethod", "--work", str(tmp_path / "w"),
                            "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 1 and not result["ok"]
    assert "nosuchmethod" in next(r["error"] for r in result["rows"] if r["path"] == "nosuchmethod")
