"""VMoBA (outputs and gradients) and PSA (block levels and outputs) against golden outputs of the
official code (KwaiVGI/VMoBA, ziplab/Pyramid-Sparse-Attention), made by tests/golden/make_video.py
(official routing and selection, torch stand-ins for the flash-attn and Triton kernels; repository and
commit recorded in the fixtures). fp32, atol 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vzoo.gilbert import gilbert_order
from vzoo.psa import PSAConfig, psa_attention, psa_levels
from vzoo.vmoba import VMoBAConfig, vmoba_attention

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
VMOBA = torch.load(GOLDEN / "vmoba.pt", weights_only=True)
PSA = torch.load(GOLDEN / "psa.pt", weights_only=True)


def test_fixtures_record_their_source_and_cover_every_level():
    assert VMOBA["repo"] == "https://github.com/KwaiVGI/VMoBA" and len(VMOBA["commit"]) == 40
    assert PSA["repo"] == "https://github.com/ziplab/Pyramid-Sparse-Attention" and len(PSA["commit"]) == 40
    used = set().union(*(c["levels"].unique().tolist() for c in PSA["cases"]))
    assert used == {0, 1, 2, 3, 4}  # skipped, full and every pooled level occur in the official selections


@pytest.mark.parametrize("case", VMOBA["cases"], ids=[c["name"] for c in VMOBA["cases"]])
def test_vmoba_matches_official(case):
    block, layer = case["block"], case["layer"]
    fields = ("temporal_block", "spatial_block", "cube_block")[layer % 3]
    size = (block[0],) if layer % 3 == 0 else block[1:] if layer % 3 == 1 else block
    topk = [3, 3, 3]
    topk[layer % 3] = case["topk"]
    config = VMoBAConfig(**{fields: tuple(size)}, mode=case["mode"], topk=tuple(topk), tau=case["tau"], pool=case["pool"])
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    got = vmoba_attention(q, k, v, case["grid"], layer, config, dense_fallback=False)
    torch.testing.assert_close(got, case["out"], atol=1e-4, rtol=0)
    for name, grad in zip("qkv", torch.autograd.grad(got, (q, k, v), case["grad_out"])):
        torch.testing.assert_close(grad, case[f"grad_{name}"], atol=1e-4, rtol=0)


def _psa_config(case) -> PSAConfig:
    ends = [case["ratios"][p][1] for p in (1, 2, 4, 8)]
    shares = tuple(b - a for a, b in zip([0.0] + ends, ends))
    return PSAConfig(
        block_q=case["block_q"], block_k=case["block_k"], tile_k=32,
        mode="threshold" if case["mode"] == "thresholdbound" else "quantile",
        thresholds=tuple(ends), quantiles=shares if case["mode"] == "topk" else PSAConfig().quantiles,
        sim_cap=case["sim"], reorder=case["reorder"],
    )


@pytest.mark.parametrize("case", PSA["cases"], ids=[c["name"] for c in PSA["cases"]])
def test_psa_matches_official(case):
    config = _psa_config(case)
    offsets = (case["offsets_q"], case["offsets_k"])
    q, k, v = case["q"], case["k"], case["v"]
    perm = gilbert_order(case["grid"]) if config.reorder else torch.arange(q.shape[2])
    levels = psa_levels(q[:, :, perm], k[:, :, perm], config, offsets=offsets)
    assert torch.equal(levels, case["levels"])
    got = psa_attention(q, k, v, case["grid"], config, offsets=offsets, dense_fallback=False)
    torch.testing.assert_close(got, case["out"], atol=1e-4, rtol=0)
