"""LaDiR, the Latent Diffusion Reasoner (Kang, Zhang, Kuang, Majamäki, Jaitly, Ma, Qin; arXiv 2510.04573, ICLR 2026),
built on any transformers causal LM through ``inputs_embeds`` and 4-D float masks.

No official code is public; semantics follow the paper's text (abstract and public summaries) and a third-party
fork (SY-Jia06/LaDiR: ``ladir_reasoner/sequence.py``, ``inference.py``, ``fm_noise_scheduler.py``), read, not copied.

1. :class:`LatentBlockVAE`: each reasoning sentence (a *block*) is read by an encoder LM (trainable) followed by
   ``N`` learnable latent-query embeddings; the last hidden states at the queries go through linear heads to a mean
   and a log-variance, ``z = mu + exp(logvar / 2) * eps`` of shape ``[B, N, d_z]``. The decoder is a frozen LM that
   reconstructs the sentence (teacher forcing) from the ``N`` linearly projected latents prepended as embeddings.
   Loss: token cross-entropy + ``kl_weight * KL(q(z|x) || N(0, I))`` (KL summed over ``N x d_z``, mean over blocks);
   during training Gaussian noise of std ``latent_noise_std`` is added to ``z`` before decoding (fork defaults:
   ``d_z = 512, N = 4, kl_weight = 1e-5``, noise std 3.0 [3rd]).
2. :class:`LatentDenoiser`: an LM over ``[question ; <bot> z_1 <eot> ; ... ; <bot> time x_t <eot> ; <soa> answer]``
   (each ``z_k`` is ``N`` projected latents; ``time`` one embedding of ``t``) under
   :func:`vzoo.kernels.block_diffusion.block_spans_mask`: causal, plus full attention inside each ``<bot> .. <eot>``
   span. Heads: hidden states at the noisy latents -> velocity in latent space; hidden state at each ``<eot>`` -> a
   two-way end-of-reasoning classifier (class 1: this was the last block); the LM head on the answer tokens.
3. Flow matching, rectified-flow convention of the fork's scheduler: ``t`` in ``[0, 1]``, ``t = 0`` clean,
   ``x_t = (1 - t) x_0 + t eps``, the model predicts the velocity ``dx_t/dt = eps - x_0`` (MSE). Sampling
   (:func:`flow_sample`) integrates from ``t = 1`` (pure noise) to ``t = 0`` with ``steps`` Euler steps on the
   uniform grid ``t_i = 1 - i / steps``: ``x <- x + (t_{i+1} - t_i) v``. The denoiser works on standardised latents
   (:meth:`LatentDenoiser.set_latent_stats`), like the scale factor of image latent diffusion (our choice).
4. :func:`ladir_generate`: blocks one after another, each from fresh noise with ``steps`` Euler steps; after each
   block the ``<eot>`` classifier may end a row's reasoning; ``trajectories`` samples per question run in parallel,
   with diversity guidance (:func:`diversity_force`); then the answer is decoded greedily after ``<soa>``.

Diversity guidance, exact form (the paper's equation was not available here; the fork adds a ``t``-weighted RBF
pairwise force to the predicted velocity [3rd]). Within the ``R`` trajectories of one question, with ``x_i`` the
flattened current latents, ``h`` the median of the pairwise squared distances ``d_ij = |x_i - x_j|^2`` (i != j) and
``k_ij = exp(-d_ij / h)``, the force is ``phi_i = (2 / h) sum_j k_ij (x_i - x_j) = -grad_{x_i} sum_j k_ij``: gradient
descent on the RBF kernel energy of the set, the repulsive term of SVGD / particle guidance (Corso et al., ICLR 2024).
The guided velocity is ``v_i - diversity * t * phi_i``; since ``t`` decreases, each step moves ``x_i`` by
``+ diversity * t * |dt| * phi_i``, away from the others, strongest at high noise and vanishing at ``t = 0``. The fork
adds ``+ diversity * t * sum_j w_ij (x_i - x_j)``, ``w_ij = 2 (1 - r) exp(-r)``, ``r = d_ij / h``, to the velocity,
which (integrated towards ``t = 0``) pulls pairs closer than the median distance together and pushes the others
apart; this module uses the plain kernel gradient so that every pair repels. ``diversity = 0`` gives independent
trajectories.

Sources checked: the sequence layout, the span mask (``<bot>`` to ``<eot>`` inclusive, causal elsewhere), the shared
latent input projection, the 2-way classifier at the last ``<eot>``, the rectified-flow convention and the Euler grid
``linspace(1, 0, steps + 1)`` match the fork [3rd]; the VAE (latent queries, mu / logvar heads, frozen decoder) and
blockwise sequential generation match the paper's text [paper]. Assumed (unverified): the diversity formula above,
the sinusoidal + MLP time embedding, latent standardisation, and the loss weights (1 : 1 : 1).

Left out: classifier-free guidance, the encoder's token substitution, KV caching at inference (every step re-runs
the short sequence), and the fork's other objectives (x0 / epsilon / v).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels.block_diffusion import additive_mask, block_spans_mask

from .diffusion_objectives import IGNORE_INDEX

__all__ = [
    "LaDiRConfig", "LaDiRSample", "LaDiRTokens", "LatentBlockVAE", "LatentDenoiser", "add_ladir_tokens",
    "diversity_force", "flow_sample", "gaussian_kl", "ladir_generate",
]


@dataclass
class LaDiRConfig:
    """Hyper-parameters. ``latent_tokens`` N latents per block of ``latent_dim`` d_z; ``kl_weight`` and
    ``latent_noise_std`` of the VAE; ``stop_weight`` / ``answer_weight`` weigh the denoiser's classifier and answer
    LM losses against the flow-matching MSE."""

    latent_tokens: int = 4
    latent_dim: int = 16
    kl_weight: float = 1e-5
    latent_noise_std: float = 0.0
    stop_weight: float = 1.0
    answer_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latent_tokens", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaDiRConfig.{name}={value!r} must be an int >= 1")
        for name in ("kl_weight", "latent_noise_std", "stop_weight", "answer_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LaDiRConfig.{name}={value!r} must be a finite number >= 0")


@dataclass(frozen=True)
class LaDiRTokens:
    """Token ids the denoiser uses: block delimiters ``bot`` / ``eot``, start of answer ``soa``, and ``eos`` that
    ends an answer."""

    bot: int
    eot: int
    soa: int
    eos: int


def add_ladir_tokens(model: nn.Module, tokenizer, eos: str) -> LaDiRTokens:
    """Add ``<bot>``, ``<eot>``, ``<soa>`` to ``tokenizer`` and ``model`` with
    :func:`vzoo.lm.finetune.add_special_token`; ``eos`` is the (existing) token that ends an answer."""
    from vzoo.lm.finetune import add_special_token

    if not isinstance(eos, str) or eos not in tokenizer.get_vocab():
        raise ValueError(f"eos={eos!r} must be a token string in the tokenizer's vocabulary (e.g. tokenizer.eos_token)")
    ids = [add_special_token(model, tokenizer, tok) for tok in ("<bot>", "<eot>", "<soa>")]
    return LaDiRTokens(*ids, eos=tokenizer.convert_tokens_to_ids(eos))


def _backbone(lm: nn.Module, embeds: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run causal LM ``lm`` on ``embeds [B, T, d]`` under the bool mask ``allowed [B, T, T]`` (True = attend),
    positions ``0 .. T-1``: ``(last hidden state [B, T, d], logits [B, T, V])``."""
    pos = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
    hidden = lm.base_model(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
                           position_ids=pos, use_cache=False).last_hidden_state
    return hidden, lm.get_output_embeddings()(hidden)


