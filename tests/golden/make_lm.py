"""Golden outputs for the language-model methods, made once by the official code.

    python tests/golden/make_lm.py --moba PATH/TO/MoBA --seer PATH/TO/SeerAttention

``PATH`` must be a git checkout of the official repository (its commit is recorded in the fixture):

- MoBA (https://github.com/MoonshotAI/MoBA): ``moba.wrapper.moba_layer`` around the pure-torch
  ``moba.moba_naive.moba_attn_varlen_naive`` (prefill, GQA) -> ``tests/golden/moba.pt``.
- SeerAttention (https://github.com/microsoft/SeerAttention): the prefill-sparse ``AttnGate``
  (``seer_attn/prefill_sparse/attn_gate.py``: pooling, per-head projections, RoPE, scores), its
  threshold selection (``seer_attn/modules/common.py``) and the self-distillation target
  (``seer_attn/modules/attention_distill.py``: the Triton attention-pooling kernel, run by Triton's
  interpreter without a GPU) -> ``tests/golden/seer_gate.pt``.

Only these files are imported (their packages' ``__init__`` imports CUDA-only code); ``flash_attn``
(imported at their top for unrelated functions) is replaced by a stub that raises if called. The gate's block RoPE ``cos, sin`` are
inputs computed with the default RoPE formula of the official ``LlamaRotaryEmbedding`` (base
``rope_theta``, width = gate hidden size, positions ``0, block, 2 block, ...``); the official modeling
file itself needs transformers 4.x and does not import under 5.x. Tiny sizes, fixed seeds, fp32.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from vzoo.atomic import write_atomic

HERE = Path(__file__).resolve().parent
MOBA_URL = "https://github.com/MoonshotAI/MoBA"
SEER_URL = "https://github.com/microsoft/SeerAttention"


def _commit(path: Path, marker: str) -> str:
    """The checked-out commit of the repository at ``path``; exits unless it holds ``marker``."""
    if not (path / marker).is_file():
        sys.exit(f"make_lm: error: {path} is not a checkout of the official repository (no {marker})")
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        sys.exit(f"make_lm: error: {path} is not a git checkout (its commit must be recorded)")


def _stub_flash_attn() -> None:
    """``flash_attn`` modules whose every attribute is a function that raises (never called here)."""

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def fn(*_, **__):
            raise RuntimeError(f"flash_attn.{name} is a stub in make_lm.py")
        return fn

    for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.layers", "flash_attn.layers.rotary",
                 "flash_attn.flash_attn_interface"):
        mod = types.ModuleType(name)
        mod.__getattr__ = missing  # type: ignore[attr-defined]
        mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = mod


def _package(name: str, path: Path) -> None:
    """Register ``name`` as a package at ``path`` without running its ``__init__`` (which imports CUDA code)."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]  # type: ignore[attr-defined]
    sys.modules[name] = mod


def make_moba(root: Path) -> dict:
    commit = _commit(root, "moba/moba_naive.py")
    _stub_flash_attn()
    _package("moba", root / "moba")
    wrapper = importlib.import_module("moba.wrapper")
    naive = importlib.import_module("moba.moba_naive").moba_attn_varlen_naive
    config_cls = importlib.import_module("moba.config").MoBAConfig

    class Module:  # what moba_layer reads from the transformers attention module
        is_causal = True

    cases = []
    # (batch, q heads, kv heads, seq, head dim, chunk, topk): ragged last chunk, GQA, top-1, topk > chunks
    for i, (b, hq, hkv, s, d, chunk, topk) in enumerate(
        [(2, 4, 2, 61, 16, 8, 3), (1, 2, 2, 64, 8, 16, 2), (1, 4, 1, 40, 16, 8, 1), (1, 2, 1, 24, 8, 8, 5)]
    ):
        g = torch.Generator().manual_seed(100 + i)
        q = torch.randn(b, hq, s, d, generator=g)
        k = torch.randn(b, hkv, s, d, generator=g)
        v = torch.randn(b, hkv, s, d, generator=g)
        out, _ = wrapper.moba_layer(naive, config_cls(moba_chunk_size=chunk, moba_topk=topk), Module(), q, k, v)
        cases.append(dict(q=q, k=k, v=v, chunk_size=chunk, topk=topk, out=out.reshape(b, s, hq, d).clone()))
    return dict(repo=MOBA_URL, commit=commit, function="moba.wrapper.moba_layer(moba_attn_varlen_naive, ...)",
                layout="q [B, Hq, S, D], k, v [B, Hkv, S, D]; out [B, S, Hq, D]; scale D**-0.5", cases=cases)


