"""`bidm demo` end to end at toy budgets, and its ranking sentence."""

import json

from bidm.cli import main
from bidm.commands.demo import load_spread, ranking_sentence


def _rows(**fids):
    return [{"method": m, "feature_space": "domain", "fid": f} for m, f in fids.items()]


def test_ranking_sentence_with_and_without_spread(tmp_path):
    rows = _rows(fp32=3.0, xnor=20.0, bidm=15.0)
    text = ranking_sentence(rows, None)
    assert text.startswith("**bidm**") and "15.00 against 20.00 for xnor" in text and "ratio 0.75" in text
    assert "no seed spread" in text
    spread = {"file": "f.json", "fid": {"bidm": [15.0, 16.0, 14.0], "xnor": [20.0, 21.0, 19.0]}}
    assert "larger than twice the seed spread" in ranking_sentence(rows, spread)  # gap 5 > 2 * 1
    spread["fid"]["xnor"] = [20.0, 24.0, 16.0]  # std 4: gap 5 < 8
    assert "within twice the seed spread" in ranking_sentence(rows, spread)
    assert "no ranking" in ranking_sentence(_rows(fp32=3.0, xnor=20.0), None)
    spread["by_seed"] = {"bidm": {0: 15.0, 1: 16.0, 2: 25.0}, "xnor": {0: 20.0, 1: 24.0, 2: 16.0}}
    text = ranking_sentence(rows, spread)
    assert "Over those seeds bidm scores 18.67 ± 5.51 against 20.00 ± 4.00 and is lower on 2 of 3." in text


def test_load_spread_matches_settings(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"settings": {"a": 1}, "commit": "c", "rows": [{"method": "xnor", "fid": 2.0}]}))
    assert load_spread(path, {"a": 1})["fid"] == {"xnor": [2.0]}
    path.write_text(json.dumps({"settings": {"a": 1}, "rows": [{"method": "xnor", "seed": 4, "fid": 2.0}]}))
    assert load_spread(path, {"a": 1})["by_seed"] == {"xnor": {4: 2.0}}
    assert load_spread(path, {"a": 2}) is None  # other settings: not this demo's spread
    assert load_spread(tmp_path / "missing.json", {"a": 1}) is None


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--teacher-steps", "6", "--student-steps", "3", "--n-samples", "24",
                 "--sample-steps", "3", "--spread", str(tmp_path / "none.json")])  # fmt: skip
    assert code == 0
    report = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["ranking"] in report and {"fp32", "xnor", "bidm"} <= {r["method"] for r in data["rows"]}
    best = min((r for r in data["rows"] if r["method"] != "fp32" and r["feature_space"] == "domain"),
               key=lambda r: r["fid"])  # fmt: skip
    assert data["ranking"].startswith(f"**{best['method']}**")  # the sentence matches the table
    for run in ("fp32", "xnor", "bidm"):
        assert (out / run / "samples.png").is_file()
    assert (out / "bidm" / "packed.safetensors").is_file()