def _pad(rows: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Right-pad 1-D or 2-D tensors ``[L_i, ...]`` to ``[B, max L, ...]``."""
    return nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)


def _check_ids_list(name: str, ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"{name} must be a [B, L] tensor or a list of 1-D tensors, got shape {tuple(ids.shape)}")
        ids = list(ids)
    ids = list(ids)
    if not ids:
        raise ValueError(f"{name} is empty")
    for i, row in enumerate(ids):
        if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.is_floating_point() or row.dtype == torch.bool \
                or row.numel() == 0:
            desc = f"{row.dtype} {tuple(row.shape)}" if isinstance(row, torch.Tensor) else type(row).__name__
            raise ValueError(f"{name}[{i}] must be a non-empty 1-D integer tensor, got {desc}")
    return ids


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _padded_causal(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """bool ``[B, T, T]``: causal over the first ``lengths[b]`` positions of each row; a pad row sees itself only
    (never an empty row), no real row sees a pad."""
    pos = torch.arange(total, device=lengths.device)
    valid = pos[None, :] < lengths[:, None]
    return ((pos[None, :] <= pos[:, None])[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool,
                                                                                device=lengths.device)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over all but the first dim: ``[B]``."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class LatentBlockVAE(nn.Module):
    """Block VAE: ``encoder`` (trainable causal LM) reads a block then ``N`` latent queries -> ``mu, logvar
    [B, N, d_z]``; ``decoder`` (a causal LM, frozen here) reconstructs the block, ended by ``eos_id``, from the
    projected latents prepended as embeddings."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, config: LaDiRConfig, eos_id: int):
        super().__init__()
        if not isinstance(config, LaDiRConfig):
            raise ValueError(f"config must be a LaDiRConfig, got {type(config).__name__}")
        self.config, self.eos_id = config, int(eos_id)
        self.encoder, self.decoder = encoder, decoder
        decoder.requires_grad_(False)
        d_enc, d_dec = encoder.config.hidden_size, decoder.config.hidden_size
        self.queries = nn.Parameter(torch.randn(config.latent_tokens, d_enc) * 0.02)
        self.to_mu = nn.Linear(d_enc, config.latent_dim)
        self.to_logvar = nn.Linear(d_enc, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, d_dec)

    def encode(self, blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``blocks``: B token-id rows (list of 1-D, or ``[B, L]``) -> ``(mu, logvar)``, each ``[B, N, d_z]``."""
        blocks = _check_ids_list("blocks", blocks)
        n, lengths = self.config.latent_tokens, [len(b) for b in blocks]
        emb = self.encoder.get_input_embeddings()
        dev = emb.weight.device
        x = emb(_pad([F.pad(b, (0, n)) for b in blocks]).to(dev))  # block tokens, then N query slots
        slots = torch.tensor(lengths, device=dev)[:, None] + torch.arange(n, device=dev)  # [B, N]
        rows = torch.arange(len(blocks), device=dev)[:, None].expand(-1, n)
        x = x.index_put((rows.flatten(), slots.flatten()), self.queries.to(x.dtype).repeat(len(blocks), 1))
        hidden, _ = _backbone(self.encoder, x, _padded_causal(slots[:, -1] + 1, x.shape[1]))
        h = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.to_mu(h), self.to_logvar(h)

    def _decoder_inputs(self, z: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
        """``[proj(z) ; embedded ids [B, L] (right-padded, ``lengths`` real)]`` and its causal mask."""
        emb = self.decoder.get_input_embeddings()
        x = torch.cat([self.from_latent(z).to(emb.weight.dtype), emb(ids.to(emb.weight.device))], 1)
        return x, _padded_causal(lengths.to(x.device) + self.config.latent_tokens, x.shape[1])

    def _check_z(self, z: torch.Tensor, batch: int | None = None) -> None:
        n, d = self.config.latent_tokens, self.config.latent_dim
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (n, d) or not z.is_floating_point() \
                or (batch is not None and z.shape[0] != batch):
            desc = f"{z.dtype} {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a float [{batch if batch is not None else 'B'}, {n}, {d}] tensor, got {desc}")

    def decode_loss(self, z: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced mean token cross-entropy of reconstructing each block followed by ``eos_id`` from
        ``z [B, N, d_z]``."""
        blocks = _check_ids_list("blocks", blocks)
        self._check_z(z, len(blocks))
        x, allowed = self._decoder_inputs(z, _pad(blocks), torch.tensor([len(b) for b in blocks]))
        _, logits = _backbone(self.decoder, x, allowed)
        n = self.config.latent_tokens
        labels = _pad([torch.cat([b, b.new_tensor([self.eos_id])]) for b in blocks], IGNORE_INDEX)
        # the logits at position n - 1 + i predict token i (token L is eos)
        pred = logits[:, n - 1:n - 1 + labels.shape[1]]
        return F.cross_entropy(_upcast(pred.flatten(0, 1)), labels.flatten(), ignore_index=IGNORE_INDEX)

    def forward(self, blocks: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training step: ``{"loss", "recon", "kl"}`` with ``loss = recon + kl_weight * kl``, ``z`` sampled by
        reparameterisation plus noise of std ``latent_noise_std``."""
        blocks = _check_ids_list("blocks", blocks)
        mu, logvar = self.encode(blocks)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        if self.config.latent_noise_std:
            z = z + self.config.latent_noise_std * torch.randn(mu.shape, generator=generator, device=mu.device,
                                                               dtype=mu.dtype)
        recon = self.decode_loss(z, blocks)
        kl = gaussian_kl(mu, logvar).mean()
        return {"loss": recon + self.config.kl_weight * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def generate_text(self, z: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy decoding from ``z [B, N, d_z]``: per row the token ids up to (not including) ``eos_id``."""
        self._check_z(z)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        b = z.shape[0]
        out = torch.zeros(b, 0, dtype=torch.long, device=z.device)
        done = torch.zeros(b, dtype=torch.bool, device=z.device)
        for _ in range(max_new_tokens):
            x, allowed = self._decoder_inputs(z, out, torch.full((b,), out.shape[1]))
            _, logits = _backbone(self.decoder, x, allowed)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        rows = []
        for row in out.tolist():
            rows.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        return rows


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of ``t [B]`` in ``[0, 1]`` (scaled by 1000, as diffusion time embeddings)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    ang = 1000.0 * t.float()[:, None] * freqs[None]
    feats = torch.cat([ang.sin(), ang.cos()], -1)
    return F.pad(feats, (0, dim - feats.shape[-1]))


@dataclass
class _Sequence:
    embeds: torch.Tensor  # [B, T, d]
    allowed: torch.Tensor  # bool [B, T, T]
    noisy: torch.Tensor | None  # [B, N] positions of the noisy latents
    eot_rows: torch.Tensor  # [E] row of each <eot> of a clean block
    eot_pos: torch.Tensor  # [E] its position
    eot_last: torch.Tensor  # [E] bool: the row's last clean block
    labels: torch.Tensor  # [B, T] answer-token targets of the logits at each position (IGNORE_INDEX elsewhere)
    lengths: list[int] = field(default_factory=list)


class LatentDenoiser(nn.Module):
    """The reasoner: causal LM ``lm`` (its embeddings holding ``tokens``) with latent input / output projections, a
    time embedding and the ``<eot>`` end-of-reasoning classifier. Latents passed in and returned are in the VAE's
    space; internally they are standardised with :meth:`set_latent_stats`."""

    def __init__(self, lm: nn.Module, config: LaDiRConfig, tokens: LaDiRTokens):
        super().__init__()
        if not isinstance(config, LaDiRConfig):
            raise ValueError(f"config must be a LaDiRConfig, got {type(config).__name__}")
        vocab = lm.get_input_embeddings().weight.shape[0]
        for name in ("bot", "eot", "soa", "eos"):
            if not 0 <= getattr(tokens, name) < vocab:
                raise ValueError(f"tokens.{name}={getattr(tokens, name)} is outside the LM's vocabulary of {vocab}")
        self.lm, self.config, self.tokens = lm, config, tokens
        d = lm.config.hidden_size
        self.latent_in = nn.Linear(config.latent_dim, d)
        self.latent_out = nn.Linear(d, config.latent_dim)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.stop_head = nn.Linear(d, 2)
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))

    @torch.no_grad()
    def set_latent_stats(self, latents: torch.Tensor) -> None:
        """Standardise latents by the per-channel mean and std of ``latents [..., d_z]`` (the training set's)."""
        if not isinstance(latents, torch.Tensor) or latents.shape[-1] != self.config.latent_dim or latents.numel() < 2:
            raise ValueError(f"latents must be [..., {self.config.latent_dim}] with several rows")
        flat = _upcast(latents.reshape(-1, self.config.latent_dim))
        self.latent_mean.copy_(flat.mean(0))
        self.latent_std.copy_(flat.std(0).clamp_min(1e-6))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean

    def _check_block(self, name: str, z: torch.Tensor, count: int | None = None) -> None:
        n, d = self.config.latent_tokens, self.config.latent_dim
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (n, d) or not z.is_floating_point() \
                or (count is not None and z.shape[0] != count):
            desc = f"{z.dtype} {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{name} must be a float [{'K' if count is None else count}, {n}, {d}] tensor, got {desc}")

    def build(self, questions: Sequence[torch.Tensor], contexts: Sequence[torch.Tensor] | None = None,
              noisy: torch.Tensor | None = None, t: torch.Tensor | None = None,
              answers: Sequence[torch.Tensor] | None = None) -> _Sequence:
        """Row ``i``: ``questions[i]`` ; each clean block of ``contexts[i] [K_i, N, d_z]`` (VAE space) as
        ``<bot> N latents <eot>`` ; if ``noisy`` (``[B, N, d_z]``, standardised) the block ``<bot> time(t[i]) N
        latents <eot>`` ; if ``answers`` ``<soa>`` and the answer tokens. Right-padded; the mask is
        :func:`block_spans_mask` over the padded length (pad positions come last, so no real row sees them)."""
        questions = _check_ids_list("questions", questions)
        b, n = len(questions), self.config.latent_tokens
        emb = self.lm.get_input_embeddings()
        dev, dtype = emb.weight.device, emb.weight.dtype
        if contexts is None:
            contexts = [torch.zeros(0, n, self.config.latent_dim, device=dev) for _ in range(b)]
        if len(contexts) != b:
            raise ValueError(f"contexts has {len(contexts)} rows for {b} questions")
        for i, c in enumerate(contexts):
            self._check_block(f"contexts[{i}]", c)
        if noisy is not None:
            self._check_block("noisy", noisy, b)
            if not isinstance(t, torch.Tensor) or t.shape != (b,):
                raise ValueError(f"t must be a [{b}] tensor with noisy, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            time = self.time_mlp(_time_features(t.to(dev), self.lm.config.hidden_size).to(dtype))
            noisy_emb = self.latent_in(noisy.to(dtype))
        if answers is not None:
            answers = list(answers)
            if len(answers) != b:
                raise ValueError(f"answers has {len(answers)} rows for {b} questions")
            for i, a in enumerate(answers):
                if not isinstance(a, torch.Tensor) or a.dim() != 1 or a.is_floating_point() or a.dtype == torch.bool:
                    raise ValueError(f"answers[{i}] must be a 1-D integer tensor")
        tk = self.tokens
        ids, spans, labels, eots = [], [], [], []
        ctx_at, noisy_at, time_at = [], [], []  # (row, position) of each context latent / noisy latent / time slot
        for i, q in enumerate(questions):
            row, row_spans = q.tolist(), []
            lab = [IGNORE_INDEX] * len(row)
            for k in range(len(contexts[i])):
                cur = len(row)
                ctx_at += [(i, cur + 1 + m) for m in range(n)]
                row += [tk.bot] + [0] * n + [tk.eot]
                row_spans.append((cur, cur + n + 2))
                eots.append((i, cur + n + 1, k == len(contexts[i]) - 1))
            if noisy is not None:
                cur = len(row)
                time_at.append((i, cur + 1))
                noisy_at += [(i, cur + 2 + m) for m in range(n)]
                row += [tk.bot, 0] + [0] * n + [tk.eot]
                row_spans.append((cur, cur + n + 3))
            lab += [IGNORE_INDEX] * (len(row) - len(lab))
            if answers is not None:
                a = answers[i].tolist()
                row += [tk.soa] + a
                lab += a + [IGNORE_INDEX]  # the logits at <soa> predict answer token 0, ...
            ids.append(torch.tensor(row, dtype=torch.long))
            spans.append(tuple(row_spans))
            labels.append(torch.tensor(lab, dtype=torch.long))
        x = emb(_pad(ids).to(dev))
        if ctx_at:
            flat = torch.cat(list(contexts)).to(dev).flatten(0, 1)
            x = x.index_put(tuple(torch.tensor(ctx_at, device=dev).T), self.latent_in(self.normalize(flat).to(dtype)))
        if noisy is not None:
            x = x.index_put(tuple(torch.tensor(time_at, device=dev).T), time)
            x = x.index_put(tuple(torch.tensor(noisy_at, device=dev).T), noisy_emb.flatten(0, 1))
        total = x.shape[1]
        masks = {s: block_spans_mask(total, list(s), device=dev) for s in set(spans)}  # rows share layouts
        allowed = torch.stack([masks[s] for s in spans])
        if eots:
            eot_rows, eot_pos, eot_last = (torch.tensor(v, device=dev) for v in zip(*eots))
        else:
            eot_rows = eot_pos = torch.zeros(0, dtype=torch.long, device=dev)
            eot_last = torch.zeros(0, dtype=torch.bool, device=dev)
        noisy_pos = torch.tensor(noisy_at, device=dev)[:, 1].view(b, n) if noisy is not None else None
        return _Sequence(x, allowed, noisy_pos, eot_rows, eot_pos, eot_last.bool(), _pad(labels, IGNORE_INDEX).to(dev),
                         [len(r) for r in ids])

    def run(self, seq: _Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, T, d], logits [B, T, V])`` of the LM on a built sequence."""
        return _backbone(self.lm, seq.embeds, seq.allowed)

    def velocity(self, hidden: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        """Predicted velocity ``[B, N, d_z]`` (standardised space) at the noisy latents."""
        idx = seq.noisy[..., None].expand(-1, -1, hidden.shape[-1])
        return _upcast(self.latent_out(hidden.gather(1, idx)))

    def stop_logits(self, hidden: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        """End-of-reasoning logits ``[E, 2]`` at every clean block's ``<eot>``."""
        return _upcast(self.stop_head(hidden[seq.eot_rows, seq.eot_pos]))

    def loss(self, questions: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor], answers: Sequence[torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses for B examples (``blocks[i]`` the clean latents ``[K_i >= 1, N, d_z]`` of example ``i``,
        VAE space): ``B`` flow rows (clean blocks before a uniformly drawn block ``j``, block ``j`` noised at
        ``t ~ U(0, 1)``; MSE on the velocity ``eps - x_0``) and ``B`` answer rows (all clean blocks, ``<soa>`` and
        the answer; cross-entropy), the ``<eot>`` classifier on every clean block of both. Returns
        ``{"loss", "flow", "stop", "answer"}``."""
        questions = _check_ids_list("questions", questions)
        b = len(questions)
        if len(blocks) != b or len(answers) != b:
            raise ValueError(f"questions, blocks and answers need the same length, got {b}, {len(blocks)}, "
                             f"{len(answers)}")
        for i, z in enumerate(blocks):
            self._check_block(f"blocks[{i}]", z)
            if z.shape[0] < 1:
                raise ValueError(f"blocks[{i}] holds no block")
        dev = self.latent_mean.device
        j = [int(torch.randint(len(z), (), generator=generator)) for z in blocks]
        x0 = self.normalize(torch.stack([z[k] for z, k in zip(blocks, j)]).to(dev))
        eps = torch.randn(x0.shape, generator=generator).to(dev)
        t = torch.rand(b, generator=generator).to(dev)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        flow_seq = self.build(questions, [z[:k] for z, k in zip(blocks, j)], xt, t)
        hidden, _ = self.run(flow_seq)
        flow = F.mse_loss(self.velocity(hidden, flow_seq), eps - x0)
        stop_logits = [self.stop_logits(hidden, flow_seq)]
        # in flow rows the last clean block is followed by the noisy one, so it is never the final block
        stop_target = [torch.zeros(len(flow_seq.eot_rows), dtype=torch.long, device=dev)]
        ans_seq = self.build(questions, list(blocks), answers=answers)
        hidden, logits = self.run(ans_seq)
        answer = F.cross_entropy(_upcast(logits.flatten(0, 1)), ans_seq.labels.flatten(), ignore_index=IGNORE_INDEX)
        stop_logits.append(self.stop_logits(hidden, ans_seq))
        stop_target.append(ans_seq.eot_last.long())
        stop = F.cross_entropy(torch.cat(stop_logits), torch.cat(stop_target))
        total = flow + self.config.stop_weight * stop + self.config.answer_weight * answer
        return {"loss": total, "flow": flow, "stop": stop, "answer": answer}


def diversity_force(x: torch.Tensor) -> torch.Tensor:
    """Repulsion among trajectories: ``x [G, R, ...]`` (G questions, R trajectories each) -> ``phi`` of the same
    shape, ``phi_i = (2 / h) sum_j exp(-|x_i - x_j|^2 / h) (x_i - x_j)`` per group, ``h`` the median squared
    distance of the group's pairs (module docstring). Zero for ``R = 1`` or identical trajectories."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [G, R, ...] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    g, r = x.shape[:2]
    if r < 2:
        return torch.zeros_like(x)
    flat = _upcast(x.reshape(g, r, -1))
    diff = flat[:, :, None] - flat[:, None, :]  # [G, R, R, D]: x_i - x_j
    d2 = diff.square().sum(-1)
    off = ~torch.eye(r, dtype=torch.bool, device=x.device)
    h = d2[:, off].median(-1).values.clamp_min(1e-12)  # [G]: lower median of the R (R - 1) entries
    k = torch.exp(-d2 / h[:, None, None]) * off
    phi = (2.0 / h[:, None, None]) * (k[..., None] * diff).sum(2)
    return phi.reshape(x.shape).to(x.dtype)


def flow_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, steps: int,
                diversity: float = 0.0) -> torch.Tensor:
    """Euler integration of ``dx/dt = velocity(x, t)`` from ``x_1 = noise [G, R, ...]`` at ``t = 1`` to ``t = 0``
    in ``steps`` uniform steps, with diversity guidance of scale ``diversity`` among the ``R`` trajectories of each
    group: ``x <- x + (t' - t) (v - diversity * t * diversity_force(x))``. ``velocity`` takes and returns
    ``[G * R, ...]``. Returns ``x_0 [G, R, ...]``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not math.isfinite(diversity) \
            or diversity < 0:
        raise ValueError(f"diversity={diversity!r} must be a finite number >= 0")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 3 or not noise.is_floating_point():
        raise ValueError(f"noise must be a float [G, R, ...] tensor, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    x = noise
    grid = [1.0 - i / steps for i in range(steps + 1)]
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = velocity(x.flatten(0, 1), t).reshape(x.shape)
        if diversity:
            v = v - diversity * t * diversity_force(x)
        x = x + (t_next - t) * v
    return x


@dataclass
class LaDiRSample:
    """Output of :func:`ladir_generate` for B questions x R trajectories: ``latents[b][r]`` ``[K, N, d_z]`` (VAE
    space), ``blocks[b][r]`` the VAE-decoded token ids of each block, ``answers[b][r]`` the answer token ids (up to
    ``eos``)."""

    latents: list[list[torch.Tensor]]
    blocks: list[list[list[list[int]]]]
    answers: list[list[list[int]]]


@torch.no_grad()
def ladir_generate(denoiser: LatentDenoiser, vae: LatentBlockVAE, question_ids: Sequence[torch.Tensor], *,
                   steps: int = 16, trajectories: int = 1, diversity: float = 0.0, max_blocks: int = 8,
                   min_blocks: int = 1, max_block_tokens: int = 32, max_answer_tokens: int = 16,
                   generator: torch.Generator | None = None) -> LaDiRSample:
    """LaDiR inference: for each question ``trajectories`` rows; blocks one after another, each from noise with
    ``steps`` Euler steps and diversity guidance (:func:`flow_sample`); after block ``k >= min_blocks`` a row stops
    when its ``<eot>`` classifier says so (at most ``max_blocks``); then each row's answer is decoded greedily after
    ``<soa>`` until ``eos``, and every block is decoded to text by ``vae``."""
    questions = _check_ids_list("question_ids", question_ids)
    for name, value, low in (("trajectories", trajectories, 1), ("max_blocks", max_blocks, 1),
                             ("min_blocks", min_blocks, 1), ("max_block_tokens", max_block_tokens, 1),
                             ("max_answer_tokens", max_answer_tokens, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if min_blocks > max_blocks:
        raise ValueError(f"min_blocks={min_blocks} must be <= max_blocks={max_blocks}")
    if vae.config.latent_tokens != denoiser.config.latent_tokens or vae.config.latent_dim != denoiser.config.latent_dim:
        raise ValueError("vae and denoiser configs disagree on latent_tokens / latent_dim")
    b, r = len(questions), trajectories
    n, d = denoiser.config.latent_tokens, denoiser.config.latent_dim
    dev = denoiser.latent_mean.device
    rows = [q.to(dev) for q in questions for _ in range(r)]
    contexts = [torch.zeros(0, n, d, device=dev) for _ in rows]
    active = torch.ones(len(rows), dtype=torch.bool)

    for k in range(max_blocks):
        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            seq = denoiser.build(rows, contexts, x, torch.full((len(rows),), t, device=dev))
            hidden, _ = denoiser.run(seq)
            return denoiser.velocity(hidden, seq)

        noise = torch.randn(b, r, n, d, generator=generator).to(dev)
        z = denoiser.denormalize(flow_sample(velocity, noise, steps, diversity).flatten(0, 1))
        contexts = [torch.cat([c, z[i:i + 1]]) if active[i] else c for i, c in enumerate(contexts)]
        if k + 1 >= min_blocks:
            seq = denoiser.build(rows, contexts)
            hidden, _ = denoiser.run(seq)
            logits = denoiser.stop_logits(hidden, seq)[seq.eot_last]  # one per row, rows in order
            active &= logits.argmax(-1).cpu() != 1
        if not bool(active.any()):
            break

    answers = [torch.zeros(0, dtype=torch.long, device=dev) for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_answer_tokens):
        seq = denoiser.build(rows, contexts, answers=answers)
        _, logits = denoiser.run(seq)
        last = torch.tensor(seq.lengths, device=dev) - 1
        nxt = logits[torch.arange(len(rows), device=dev), last].argmax(-1).cpu()
        nxt = torch.where(done, torch.full_like(nxt, denoiser.tokens.eos), nxt)
        answers = [torch.cat([a, nxt[i:i + 1].to(dev)]) for i, a in enumerate(answers)]
        done |= nxt == denoiser.tokens.eos
        if bool(done.all()):
            break
    eos = denoiser.tokens.eos
    answer_ids = [a.tolist() for a in answers]
    answer_ids = [a[:a.index(eos)] if eos in a else a for a in answer_ids]

    counts = [len(c) for c in contexts]
    texts = vae.generate_text(torch.cat(contexts), max_block_tokens) if sum(counts) else []
    per_row, start = [], 0
    for c in counts:
        per_row.append(texts[start:start + c])
        start += c
    group = lambda items: [items[i * r:(i + 1) * r] for i in range(b)]  # noqa: E731
    return LaDiRSample(group(contexts), group(per_row), group(answer_ids))
