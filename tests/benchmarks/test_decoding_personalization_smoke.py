"""benchmarks/decoding_personalization.py at the smallest size: it trains, generates with every method and
writes its table and JSON."""

from __future__ import annotations

import json


def test_decoding_benchmark_smoke(load_benchmark, tmp_path, capsys) -> None:
    bench = load_benchmark("decoding_personalization")
    out = tmp_path / "result.json"
    result = bench.main(["--users", "2", "--rounds", "1", "--prompts", "1", "--samples", "1", "--max-new-tokens",
                         "4", "--strengths", "1.0", "--weights", "2.0", "--out", str(out)])
    rows = {(r["method"], r["weight"]): r for r in result["rows"]}
    assert set(rows) == {("global", 0.0), ("weights", 1.0), ("logits", 2.0)}
    assert rows[("global", 0.0)]["win_rate"] == 0.5 and all(0.0 <= r["win_rate"] <= 1.0 for r in rows.values())
    assert all(r["tokens_per_s"] > 0 for r in rows.values()) and rows[("logits", 2.0)]["forwards_per_token"] == 2
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    printed = capsys.readouterr().out
    assert "| logit mixing (DeRa) | 2 |" in printed and '"win_rate"' in printed.splitlines()[-1]
