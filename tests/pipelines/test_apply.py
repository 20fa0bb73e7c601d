"""apply_sparse_attention on the four diffusers video families (tiny random models, offline)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vzoo.pipelines import DenseConfig, PSAConfig, VMoBAConfig, apply_sparse_attention, make_config
from vzoo.pipelines.adapters import adapter_for
from vzoo.pipelines.attention import Unsupported, video_attention

_spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).with_name("tiny_models.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

# the sparse path itself, even where its density is above the CPU break-even (dense_fallback=False)
BLOCKS = dict(temporal_block=(2,), spatial_block=(4, 4), cube_block=(2, 4, 4), dense_warmup=0.0, dense_fallback=False)
FULL_VMOBA = VMoBAConfig(**BLOCKS, topk=(2, 4, 8))  # every block: must equal the stock attention
SPARSE_VMOBA = VMoBAConfig(**BLOCKS, topk=(1, 2, 3))
FULL_PSA = PSAConfig(block_q=16, block_k=16, min_full=1.0, dense_warmup=0.0, dense_fallback=False)
SPARSE_PSA = PSAConfig(block_q=16, block_k=16, dense_warmup=0.0, dense_fallback=False)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(params=sorted(tiny.FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, inputs = tiny.FAMILIES[request.param]()
    return request.param, model.eval(), inputs


def test_dense_config_and_remove_reproduce_stock_exactly(family):
    _, model, inputs = family
    stock = _run(model, inputs)
    with apply_sparse_attention(model, DenseConfig()):
        assert torch.equal(_run(model, inputs), stock)
    handle = apply_sparse_attention(model, SPARSE_VMOBA)
    _run(model, inputs)
    assert handle.sparse_calls == {"wan": 3, "cogvideox": 2, "hunyuanvideo": 3, "ltx": 2}[family[0]]
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_run(model, inputs), stock)


@pytest.mark.parametrize("config", [FULL_VMOBA, FULL_PSA], ids=["vmoba", "psa"])
def test_selecting_everything_equals_stock_attention(family, config):
    """Checks the whole path: interception, token layout, text split and LSE merge, inverse permutation."""
    _, model, inputs = family
    stock = _run(model, inputs)
    with apply_sparse_attention(model, config) as handle:
        out = _run(model, inputs)
    assert handle.sparse_calls > 0 and handle.density == pytest.approx(1.0) and handle.dense_calls == 0
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    # by default, density 1 is above every break-even density: each call runs the dense kernel and says so
    with apply_sparse_attention(model, replace(config, dense_fallback=True)) as handle:
        out = _run(model, inputs)
    assert handle.sparse_calls > 0 and handle.density == pytest.approx(1.0) and handle.dense_calls == handle.sparse_calls
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SPARSE_VMOBA, SPARSE_PSA], ids=["vmoba", "psa"])
def test_sparse_configs_run_sparse(family, config):
    name, model, inputs = family
    stock = _run(model, inputs)
    with apply_sparse_attention(model, config) as handle:
        out = _run(model, inputs)
    layers = {"wan": 3, "cogvideox": 2, "hunyuanvideo": 3, "ltx": 2}[name]
    assert handle.sparse_calls == layers and 0 < handle.density < 0.8 and handle.dense_calls == 0
    assert torch.isfinite(out).all() and (out - stock).norm() / stock.norm() < 0.2


def _vmoba_oracle(q, k, v, scale, grid, block, topk):
    """Attention over the key blocks an independent top-k selection picks: block ids from (t, h, w)
    coordinates, mean keys by masking, own block forced in, dense masked fp64 softmax."""
    st, sh, sw = (b or n for b, n in zip(block, grid))
    tt, hh, ww = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    nh, nw = grid[1] // sh, grid[2] // sw
    ids = ((tt // st) * nh * nw + (hh // sh) * nw + ww // sw).flatten()
    means = torch.stack([k[:, :, ids == j].double().mean(2) for j in range(int(ids.max()) + 1)], 2)
    gate = (q.double() @ means.transpose(-1, -2)).masked_fill(ids[:, None] == torch.arange(means.shape[2]), float("inf"))
    chosen = torch.zeros(gate.shape, dtype=torch.bool).scatter_(-1, gate.topk(topk, -1).indices, True)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    return (torch.softmax(logits.masked_fill(~chosen[..., ids], float("-inf")), -1) @ v.double()).to(q.dtype)


def test_sparse_wan_equals_stock_model_with_oracle_attention_with_gradients():
    """The whole sparse path (interception, layer numbers, block shapes by layer, inverse permutation,
    autograd): equal, forward and backward, to the stock model whose self-attention calls a test-side
    mode answers with the oracle."""
    from torch.overrides import TorchFunctionMode

    torch.manual_seed(5)
    model, inputs = tiny.wan()

    def run():
        model.zero_grad()
        out = model(**inputs, return_dict=False)[0]
        out.square().mean().backward()
        return out.detach(), [block.attn1.to_q.weight.grad.clone() for block in model.blocks]

    config = VMoBAConfig(temporal_block=(1,), spatial_block=(4, 4), cube_block=(2, 4, 4), topk=(1, 1, 2), dense_warmup=0.0)
    with apply_sparse_attention(model, config) as handle:
        got, got_grads = run()
    assert handle.sparse_calls == 3 and handle.dense_calls == 0 and handle.density == pytest.approx(0.25)

    class Oracle(TorchFunctionMode):
        layer = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            call = dict(zip(("query", "key", "value"), args)) | kwargs
            if func is torch.nn.functional.scaled_dot_product_attention and call["query"].shape[2] == call["key"].shape[2]:
                q, k, v = call["query"], call["key"], call["value"]
                layer, Oracle.layer = Oracle.layer, Oracle.layer + 1
                block = config.block(layer, tiny.GRID)
                scale = kwargs.get("scale") or q.shape[-1] ** -0.5
                return _vmoba_oracle(q, k, v, scale, tiny.GRID, block, config.topk[layer % 3])
            return func(*args, **kwargs)

    with Oracle():
        want, want_grads = run()
    assert Oracle.layer == 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("family_name", sorted(tiny.FAMILIES))
def test_pipelines_end_to_end_with_dense_warmup(family_name):
    """4 steps, warm-up 0.5: steps 2 and 3 are sparse whether CFG runs as two forwards (Wan) or one
    batched forward (CogVideoX, LTX); DenseConfig and remove() give the stock latents exactly."""
    pipe, kw, passes = tiny.pipeline(family_name)
    layers = len(adapter_for(pipe.transformer).self_attention(pipe.transformer))

    def run():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).frames

    stock = run()
    with apply_sparse_attention(pipe, DenseConfig()):
        assert torch.equal(run(), stock)
    # dense_fallback=False: these tiny grids select more than the break-even density, and the sparse
    # steps must really run the sparse kernels
    with apply_sparse_attention(pipe, VMoBAConfig(topk=(1, 2, 3), dense_warmup=0.5, dense_fallback=False)) as handle:
        out = run()
    assert handle.sparse_calls == 2 * passes * layers and handle.dense_calls == 0
    assert out.shape == stock.shape and torch.isfinite(out).all() and not torch.equal(out, stock)
    with apply_sparse_attention(pipe, PSAConfig(block_q=16, block_k=16, dense_warmup=0.5, dense_fallback=False)) as handle:
        out = run()
    assert handle.sparse_calls == 2 * passes * layers and handle.dense_calls == 0
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert torch.equal(run(), stock)


@pytest.mark.parametrize("config", [SPARSE_VMOBA, SPARSE_PSA], ids=["vmoba", "psa"])
def test_gqa_video_attention_equals_expanded_heads(config, monkeypatch):
    """Key/value heads shared by groups of query heads give what expanding them first gives (text after
    video). PSA samples key tokens per key head (as the official code): here each key head's samples
    are handed to the query heads of its group, so both calls select the same blocks."""
    import vzoo.psa

    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(1)
    off_q = torch.rand(1, 4, 16, generator=gen).topk(4, -1).indices
    off_k = torch.rand(1, 2, 16, generator=gen).topk(4, -1).indices
    monkeypatch.setattr(vzoo.psa, "psa_offsets", lambda b, heads, *_: (off_q, off_k.repeat_interleave(heads[1] // 2, 1)))
    q, k, v = torch.randn(1, 4, 134, 16), torch.randn(1, 2, 134, 16), torch.randn(1, 2, 134, 16)
    kw = dict(grid=(2, 8, 8), layer_idx=1, config=config, text_first=False)
    got, density, dense = video_attention(q, k, v, None, None, **kw)
    want, want_density, want_dense = video_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, None, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (density, dense) == (want_density, want_dense) and not dense


def test_bad_use_raises():
    model, inputs = tiny.wan()
    with pytest.raises(ValueError, match="method='sparse'"):
        make_config("sparse")
    with pytest.raises(ValueError, match="VMoBAConfig.tau"):
        make_config("vmoba", tau=0.0)
    with pytest.raises(ValueError, match="config must be"):
        apply_sparse_attention(model, {"method": "vmoba"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        apply_sparse_attention(model, VMoBAConfig())
    with pytest.raises(ValueError, match="not supported"):
        apply_sparse_attention(torch.nn.Linear(2, 2), DenseConfig())
    with apply_sparse_attention(model, DenseConfig()):
        with pytest.raises(RuntimeError, match="already"):
            apply_sparse_attention(model, DenseConfig())
    with apply_sparse_attention(model, VMoBAConfig(**dict(BLOCKS, spatial_block=(3, 3)))) as handle:
        assert torch.isfinite(_run(model, inputs)).all()  # blocks that do not tile the grid: shorter last blocks
    assert handle.sparse_calls == 3
    q = torch.randn(1, 2, 70, 8)
    with pytest.raises(Unsupported, match="mask"):
        video_attention(q, q, q, torch.zeros(1, 1, 70, 70), None, grid=(1, 8, 8), layer_idx=0, config=SPARSE_VMOBA, text_first=False)


def test_generate_cli_writes_a_gif(tmp_path, capsys):
    from PIL import Image

    from vzoo.cli import entry, main

    tiny.save_wan_pipeline(tmp_path / "pipe")
    out = tmp_path / "video.gif"
    args = ["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a cat runs in the snow", "--method", "vmoba",
            "--frames", "13", "--height", "64", "--width", "64", "--steps", "4", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "attention density" in printed and "13 frames" in printed
    with Image.open(out) as gif:
        assert gif.n_frames == 13 and gif.size == (64, 64)
    assert not list(tmp_path.glob(".*partial*"))
    capsys.readouterr()
    for bad, named in ((args[:2] + [str(tmp_path)] + args[3:], "--model"), (args[:-1] + [str(tmp_path / "video.avi")], "--out")):
        assert entry(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"vzoo: error: {named} ") and "\n" not in err
    assert not (tmp_path / "video.avi").exists()


def test_warns_once_when_no_sdpa_call_reaches_vzoo():
    """A stock processor that never calls SDPA (as under a non-native attention backend) keeps its path."""
    model, inputs = tiny.wan(1)
    model.eval()
    attn = model.blocks[0].attn1
    original = attn.processor

    class NoSDPA:  # value projection only: no attention call at all
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return attn.to_out[0](attn.to_v(hidden_states))

    attn.set_processor(NoSDPA())
    want = _run(model, inputs)
    with apply_sparse_attention(model, SPARSE_VMOBA):
        with pytest.warns(UserWarning, match="no scaled_dot_product_attention") as record:
            got = _run(model, inputs)
            _run(model, inputs)
    assert torch.equal(got, want)
    assert sum("no scaled_dot_product_attention" in str(w.message) for w in record) == 1
    attn.set_processor(original)
