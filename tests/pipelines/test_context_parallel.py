"""vzoo sparse attention under diffusers context parallelism (Ulysses): two gloo processes on CPU give
the one-process output for every family with a plan, every method and both setup orders; what vzoo
cannot serve exactly (ring attention, a backend without SDPA, a sequence slice) raises."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vzoo.pipelines import apply_sparse_attention
from vzoo.pipelines.parallel import check_parallel

_spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).with_name("tiny_models.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

WORKER = Path(__file__).with_name("cp_worker.py")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the two ranks once; their saved outputs and error messages."""
    out = tmp_path_factory.mktemp("cp")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", port, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return out


@pytest.mark.parametrize("order", ["cp_first", "vzoo_first"])
@pytest.mark.parametrize("method", sorted(tiny.CONTEXT_PARALLEL_CASES))
@pytest.mark.parametrize("family", tiny.CONTEXT_PARALLEL_FAMILIES)
def test_ulysses_equals_one_process(two_ranks, family, method, order):
    model, inputs = tiny.context_parallel_model(family)
    with apply_sparse_attention(model, tiny.CONTEXT_PARALLEL_CASES[method]), torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
    got = torch.from_numpy(np.load(two_ranks / f"{family}-{method}-{order}.npy"))
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5


def test_ranks_take_the_fallback_decision_of_the_whole_call(two_ranks):
    assert [(two_ranks / f"decided-{r}.txt").read_text() for r in range(2)] == ["True", "True"]


def test_shared_density_decides_on_the_reduced_density():
    from vzoo.kernels.break_even import dense_is_faster, shared_density

    assert not dense_is_faster(0.0, "cpu", "psa")
    with shared_density(lambda d: d + 1.0):
        assert dense_is_faster(0.0, "cpu", "psa")
    assert not dense_is_faster(0.0, "cpu", "psa")


@pytest.mark.parametrize("order", ["cp_first", "vzoo_first"])
def test_ring_attention_is_refused(two_ranks, order):
    assert "ring_degree=2" in (two_ranks / f"ring-{order}.txt").read_text()


def _parallel(ring: int = 1, ulysses: int = 2):
    from diffusers import ContextParallelConfig, ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))


class _Processor:
    _attention_backend = None
    _parallel_config = None


def test_check_parallel_names_what_it_refuses():
    proc = _Processor()
    check_parallel(proc)  # no context parallelism: nothing to check
    proc._parallel_config = _parallel()
    check_parallel(proc)  # Ulysses on the native backend
    proc._parallel_config = _parallel(ring=2, ulysses=1)
    with pytest.raises(RuntimeError, match="ring_degree=2"):
        check_parallel(proc)
    proc._parallel_config, proc._attention_backend = _parallel(), "flash"
    with pytest.raises(RuntimeError, match="'flash'.*set_attention_backend"):
        check_parallel(proc)


def test_setup_order_and_remove_keep_the_parallel_config():
    """diffusers sets ``_parallel_config`` / ``_attention_backend`` on whatever processor is installed: on
    vzoo's wrapper they reach the stock processor, and ``remove()`` leaves them in place."""
    model, _ = tiny.context_parallel_model("wan")
    stock = model.blocks[0].attn1.processor
    handle = apply_sparse_attention(model, tiny.CONTEXT_PARALLEL_CASES["vmoba"])
    wrapper = model.blocks[0].attn1.processor
    config = _parallel()
    wrapper._parallel_config = config
    wrapper._attention_backend = "native"
    assert stock._parallel_config is config and stock._attention_backend == "native"
    assert wrapper._parallel_config is config
    handle.remove()
    assert model.blocks[0].attn1.processor is stock and stock._parallel_config is config


def test_a_sequence_slice_under_context_parallelism_raises():
    """A call holding fewer tokens than the grid while context parallelism is on (a slice: ring, or a
    plan that did not gather) raises instead of attending to the slice; without it vzoo warns and
    falls back as before."""
    model, inputs = tiny.context_parallel_model("wan")
    handle = apply_sparse_attention(model, tiny.CONTEXT_PARALLEL_CASES["vmoba"])
    wrapper = model.blocks[0].attn1.processor
    with torch.no_grad():
        model(**inputs)  # records the grid
    q = torch.randn(1, 2, 100, 16)  # 100 of 256 tokens
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.warns(UserWarning, match="do not hold the latent grid"):
        wrapper._attend(tiny.CONTEXT_PARALLEL_CASES["vmoba"], sdpa, (q, q, q), {})
    wrapper.original._parallel_config = _parallel()
    with pytest.raises(RuntimeError, match="only a slice of the sequence"):
        wrapper._attend(tiny.CONTEXT_PARALLEL_CASES["vmoba"], sdpa, (q, q, q), {})
    handle.remove()


def _frames(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    with Image.open(path) as video:
        return [np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(video)]


def test_generate_with_ulysses_matches_one_process(tmp_path, capsys, monkeypatch):
    """``torchrun --nproc_per_node 2 ... vzoo generate --ulysses 2``: rank 0 writes the video, its frames
    match the one-process run within one level of 255 (lossless animated PNG: a GIF's palette could turn
    a rounding flip into several levels), and the density of each rank is reported."""
    from vzoo.cli import entry, main

    tiny.save_wan_pipeline(tmp_path / "pipe")
    args = ["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a cat runs in the snow", "--method", "vmoba",
            "--frames", "13", "--height", "64", "--width", "64", "--steps", "3"]
    assert main(args + ["--out", str(tmp_path / "one.png")]) == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
         "-m", "vzoo.cli", *args, "--ulysses", "2", "--out", str(tmp_path / "two.png")],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "per rank" in run.stdout and run.stdout.count("wrote ") == 1, run.stdout + run.stderr[-4000:]
    one, two = _frames(tmp_path / "one.png"), _frames(tmp_path / "two.png")
    assert len(one) == len(two) == 13
    assert max(int(np.abs(a - b).max()) for a, b in zip(one, two)) <= 1
    capsys.readouterr()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert entry(args + ["--ulysses", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("vzoo: error: --ulysses 2 needs 2 processes")
    assert not (tmp_path / "x.png").exists()
