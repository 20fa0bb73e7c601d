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


def test_kernel_rows_pair_each_provider_with_its_baseline(tmp_path, monkeypatch):
    """Speed-ups and TFLOP/s from given medians (12 and 3 ms forward, 40 and 8 ms forward+backward)."""
    medians = iter([12.0, 3.0, 40.0, 8.0])  # sdpa then vzoo, fwd then fwd+bwd
    monkeypatch.setattr(bench, "median_ms", lambda fn, device, repeats: next(medians))
    rows = bench.kernel_rows([256], [2], block=64, heads=2, head_dim=16, repeats=1, flex=False, progress=False)
    by = {(r.mode, r.provider): r for r in rows}
    assert set(by) == {("fwd", "sdpa"), ("fwd", "vzoo"), ("fwd+bwd", "sdpa"), ("fwd+bwd", "vzoo")}
    assert [by["fwd", p].speedup for p in ("sdpa", "vzoo")] == [1.0, 4.0]
    assert [by["fwd+bwd", p].speedup for p in ("sdpa", "vzoo")] == [1.0, 5.0]
    layout = bench.random_layout(1, 2, 256, 64, 2, torch.device("cpu"))
    pairs = int(layout.to_block_mask().sum()) * 64 * 64  # selected (query, key) token pairs
    assert rows[0].density == pytest.approx(pairs / (2 * 256 * 256))
    assert by["fwd", "vzoo"].tflops == pytest.approx(4 * 16 * pairs / 3.0 / 1e9)  # 2 matmuls of 2 FLOPs per pair and dim
    assert by["fwd", "vzoo"].max_abs_err < 1e-4
    png = tmp_path / "k.png"
    bench.save_plot(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_bar_on_hand_made_rows():
    def row(mode, provider, ms, speedup, case=bench.BAR_CASE):
        return bench.Row(*case, 0.094, mode, provider, ms, speedup, 0.0)

    rows = [row("fwd", "sdpa", 60.0, 1.0), row("fwd", "vzoo", 10.0, 6.0), row("fwd", "flex", 8.0, 7.5),
            row("fwd+bwd", "sdpa", 390.0, 1.0), row("fwd+bwd", "vzoo", 100.0, 3.9), row("fwd", "vzoo", 1.0, 99.0, (4096, 6))]
    assert bench.check_bar(rows) == [
        "PASS S=8192 blocks=6 fwd vs sdpa: 6.00x (bar 6.0x)",
        "FAIL S=8192 blocks=6 fwd vs compiled flex: 0.80x (bar 0.9x)",
        "FAIL S=8192 blocks=6 fwd+bwd vs sdpa: 3.90x (bar 4.0x)",
    ]
    assert bench.check_bar(rows[-1:]) == []  # the bar is defined on its case only
    table = bench.format_table(rows).splitlines()
    assert table[4].split() == ["8192", "6", "0.094", "fwd", "flex", "8.00", "7.50", "0.000"]


def test_neighborhood_rows_time_the_same_work_on_both_backends(monkeypatch):
    import vzoo.kernels

    seen = {}
    real = vzoo.kernels.neighborhood_aggregate

    def recording(attn, value, k, backend):
        seen[backend] = real(attn, value, k, backend=backend)
        return seen[backend]

    monkeypatch.setattr(vzoo.kernels, "neighborhood_aggregate", recording)
    monkeypatch.setattr(bench, "median_ms", lambda fn, device, repeats: fn() or 1.0)
    fast, ref = bench.neighborhood_rows((1, 8, 9, 11, 5, 2), repeats=1)
    assert (fast.name, ref.name) == ("torch", "reference") and set(seen) == {"torch", "reference"}
    assert seen["torch"].shape == (1, 2, 9, 11, 4)
    torch.testing.assert_close(seen["torch"], seen["reference"])  # same inputs, same result


def test_video_rows_measure_the_methods_they_name():
    """The rel. L2 column of each VMoBA row is that of vmoba_attention on the same inputs, against SDPA."""
    import torch.nn.functional as F

    from vzoo.bench_video import format_video, structured_qkv, video_rows
    from vzoo.vmoba import VMoBAConfig, vmoba_attention

    grid = (4, 8, 8)
    rows = video_rows(grid, heads=2, dim=16, repeats=1)
    assert [r.method.split()[0] for r in rows] == ["dense", "vmoba", "vmoba", "vmoba", "psa"]
    q, k, v = structured_qkv(grid, 2, 16)
    dense = F.scaled_dot_product_attention(q, k, v)
    for layer, row in enumerate(rows[1:4]):
        out = vmoba_attention(q, k, v, grid, layer, VMoBAConfig())
        assert row.rel_l2 == pytest.approx(((out - dense).norm() / dense.norm()).item(), rel=1e-5)
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
    assert [r.name for r in rows] == ["a", "b"]
    for row, model in zip(rows, (timm.create_model("test_biformer"), timm.create_model("test_biformer", depths=(1, 1, 1, 1)))):
        assert row.params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    rows[0].train_ms, rows[0].eval_ms, rows[1].train_ms, rows[1].eval_ms = 200.0, 50.0, 100.0, 75.0
    table = bench.format_models(rows, "a")
    assert table.splitlines()[3].split()[2:] == ["100", "0.50", "75", "1.50"] and "MB" not in table
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


def test_console_entry_lets_an_import_error_through(monkeypatch):
    """An ImportError is a bug in vzoo or its install, not bad input: no one-line message hides it."""
    import vzoo.cli

    def broken(argv):
        raise ImportError("cannot import name 'gone' from 'vzoo'")

    monkeypatch.setattr(vzoo.cli, "main", broken)
    with pytest.raises(ImportError, match="gone"):
        entry([])


OWN_OPTIONS = {  # what only this task of `vzoo train` takes
    "reid": {"--attention"},
    "detect": {"--detector", "--rois-per-image"},
    "ground": {"--text-encoder"},
    "lm-gates": {"--block-size"},
    "lm-boundaries": {"dhsa_boundaries"},  # its --out default; its other options are shared
}


@pytest.mark.parametrize("task", list(OWN_OPTIONS))
def test_each_train_task_lists_only_its_own_options(task, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", task, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for other, options in OWN_OPTIONS.items():
        for option in options:
            assert (option in out) == (other == task), (task, option)
    assert ("--eval-every" in out) == (not task.startswith("lm-"))
    assert ("--seq-len" in out) == task.startswith("lm-")


def test_argument_errors_are_one_line_naming_the_argument(capsys):
    for argv, name in [(["bench", "--repeats", "0"], "--repeats"), (["bench", "--device", "tpu"], "--device"),
                       (["train", "detect", "--model", "m", "--data", "d", "--out", "o", "--rois-per-image", "x"], "--rois-per-image"),
                       (["train", "reid", "--model", "m", "--data", "d", "--out", "o", "--detector", "retinanet"], "--detector"),
                       (["train", "ground", "--data", "d", "--out", "o"], "--model")]:
        with pytest.raises(SystemExit) as stop:
            entry(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("vzoo: error: ") and err.count("\n") == 1 and name in err, (argv, err)


def test_bench_extra_installs_what_every_bench_family_imports():
    """`pip install -e ".[bench]" && vzoo bench --quick` shows every family: the language-model rows need transformers."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extra = {Requirement(r).name for r in project["optional-dependencies"]["bench"]}
    assert {"transformers", "matplotlib"} <= extra


def test_experiment_icl_linear_writes_its_files(tmp_path, capsys):
    import json

    assert main(["experiment", "icl-linear", "--out", str(tmp_path), "--steps", "5", "--heads", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["bar"]) >= 4 and all(line.split()[0] in ("PASS", "FAIL") for line in metrics["bar"])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("training.png", "heads.png", "lengths.png"))
    assert "zero-sum" in capsys.readouterr().out.lower()


def test_analyze_rhythm_on_a_saved_model(tmp_path, capsys):
    import json

    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat sat on mat and dog ran far away".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "m")
    cfg = LlamaConfig(vocab_size=len(words) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(words * 8))
    assert main(["analyze", "rhythm", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "o"), "--max-tokens", "64"]) == 0
    report = json.loads((tmp_path / "o" / "rhythm.json").read_text())
    assert len(report["tokens"]) == 64 and (tmp_path / "o" / "rhythm.png").stat().st_size > 0
    assert "rhythm.json" in capsys.readouterr().out
