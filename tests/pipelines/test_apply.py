"""apply_sparse_attention on the four diffusers video families (tiny random models, offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vzoo.pipelines import DenseConfig, PSAConfig, VMoBAConfig, apply_sparse_attention, make_config
from vzoo.pipelines.adapters import adapter_for
from vzoo.pipelines.attention import Unsupported, video_attention

_spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).with_name("tiny_models.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

BLOCKS = dict(temporal_block=(2,), spatial_block=(4, 4), cube_block=(2, 4, 4), dense_warmup=0.0)
FULL_VMOBA = VMoBAConfig(**BLOCKS, topk=(2, 4, 8))  # every block: must equal the stock attention
SPARSE_VMOBA = VMoBAConfig(**BLOCKS, topk=(1, 2, 3))
FULL_PSA = PSAConfig(block_q=16, block_k=16, min_full=1.0, dense_warmup=0.0)
SPARSE_PSA = PSAConfig(block_q=16, block_k=16, dense_warmup=0.0)


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
    assert not torch.equal(_run(model, inputs), stock)
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
    assert handle.sparse_calls > 0 and handle.density == pytest.approx(1.0)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SPARSE_VMOBA, SPARSE_PSA], ids=["vmoba", "psa"])
def test_sparse_configs_run_sparse(family, config):
    name, model, inputs = family
    stock = _run(model, inputs)
    with apply_sparse_attention(model, config) as handle:
        out = _run(model, inputs)
    layers = {"wan": 3, "cogvideox": 2, "hunyuanvideo": 3, "ltx": 2}[name]
    assert handle.sparse_calls == layers and 0 < handle.density < 0.8
    assert torch.isfinite(out).all() and (out - stock).norm() / stock.norm() < 0.2


def test_gradients_flow_through_vmoba():
    torch.manual_seed(1)
    model, inputs = tiny.wan()
    model.train()
    with apply_sparse_attention(model, SPARSE_VMOBA) as handle:
        model(**inputs, return_dict=False)[0].square().mean().backward()
    assert handle.sparse_calls == 3
    for block in model.blocks:
        grad = block.attn1.to_q.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


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
    with apply_sparse_attention(pipe, VMoBAConfig(topk=(1, 2, 3), dense_warmup=0.5)) as handle:
        out = run()
    assert handle.sparse_calls == 2 * passes * layers
    assert out.shape == stock.shape and torch.isfinite(out).all() and not torch.equal(out, stock)
    with apply_sparse_attention(pipe, PSAConfig(block_q=16, block_k=16, dense_warmup=0.5)) as handle:
        assert torch.isfinite(run()).all()
    assert handle.sparse_calls == 2 * passes * layers
    assert torch.equal(run(), stock)


@pytest.mark.parametrize("config", [SPARSE_VMOBA, SPARSE_PSA], ids=["vmoba", "psa"])
def test_gqa_video_attention_equals_expanded_heads(config):
    """Key/value heads shared by groups of query heads give what expanding them first gives (text after video)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 134, 16), torch.randn(1, 2, 134, 16), torch.randn(1, 2, 134, 16)
    kw = dict(grid=(2, 8, 8), layer_idx=1, config=config, text_first=False)
    got, density = video_attention(q, k, v, None, None, **kw)
    want, want_density = video_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, None, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert density == want_density


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
    with apply_sparse_attention(model, VMoBAConfig(**dict(BLOCKS, spatial_block=(3, 3)))):
        with pytest.raises(ValueError, match="VMoBAConfig.spatial_block"):
            _run(model, inputs)
    q = torch.randn(1, 2, 70, 8)
    with pytest.raises(Unsupported, match="mask"):
        video_attention(q, q, q, torch.zeros(1, 1, 70, 70), None, grid=(1, 8, 8), layer_idx=0, config=SPARSE_VMOBA, text_first=False)


def test_generate_cli_writes_a_gif(tmp_path, capsys):
    from PIL import Image

    from vzoo.cli import main

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
    with pytest.raises(SystemExit, match="model_index.json"):
        main(args[:2] + [str(tmp_path)] + args[3:])
    with pytest.raises(SystemExit, match=".mp4 or .gif"):
        main(args[:-1] + [str(tmp_path / "video.avi")])


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
