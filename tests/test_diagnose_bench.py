"""bench/diagnose.py runs end to end on a tiny random teacher, with the per-block feature table."""

import importlib.util
import json
import sys
from pathlib import Path

from tiny import save_random_teacher

ROOT = Path(__file__).resolve().parent.parent


def test_diagnose_blocks_table_on_init_students(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "bench" / "diagnose.py")
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    teacher = save_random_teacher(tmp_path / "teacher", ["data.name=digits"])
    out = tmp_path / "diag.json"
    argv = ["init:xnor", "init:bidm", "--teacher", str(teacher), "--n", "2", "--steps", "4", "--traj-only",
            "--blocks", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert diagnose.main(argv) == 0
    printed = capsys.readouterr().out
    students = json.loads(out.read_text())["students"]
    blocks = students["init:xnor"]["blocks"]
    assert set(blocks) == set(students["init:bidm"]["blocks"]) and "conv_in" in blocks
    assert all(len(b["l2"]) == 4 and len(b["t"]) == 4 for b in blocks.values())
    assert blocks["conv_in"]["l2"] == [0.0] * 4  # the FP first conv sees the teacher's x_t: no error
    assert max(max(b["l2"]) for b in blocks.values()) > 0
    assert "| block | init:xnor t<100 | all | init:bidm / first, t<100 | all |" in printed
    assert printed.count("| conv_in |") == 1
