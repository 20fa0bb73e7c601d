"""LaDiR (vzoo.lm.ladir): the block VAE, the denoiser's sequence and mask, the flow-matching sampler, diversity
guidance and a training smoke test, on tiny random Llama models (no downloads)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.lm.ladir import (
    LaDiRConfig, LaDiRTokens, LatentBlockVAE, LatentDenoiser, diversity_force, flow_sample, ladir_generate,
)

VOCAB, N, DZ = 24, 3, 5
TOKENS = LaDiRTokens(bot=20, eot=21, soa=22, eos=23)


def tiny_lm(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def make_vae(kl_weight: float = 0.1) -> LatentBlockVAE:
    cfg = LaDiRConfig(latent_tokens=N, latent_dim=DZ, kl_weight=kl_weight)
    torch.manual_seed(2)
    return LatentBlockVAE(tiny_lm(0), tiny_lm(1), cfg, eos_id=TOKENS.eos).double()


def make_denoiser() -> LatentDenoiser:
    cfg = LaDiRConfig(latent_tokens=N, latent_dim=DZ)
    torch.manual_seed(3)
    return LatentDenoiser(tiny_lm(4), cfg, TOKENS).double().eval()


def ids(*rows: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(r) for r in rows]


def test_vae_shapes_kl_and_reconstruction_loss():
    vae = make_vae()
    blocks = ids([1, 2, 3, 4], [5, 6], [7, 8, 9])
    mu, logvar = vae.encode(blocks)
    assert mu.shape == logvar.shape == (3, N, DZ)
    # a row's latents do not depend on the padding its batch needs
    mu_alone, logvar_alone = vae.encode(blocks[1:2])
    torch.testing.assert_close(mu[1:2], mu_alone)
    torch.testing.assert_close(logvar[1:2], logvar_alone)
    out = vae(blocks)
    kl = 0.0
    for b, n, d in itertools.product(range(3), range(N), range(DZ)):
        m, lv = mu[b, n, d].item(), logvar[b, n, d].item()
        kl += 0.5 * (m * m + math.exp(lv) - 1.0 - lv)
    assert out["kl"].item() == pytest.approx(kl / 3, rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["recon"].item() + 0.1 * kl / 3, rel=1e-10)

    # decode_loss: teacher forcing from the prepended projected latents, one block at a time, no padding
    z = torch.randn(3, N, DZ, dtype=torch.float64)
    total, count = 0.0, 0
    for zb, blk in zip(z, blocks):
        emb = torch.cat([vae.from_latent(zb), vae.decoder.get_input_embeddings()(blk)])[None]
        logp = vae.decoder(inputs_embeds=emb).logits[0].log_softmax(-1)
        for i, target in enumerate(blk.tolist() + [TOKENS.eos]):
            total -= logp[N - 1 + i, target].item()
            count += 1
    assert vae.decode_loss(z, blocks).item() == pytest.approx(total / count, rel=1e-9)


def test_vae_generate_text_is_greedy():
    vae = make_vae()
    z = torch.randn(2, N, DZ, dtype=torch.float64)
    out = vae.generate_text(z, max_new_tokens=5)
    for zb, row in zip(z, out):
        emb = vae.from_latent(zb)[None]
        want = []
        for _ in range(5):
            nxt = int(vae.decoder(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == TOKENS.eos:
                break
            want.append(nxt)
            emb = torch.cat([emb, vae.decoder.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        assert row == want


def brute_mask(total: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            same = any(s <= i < e and s <= j < e for s, e in spans)
            allowed[i, j] = j <= i or same
    return allowed


def test_denoiser_sequence_and_block_mask():
    den = make_denoiser()
    q = ids([1, 2, 3], [4, 5])
    ctx = [torch.randn(2, N, DZ, dtype=torch.float64), torch.randn(1, N, DZ, dtype=torch.float64)]
    noisy = torch.randn(2, N, DZ, dtype=torch.float64)
    ans = ids([6, 7], [8])
    seq = den.build(q, ctx, noisy, torch.tensor([0.3, 0.7]), ans)
    # row 0: q 0..2, blocks [3, 8) [8, 13), noisy [13, 19), <soa> 19, answer 20, 21
    spans0 = [(3, 3 + N + 2), (8, 8 + N + 2), (13, 13 + N + 3)]
    total = seq.embeds.shape[1]
    assert total == 22
    assert torch.equal(seq.allowed[0], brute_mask(total, spans0))
    assert torch.equal(seq.allowed[1], brute_mask(total, [(2, 2 + N + 2), (7, 7 + N + 3)]))
    assert seq.noisy[0].tolist() == list(range(15, 15 + N))
    assert seq.eot_pos.tolist() == [7, 12, 6] and seq.eot_last.tolist() == [False, True, True]
    assert seq.labels[0, 19:22].tolist() == [6, 7, -100] and (seq.labels[0, :19] == -100).all()

    def hidden(noisy_=noisy, ctx_=ctx, ans_=ans):
        with torch.no_grad():
            return den.run(den.build(q, ctx_, noisy_, torch.tensor([0.3, 0.7]), ans_))[0][0]

    base = hidden()
    # later latent of the noisy block -> earlier latents of the same block change; earlier spans do not
    bumped = noisy.clone()
    bumped[0, -1] += 1.0
    h = hidden(noisy_=bumped)
    assert (h[15] - base[15]).abs().max() > 1e-4 and (h[13] - base[13]).abs().max() > 1e-4
    torch.testing.assert_close(h[:13], base[:13], atol=1e-12, rtol=0)
    # the last latent of the first clean block -> its earlier latents change, the question does not
    ctx2 = [ctx[0].clone(), ctx[1]]
    ctx2[0][0, -1] += 1.0
    h = hidden(ctx_=ctx2)
    assert (h[4] - base[4]).abs().max() > 1e-4
    torch.testing.assert_close(h[:3], base[:3], atol=1e-12, rtol=0)
    # an answer token never reaches back into the blocks
    h = hidden(ans_=ids([6, 9], [8]))
    torch.testing.assert_close(h[:21], base[:21], atol=1e-12, rtol=0)
    assert (h[21] - base[21]).abs().max() > 1e-4


def test_inputs_embeds_path_equals_input_ids_path():
    den = make_denoiser()
    q, a = ids([1, 2, 3, 4], [5, 6]), ids([7, 8], [9, 10, 11])
    seq = den.build(q, answers=a)
    with torch.no_grad():
        _, logits = den.run(seq)
        for row, (qi, ai) in enumerate(zip(q, a)):
            full = torch.cat([qi, torch.tensor([TOKENS.soa]), ai])[None]
            ref = den.lm(input_ids=full).logits[0]
            torch.testing.assert_close(logits[row, :full.shape[1]], ref, atol=1e-10, rtol=1e-10)


def test_euler_sampler_with_exact_velocity_reaches_x0():
    x0 = torch.randn(2, 3, N, DZ, dtype=torch.float64)
    noise = torch.randn(2, 3, N, DZ, dtype=torch.float64)
    for steps in (1, 4, 7):
        # rectified flow: x_t = (1 - t) x0 + t noise, velocity noise - x0
        out = flow_sample(lambda x, t: (noise - x0).flatten(0, 1), noise, steps)
        torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
        # the same field written as a function of (x, t) only: (x - x0) / t on the straight path
        out = flow_sample(lambda x, t: (x - x0.flatten(0, 1)) / t, noise, steps)
        torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


def loop_force(x: torch.Tensor) -> torch.Tensor:
    g, r = x.shape[:2]
    out = torch.zeros_like(x)
    for gi in range(g):
        pts = [x[gi, i].flatten() for i in range(r)]
        d2 = sorted(float((pts[i] - pts[j]).square().sum()) for i in range(r) for j in range(r) if i != j)
        h = d2[(len(d2) - 1) // 2]
        for i in range(r):
            f = torch.zeros_like(pts[i])
            for j in range(r):
                if j != i:
                    f += 2.0 / h * math.exp(-float((pts[i] - pts[j]).square().sum()) / h) * (pts[i] - pts[j])
            out[gi, i] = f.view(x.shape[2:])
    return out


def mean_pairwise(x: torch.Tensor) -> float:
    r = x.shape[1]
    flat = x.flatten(2)
    return sum(float((flat[:, i] - flat[:, j]).norm(dim=-1).mean()) for i in range(r) for j in range(i + 1, r)) \
        / (r * (r - 1) / 2)


def test_diversity_guidance():
    torch.manual_seed(0)
    x = torch.randn(3, 4, N, DZ, dtype=torch.float64)
    torch.testing.assert_close(diversity_force(x), loop_force(x), atol=1e-12, rtol=1e-12)
    assert torch.equal(diversity_force(x[:, :1]), torch.zeros_like(x[:, :1]))
    x0 = torch.randn(1, 1, N, DZ, dtype=torch.float64)
    a = torch.randn(N * DZ, N * DZ, dtype=torch.float64) * 0.1

    def field(x, t):  # contracts towards x0 only partly, so trajectories stay apart, plus a coupling
        return 0.5 * (x - x0.flatten(0, 1)) + (x.flatten(1) @ a).view_as(x)

    noise = torch.randn(3, 4, N, DZ, dtype=torch.float64)
    plain = flow_sample(field, noise, 6, diversity=0.0)
    alone = torch.stack([torch.stack([flow_sample(field, noise[g, r][None, None], 6, diversity=0.0)[0, 0]
                                      for r in range(4)]) for g in range(3)])
    torch.testing.assert_close(plain, alone, atol=1e-12, rtol=0)
    guided = flow_sample(field, noise, 6, diversity=1.0)
    assert mean_pairwise(guided) > mean_pairwise(plain) * 1.05


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="latent_tokens"):
        LaDiRConfig(latent_tokens=0)
    with pytest.raises(ValueError, match="kl_weight"):
        LaDiRConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="tokens.bot"):
        LatentDenoiser(tiny_lm(0), LaDiRConfig(latent_tokens=N, latent_dim=DZ), LaDiRTokens(99, 1, 2, 3))
    vae, den = make_vae(), make_denoiser()
    with pytest.raises(ValueError, match="blocks"):
        vae.encode([torch.tensor([1.0, 2.0])])
    with pytest.raises(ValueError, match="z must be"):
        vae.decode_loss(torch.zeros(1, N + 1, DZ, dtype=torch.float64), ids([1, 2]))
    with pytest.raises(ValueError, match="noisy"):
        den.build(ids([1]), None, torch.zeros(1, N, DZ + 1), torch.zeros(1))
    with pytest.raises(ValueError, match="t must be"):
        den.build(ids([1]), None, torch.zeros(1, N, DZ, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="contexts"):
        den.build(ids([1], [2]), [torch.zeros(0, N, DZ)])
    with pytest.raises(ValueError, match="steps"):
        flow_sample(lambda x, t: x, torch.zeros(1, 1, 2), 0)
    with pytest.raises(ValueError, match="diversity"):
        flow_sample(lambda x, t: x, torch.zeros(1, 1, 2), 2, diversity=-1.0)
    with pytest.raises(ValueError, match="trajectories"):
        ladir_generate(den, vae, ids([1]), trajectories=0)
    with pytest.raises(ValueError, match="min_blocks"):
        ladir_generate(den, vae, ids([1]), min_blocks=3, max_blocks=2)
    with pytest.raises(ValueError, match="question_ids"):
        ladir_generate(den, vae, [torch.tensor([], dtype=torch.long)])


def test_training_smoke_and_generation():
    torch.manual_seed(0)
    vae, den = make_vae(kl_weight=1e-3), make_denoiser()
    blocks = ids([1, 2, 3], [4, 5, 6, 7], [8, 9])
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    vae_losses = []
    for _ in range(8):
        loss = vae(blocks, generator=torch.Generator().manual_seed(0))["loss"]
        vae_losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert vae_losses[-1] < vae_losses[0] - 0.05  # only the encoder side learns: slow, but steady
    assert all(p.grad is None for p in vae.decoder.parameters())  # the decoder stays frozen

    questions = ids([1, 2], [3, 4, 5])
    lat = [torch.randn(2, N, DZ, dtype=torch.float64), torch.randn(1, N, DZ, dtype=torch.float64)]
    answers = ids([6, TOKENS.eos], [7, 8, TOKENS.eos])
    den.set_latent_stats(torch.cat(lat))
    den.train()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = den.loss(questions, lat, answers, generator=torch.Generator().manual_seed(1))
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]
    den.eval()
    sample = ladir_generate(den, vae, questions, steps=2, trajectories=2, diversity=1.0, max_blocks=3,
                            max_block_tokens=4, max_answer_tokens=3, generator=torch.Generator().manual_seed(0))
    assert len(sample.latents) == len(sample.blocks) == len(sample.answers) == 2
    for lat_q, blk_q, ans_q in zip(sample.latents, sample.blocks, sample.answers):
        assert len(lat_q) == len(blk_q) == len(ans_q) == 2
        for z, texts, a in zip(lat_q, blk_q, ans_q):
            assert z.dim() == 3 and 1 <= z.shape[0] <= 3 and z.shape[1:] == (N, DZ)
            assert len(texts) == z.shape[0] and all(len(t) <= 4 for t in texts)
            assert len(a) <= 3 and TOKENS.eos not in a
