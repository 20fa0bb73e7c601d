"""The block-diffusion mask benchmark runs every case at a tiny length; the verdicts follow given rows."""

from __future__ import annotations

from vzoo.bench_diffusion import CASES, MaskRow, check_diffusion_bar, format_masks, mask_rows


def test_mask_rows_run_every_case():
    rows = mask_rows((64,), repeats=1, block=8)
    assert [(r.mask, r.mode) for r in rows] == list(CASES)
    assert all(r.ms > 0 and r.dense_ms > 0 and 0 < r.density <= 1 for r in rows)
    assert abs(rows[0].density - 0.25 - 1 / 16) < 0.05  # BD3: about a quarter of the 2T x 2T pairs
    assert "block-causal" in format_masks(rows)


def test_verdicts():
    rows = [MaskRow("bd3 (training)", "fwd+bwd", 8192, 10.0, 30.0, 0.25),
            MaskRow("block-causal (prefill)", "fwd", 8192, 10.0, 15.0, 0.5), MaskRow("bd3 (training)", "fwd", 4096, 1.0, 9.0, 0.25)]
    assert check_diffusion_bar(rows) == [
        "PASS bd3 (training) fwd+bwd @8k vs dense 4-D mask through SDPA: 3.00x (bar 2.0x)",
        "FAIL block-causal (prefill) fwd @8k vs dense 4-D mask through SDPA: 1.50x (bar 2.0x)",
    ]
