"""The vzoo command and the benchmark helpers behind it, on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from vzoo import bench
from vzoo.cli import entry, main
from vzoo.registry import OPS, Method, methods, register_method


def test_list_shows_ops_and_backends(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    assert "cpu: runs with reference, torch" in out
    assert "flex (forward only)" in out
    for method in ("biformer", "overlock", "vmoba", "psa", "moba"):  # everything that works is listed
        assert f"  {method} [" in out


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "--repeats", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--device", "tpu"])


def test_kernel_rows_measure_and_check_tiny_case(tmp_path):
    rows = bench.kernel_rows([256], [2], block=64, heads=2, head_dim=16, repeats=1, flex=False, progress=False)
    assert {(r.mode, r.provider) for r in rows} == {("fwd", "sdpa"), ("fwd", "vzoo"), ("fwd+bwd", "sdpa"), ("fwd+bwd", "vzoo")}
    by = {(r.mode, r.provider): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert by[mode, "sdpa"].speedup == 1.0
        assert by[mode, "vzoo"].speedup == pytest.approx(by[mode, "sdpa"].ms / by[mode, "vzoo"].ms)
    assert rows[0].density == pytest.approx(0.5)
    assert by["fwd", "vzoo"].max_abs_err < 1e-4
    assert bench.check_bar(rows) == []  # the bar is defined on S=8192, 6 of 64 blocks only
    faked = [bench.Row(8192, 6, 0.094, r.mode, r.provider, r.ms, r.speedup, r.tflops) for r in rows]
    verdicts = bench.check_bar(faked)
    assert [v.split()[0] for v in verdicts] == ["PASS" if by["fwd", "vzoo"].speedup >= 6 else "FAIL",
                                                "PASS" if by["fwd+bwd", "vzoo"].speedup >= 4 else "FAIL"]
    assert "fwd vs sdpa" in verdicts[0] and "fwd+bwd vs sdpa" in verdicts[1]
    png = tmp_path / "k.png"
    bench.save_plot(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vzoo" in bench.format_table(rows)


def test_neighborhood_rows_time_both_backends():
    fast, ref = bench.neighborhood_rows((1, 8, 9, 11, 5, 2), repeats=1)
    assert (fast.name, ref.name) == ("torch", "reference") and fast.ms > 0 and ref.ms > 0


def test_video_rows_measure_fidelity_on_a_small_grid():
    from vzoo.bench_video import format_video, video_rows

    rows = video_rows((4, 8, 8), heads=2, dim=16, repeats=1)
    assert [r.method for r in rows][0] == "dense sdpa" and len(rows) == 5
    for r in rows[1:]:
        assert r.ms > 0 and 0 < r.density <= 1 and 0 <= r.rel_l2 < 1 and 0 < r.recall <= 1 + 1e-6
    assert "psa balanced" in format_video(rows)


def test_random_layout_density():
    lay = bench.random_layout(1, 2, 1024, 64, 4, torch.device("cpu"))
    assert torch.all(lay.kv_num_blocks == 4) and lay.density() == pytest.approx(4 / 16)


def test_registry_validates_methods(monkeypatch):
    import vzoo.registry

    monkeypatch.setattr(vzoo.registry, "_METHODS", {})
    with pytest.raises(ValueError, match="unknown ops"):
        Method("x", "paper", "0000.00000", "vision", ("no_such_op",), "ok")
    with pytest.raises(ValueError, match="modality"):
        Method("x", "paper", "0000.00000", "audio", ("block_sparse_attention",), "ok")
    m = Method("test_method_only", "paper", "0000.00000", "vision", ("block_sparse_attention",), "ok")
    register_method(m)
    assert m in methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method(m)


def test_backbone_rows_and_table():
    import timm

    import vzoo  # noqa: F401

    rows = bench.backbone_rows(
        {"a": lambda: timm.create_model("test_biformer"), "b": lambda: timm.create_model("test_biformer", depths=(1, 1, 1, 1))},
        batch=2, size=112, repeats=1, progress=False,
    )
    assert [r.name for r in rows] == ["a", "b"] and rows[1].params_m < rows[0].params_m
    assert all(r.train_ms > 0 and r.eval_ms > 0 for r in rows)
    table = bench.format_models(rows, "a")
    assert "1.00" in table.splitlines()[2] and "MB" not in table
    rows[0].train_mb, rows[0].eval_mb = 10.0, 2.0
    assert "train MB" in bench.format_models(rows, "a")


def test_peak_memory_of_a_training_step_exceeds_inference():
    """peak_memory_mb is meant for a fresh process (benchmarks/backbones.py starts one per model)."""
    import subprocess
    import sys

    code = (
        "import sys, timm, vzoo; from vzoo.bench import peak_memory_mb; "
        "print(peak_memory_mb(lambda: timm.create_model('test_biformer'), sys.argv[1], batch=8, size=112))"
    )
    mb = {}
    for mode in ("train", "eval"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        mb[mode] = float(done.stdout.split()[-1])
    assert 0 < mb["eval"] < mb["train"] < 2000


def test_console_entry_reports_bad_input_in_one_line(tmp_path, capsys):
    assert entry(["train", "lm-gates", "--model", str(tmp_path), "--data", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vzoo: error: ") and "config.json" in err and "Traceback" not in err