def _rope(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The default RoPE of the official ``LlamaRotaryEmbedding``: ``cos, sin [B, N, dim]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def make_seer(root: Path) -> dict:
    commit = _commit(root, "seer_attn/prefill_sparse/attn_gate.py")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the official Triton kernels are defined
    _stub_flash_attn()
    _package("seer_attn", root / "seer_attn")
    gates = importlib.import_module("seer_attn.prefill_sparse.attn_gate")
    common = importlib.import_module("seer_attn.modules.common")

    cases = []
    # (q pooling, k pooling, batch, q heads, kv heads, seq, head dim, hidden, block, force_double)
    for i, (qp, kp, b, hq, hkv, s, d, hidden, block, force) in enumerate(
        [(("avg",), ("max", "min", "avg"), 2, 4, 2, 61, 16, 16, 8, False),  # the official default gate
         (("max", "avg"), ("max", "min"), 1, 4, 2, 48, 16, 8, 8, False),
         (("avg",), ("max", "min", "avg"), 1, 2, 1, 40, 8, 8, 4, True)]
    ):
        kind = f"Q{''.join(qp)}_K{''.join(kp)}"
        torch.manual_seed(200 + i)
        gate = gates.ATTNGATE_CLASSES[kind](block, d, hidden, num_k_head=hkv, num_q_head=hq, force_double=force)
        for p in gate.parameters():  # the official leaves them uninitialised (torch.Tensor); draw them here
            torch.nn.init.normal_(p, std=0.5)
        q = torch.randn(b, s, hq, d)  # official layout [B, S, H, D], before RoPE
        k = torch.randn(b, s, hkv, d)
        nb = -(-s // block)
        positions = torch.arange(s)[None].expand(b, s)[:, ::block]
        cos, sin = _rope(positions, hidden, 10000.0)
        mask = torch.triu(torch.full((nb, nb), torch.finfo(torch.float32).min), diagonal=1)[None, None].expand(b, 1, nb, nb)
        with torch.no_grad():
            logits = gate(q, k, mask, (cos, sin), use_softmax=False)
            probs = gate(q, k, mask, (cos, sin), use_softmax=True)
        threshold = 1.5 / nb
        cases.append(dict(
            gate_type=kind, q_pooling=qp, k_pooling=kp, block_size=block,
            hidden=hidden, force_double=force, q=q, k=k, cos=cos, sin=sin, rope_theta=10000.0,
            state_dict={k_: v_.clone() for k_, v_ in gate.state_dict().items()}, logits=logits, probs=probs,
            threshold=threshold,
            selected=common.get_sparse_attn_mask_from_threshold(probs, threshold, False),
            selected_last_dense=common.get_sparse_attn_mask_from_threshold(probs, threshold, True),
        ))
    # the self-distillation target: the official Triton attention-pooling kernel (TRITON_INTERPRET=1 on a
    # CPU), through attention_distill_forward; it stores the block max-pooled map in bf16
    distill = importlib.import_module("seer_attn.modules.attention_distill")
    pooling = importlib.import_module("seer_attn.kernels.attn_pooling_kernel_2d")
    if not torch.cuda.is_available():
        pooling.is_hip = lambda: False  # asks the (absent) GPU driver which vendor it is
    g = torch.Generator().manual_seed(300)
    q, k, v = torch.randn(1, 128, 4, 32, generator=g), torch.randn(1, 128, 2, 32, generator=g), torch.randn(1, 128, 2, 32, generator=g)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        _, target = distill.attention_distill_forward(q.to(dev), k.to(dev), v.to(dev), softmax_scale=32 ** -0.5,
                                                      block_size=32, num_key_value_groups=2)
    distill_case = dict(q=q, k=k, v=v, scale=32 ** -0.5, block_size=32, target=target.float().cpu(),
                        function="seer_attn.modules.attention_distill.attention_distill_forward (target stored in bf16)")
    return dict(repo=SEER_URL, commit=commit, function="seer_attn.prefill_sparse.attn_gate.AttnGate + "
                "seer_attn.modules.common.get_sparse_attn_mask_from_threshold",
                layout="q [B, S, Hq, D], k [B, S, Hkv, D] pre-RoPE; logits, probs [B, Hq, NB, NB]", cases=cases,
                distill=distill_case)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moba", type=Path, required=True, help="git checkout of MoonshotAI/MoBA")
    parser.add_argument("--seer", type=Path, required=True, help="git checkout of microsoft/SeerAttention")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    for name, data in (("moba.pt", make_moba(args.moba.resolve())), ("seer_gate.pt", make_seer(args.seer.resolve()))):
        write_atomic(HERE / name, lambda tmp: torch.save(data, tmp))
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size} bytes) from {data['repo']} @ {data['commit']}")


if __name__ == "__main__":
    main()
