"""Vision modules take their map layout as a constructor argument (issue 12, item 6): the default is the
official one, the other layout gives the same numbers on the permuted map, and a map whose channel axis
does not hold ``dim`` in the declared layout is a ValueError naming the layout. The square case
``H == W == C``, where a guess from the shape is impossible, follows the declared layout."""

from __future__ import annotations

import pytest
import torch

from vzoo import AttentionLePE, BiLevelRoutingAttention, ContMix, SentenceAttentionBlock
from vzoo.reid_attention import LiteAttention

C = 16  # channels == H == W in the square case

# (factory(layout) or factory() for the official default, official default layout)
MODULES = {
    "BiLevelRoutingAttention": (lambda **kw: BiLevelRoutingAttention(C, num_heads=2, n_win=2, topk=2, **kw), "NHWC"),
    "AttentionLePE": (lambda **kw: AttentionLePE(C, num_heads=2, **kw), "NHWC"),
    "ContMix": (lambda **kw: ContMix(C, kernel_size=7, smk_size=5, num_heads=2, **kw), "NCHW"),
    "LiteAttention": (lambda **kw: LiteAttention(C, **kw), "NCHW"),
}


def _pair(name: str):
    """The module in its default layout and in the other one, with the same weights."""
    make, default = MODULES[name]
    torch.manual_seed(0)
    first = make().eval()
    assert first.layout == default
    other = make(layout="NCHW" if default == "NHWC" else "NHWC").eval()
    other.load_state_dict(first.state_dict())
    return first, other


def _run(module, x: torch.Tensor) -> torch.Tensor:
    """``module`` on the NCHW map ``x`` handed over in the module's layout; the output as NCHW."""
    if module.layout == "NCHW":
        return module(x)
    return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", MODULES)
def test_square_map_follows_the_declared_layout(name):
    a, b = _pair(name)
    torch.manual_seed(1)
    x = torch.randn(2, C, C, C)  # NCHW with H == W == C
    with torch.no_grad():
        want = _run(a, x)
        torch.testing.assert_close(_run(b, x), want, rtol=1e-5, atol=1e-5)
        # the NCHW tensor given as is to the NHWC module is accepted (the shapes agree) and read as NHWC,
        # which gives other numbers: the reason the layout is declared, not guessed from the shape
        nhwc = a if a.layout == "NHWC" else b
        assert not torch.allclose(nhwc(x).permute(0, 3, 1, 2), want, atol=1e-3)


@pytest.mark.parametrize("name", MODULES)
def test_channel_axis_mismatch_names_the_layout(name):
    for module in _pair(name):
        layout = module.layout
        other_layout_map = torch.randn(1, 6, 10, C) if layout == "NCHW" else torch.randn(1, C, 6, 10)
        with pytest.raises(ValueError, match=f"layout='{layout}'"):
            module(other_layout_map)


@pytest.mark.parametrize("name", MODULES)
def test_unknown_layout_is_refused(name):
    with pytest.raises(ValueError, match="layout='nchw'"):
        MODULES[name][0](layout="nchw")


def test_sentence_attention_layouts():
    torch.manual_seed(0)
    block = SentenceAttentionBlock(C, text_dim=8).eval()
    assert block.layout == "NCHW"
    nhwc = SentenceAttentionBlock(C, text_dim=8, layout="NHWC").eval()
    nhwc.load_state_dict(block.state_dict())
    x, text = torch.randn(2, C, C, C), torch.randn(2, 8)
    with torch.no_grad():
        want = x * torch.softmax(block.mlp(text), -1)[:, :, None, None]  # the official gate, NCHW
        torch.testing.assert_close(block(x, text), want)
        torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1), text), want.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="layout='NCHW'"):
        block(torch.randn(2, 5, 7, C), text)
    with pytest.raises(ValueError, match="layout='NHWC'"):
        nhwc(torch.randn(2, C, 5, 7), text)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", MODULES)
def test_scripted_module_matches_eager_and_checks_the_layout(name):
    """``torch.jit.script`` compiles the shared layout check (no f-string in it), and the scripted
    module gives the eager numbers and refuses a map whose channel axis disagrees with its layout."""
    for module in _pair(name):
        scripted = torch.jit.script(module)
        torch.manual_seed(1)
        x = torch.randn(2, C, 8, 8)
        x = x if module.layout == "NCHW" else x.permute(0, 2, 3, 1)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), module(x))
        bad = torch.randn(1, 6, 10, C) if module.layout == "NCHW" else torch.randn(1, C, 6, 10)
        with pytest.raises(torch.jit.Error, match=f"layout='{module.layout}'"):
            scripted(bad)
