"""The trained-routing benchmark: every speed case runs at a tiny length, the bar verdicts follow given rows,
and the retrieval fine-tune runs end to end at its quick budget (softmax pre-training, then each method)."""

from __future__ import annotations

from vzoo.bench_routing import CASES, SpeedRow, check_routing_bar, format_speed, retrieval_rows, speed_rows


def test_speed_rows_run_every_case(monkeypatch):
    import vzoo.bench_routing as br

    monkeypatch.setattr(br, "LANDMARK_BLOCK", 7)
    rows = speed_rows([96], repeats=1, progress=False)
    assert {(r.op, r.mode, r.baseline) for r in rows} == set(CASES)
    assert all(r.ms > 0 and r.baseline_ms > 0 and r.speedup == r.baseline_ms / r.ms for r in rows)
    assert "routing attention" in format_speed(rows)


def test_bar_verdicts_follow_the_rows():
    speed = [SpeedRow("landmark grouped softmax", "fwd+bwd", 8192, 100.0, "dense masked reference", 250.0),
             SpeedRow("routing attention", "fwd", 16384, 10.0, "causal sdpa", 50.0),
             SpeedRow("routing attention", "fwd+bwd", 16384, 100.0, "causal sdpa", 50.0)]
    retrieval = [{"label": "softmax (pre-training)", "accuracy": 0.5}, {"label": "landmark", "accuracy": 0.93},
                 {"label": "routing", "accuracy": None}]
    assert check_routing_bar(speed, retrieval) == [
        "FAIL landmark fwd+bwd vs dense masked reference @8k: 2.50x (bar 3.0x)",
        "PASS routing fwd vs causal sdpa @16k: 5.00x (bar 3.0x)",
        "PASS retrieval accuracy landmark: 0.930 (bar 0.9)",
        "FAIL retrieval accuracy routing: failed (bar 0.9)",
    ]


def test_retrieval_rows_quick():
    rows = retrieval_rows(quick=True)
    assert [r["label"] for r in rows] == ["softmax (pre-training)", "landmark (block 8)", "routing (4 clusters, segment 16)"]
    assert all(r["error"] is None and 0.0 <= r["accuracy"] <= 1.0 and r["curve"] for r in rows)
    assert rows[0]["train"]["steps"] == 40 and rows[1]["train"]["steps"] == 20
