"""The linear-attention benchmark: every op and the SDPA baseline run at a tiny length, decode rows after a
short context (the op alone and a whole converted layer), and the bar verdicts computed from given rows."""

from __future__ import annotations

from vzoo.bench_linear import (
    PREFILL, DecodeRow, SpeedRow, check_linear_bar, decode_rows, format_decode, format_speed, layer_decode_rows,
    plot_speed, speed_rows,
)
from vzoo.lm import LightningConfig, RATConfig


def test_speed_rows_time_every_op_against_sdpa(tmp_path):
    rows = speed_rows([64], repeats=1, progress=False)
    assert {(r.op, r.mode) for r in rows} == {(op, m) for op in PREFILL for m in ("fwd", "fwd+bwd")}
    assert all(r.ms > 0 and r.sdpa_ms > 0 and r.speedup == r.sdpa_ms / r.ms for r in rows)
    assert "lightning" in format_speed(rows)
    plot_speed(rows, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 0 and not list(tmp_path.glob(".*"))


def test_decode_rows_after_a_short_context():
    rows = decode_rows(contexts=(20, 40), steps=2)
    rows += layer_decode_rows({"sdpa": None, "lightning": LightningConfig(), "rat": RATConfig()}, contexts=(20,), steps=2)
    assert [(r.op, r.context) for r in rows][-3:] == [("sdpa layer", 20), ("lightning layer", 20), ("rat layer", 20)]
    assert all(r.us > 0 for r in rows) and "us/token" in format_decode(rows)


def test_bar_verdicts_follow_the_rows():
    speed = [SpeedRow("lightning", 8192, "fwd", 10.0, 100.0), SpeedRow("lightning", 32768, "fwd", 50.0, 1000.0),
             SpeedRow("lightning", 32768, "fwd+bwd", 300.0, 1000.0), SpeedRow("rat (chunk 16)", 16384, "fwd", 50.0, 100.0)]
    decode = [DecodeRow("lightning", 1024, 10.0), DecodeRow("lightning", 32768, 14.0),
              DecodeRow("rat (chunk 16) layer", 1024, 10.0), DecodeRow("rat (chunk 16) layer", 32768, 16.0)]
    verdicts = dict(line.split(" ", 1)[::-1] for line in check_linear_bar(speed, decode))
    assert verdicts == {
        "lightning fwd vs sdpa @32k: 20.00x (bar 10.0x)": "PASS",
        "lightning fwd time 32k / 8k (at most): 5.00 (bar 4.6)": "FAIL",
        "lightning fwd+bwd vs sdpa @32k: 3.33x (bar 5.0x)": "FAIL",
        "rat (chunk 16) fwd vs sdpa @16k: 2.00x (bar 3.0x)": "FAIL",
        "lightning decode 32k / 1k (at most): 1.40 (bar 1.5)": "PASS",
        "rat (chunk 16) layer decode 32k / 1k (at most): 1.60 (bar 1.5)": "FAIL",
    }
