"""DHSA: Dynamic Hierarchical Sparse Attention (Xiong et al., arXiv 2510.24606; xiongsiheng/DHSA).

A prompt is cut into variable-length chunks at content boundaries. Each chunk gets a
length-normalised representative (mean of its queries / keys times sqrt(chunk length)); the chunk
similarity ``S_c = Q_c K_c^T`` (causal at chunk level), upsampled to tokens, decides which keys each
query keeps: the best whole chunks in score order up to a budget of ``budget`` keys, plus the first
(sink) chunk, the query's own chunk (token-causal) and ``local_chunks`` chunks before it.

Boundaries come from a training-free rule by default (:func:`similarity_scores`: a boundary where the
keys after a gap stop resembling the keys before it), or from the paper's small trained
:class:`BoundaryPredictor` (``boundaries="predictor"``, trained by :mod:`vzoo.lm.train_boundaries`).

Kernel mapping (exact): every chunk is laid out from a block boundary (padded to a multiple of
``block_size`` with dummy tokens the key mask hides; causal order is kept), so each padded query
block belongs to one chunk and its layout row is the key blocks of that chunk's selected chunks;
:func:`vzoo.kernels.block_sparse_attention` runs causally on the padded tensors and the output is
un-padded. Prefill only: decoding steps and prompts continuing a cache run dense attention. In padded
batches the padding keys are hidden (key mask) and neither enter a representative nor count against
the budget; chunks made only of padding are never selected.

Paper vs official code: vzoo follows the paper's chunk-by-chunk ``S_c`` (queries grouped by the same
chunks as keys, one selection per query chunk). The official legacy code (``legacy/utils/helper.py``,
``_obtain_dhsa_mask``) scores fixed-size query blocks against the variable key chunks, averages q and k
over heads (vzoo's ``heads="shared"``), keeps the top tokens by ``torch.topk`` of the upsampled scores
(ties inside a chunk unordered) and always adds 128 first and 128 most recent tokens (vzoo: the sink
chunk and ``local_chunks``); its boundaries come from the predictor with a top-k and non-maximum
suppression post-process, as :func:`pick_boundaries` does with a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import BlockSparseLayout, block_sparse_attention

from .layers import Attachment, dense_attention, key_validity, run_dense, select_layers
from .registry import LMMethod, register_lm_method

__all__ = [
    "BoundaryPredictor", "Chunks", "DHSAConfig", "attach_predictor", "chunk_starts", "dhsa_attention", "dhsa_selection",
    "layout_chunks", "load_boundary_predictors", "new_predictor", "pick_boundaries", "pre_rope_keys", "representatives",
    "save_boundary_predictors", "select_chunks", "similarity_scores", "sparse_attention",
]

HEADS = ("shared", "kv", "query")
BOUNDARIES = ("similarity", "predictor")


@dataclass(frozen=True)
class DHSAConfig:
    """DHSA settings. Defaults: the best perplexity measured at 8k tokens below 0.5 density.

    Measured on SmolLM2-135M-Instruct (``vzoo.lm_quality`` text, perplexity of the last half, fp32 CPU,
    one thread; chunks 16-64, 8 local chunks unless said). 8192 tokens, dense 9.73: ``heads="query"``
    with budget 2048 / 1536 / 1024 selects 0.44 / 0.34 / 0.23 of the causal pairs, perplexity 10.14 /
    10.82 / 11.33; ``heads="shared"`` (the official rule) 11.47 at 2048 and 11.87 at 1024. 4096 tokens,
    dense 9.88: ``"shared"`` at 1024 (0.44) 10.40; chunks 32-128 with 1 local chunk 10.71 (``"query"``
    10.69, ``"kv"`` 11.01); sink and local chunks alone 12.07. Prefill time at 0.44 was above dense
    on this CPU (the block-sparse kernel's break-even is lower with per-head layouts of 16-token blocks).
    These perplexities predate ``dense_tail`` (it changes the last 64 of 4096 scored positions).

    Args:
        budget: keys kept per query chunk, counted in whole chunks in score order (ties: the earlier
            chunk first); the chunk that crosses the budget is kept whole, so a row keeps at least
            ``budget`` keys when it has them and at most ``budget + max_chunk - 1``. The sink, own and
            local chunks come first and count. Every query before position ``budget`` stays dense.
        min_chunk, max_chunk: chunk lengths in tokens (``max_chunk >= 2 * min_chunk``, so splitting a
            long chunk evenly never makes one shorter than ``min_chunk``). 16 / 64: ~260 chunks at 8k
            (``S_c`` costs nothing); finer chunks selected better (see above).
        boundary_window: keys averaged on each side of a gap by the similarity rule (and the
            predictor's half-window; the official ``boundary_window_size`` is 4).
        max_similarity: the rule's cut: a gap is a boundary candidate when the cosine similarity of
            the mean keys before and after it is below this (1.0: any gap; the rule then places one
            boundary at the sharpest shift of every neighbourhood of ``min_chunk``).
        block_size: kernel block; chunks are padded to a multiple of it (16: ~8 dummy tokens a chunk;
            8 was slower on CPU despite less padding).
        local_chunks: chunks before the query's own chunk that are always kept (8: ~300 recent
            tokens; the official code keeps the 128 most recent tokens).
        dense_tail: the last ``dense_tail`` prompt positions start their own chunk and keep every key
            (the official ``instruction_tokens=64``: the question at the end of a prompt reads all of
            it; passkey retrieval at 8k: 3 of 3 probes with it, 0 of 3 without).
        sink: always keep the first chunk (the attention sink; the official code keeps 128 first tokens).
        heads: ``"query"``: one selection per query head (default: far better at 8k, see above);
            ``"kv"``: one per key/value head (its query group averaged); ``"shared"``: one for all
            heads from head-averaged q and k (the official code).
        boundaries: ``"similarity"`` (training-free rule) or ``"predictor"`` (:class:`BoundaryPredictor`).
        predictor: safetensors file of trained predictors (:func:`save_boundary_predictors`);
            ``None`` with ``boundaries="predictor"``: untrained predictors (for training only).
        predictor_threshold: boundary probability above which a gap is a predictor candidate.
        predictor_hidden: hidden width of new predictors' classifier MLP.
        layers: layer indices that use DHSA (``None``: all); the others keep SDPA.
        dense_fallback: a prompt whose selection is denser than the break-even density of this
            device (:func:`vzoo.kernels.dense_is_faster`, op ``"dhsa"``) runs dense attention
            instead (DHSA approximates it): never slower than dense. ``False``: always the selection.
    """

    budget: int = 2048
    min_chunk: int = 16
    max_chunk: int = 64
    boundary_window: int = 4
    max_similarity: float = 1.0
    block_size: int = 16
    local_chunks: int = 8
    dense_tail: int = 64
    sink: bool = True
    heads: str = "query"
    boundaries: str = "similarity"
    predictor: str | None = None
    predictor_threshold: float = 0.5
    predictor_hidden: int = 128
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = True

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use DHSA."""
        return select_layers("DHSAConfig.layers", self.layers, num_layers)

    def __post_init__(self) -> None:
        for name, low in (("budget", 1), ("min_chunk", 1), ("boundary_window", 1), ("block_size", 1),
                          ("local_chunks", 0), ("dense_tail", 0),
                          ("predictor_hidden", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DHSAConfig.{name}={value!r} must be an int >= {low}")
        if not isinstance(self.max_chunk, int) or isinstance(self.max_chunk, bool) or self.max_chunk < 2 * self.min_chunk:
            raise ValueError(f"DHSAConfig.max_chunk={self.max_chunk!r} must be an int >= 2 * min_chunk ({2 * self.min_chunk})")
        if not isinstance(self.max_similarity, (int, float)) or not -1.0 <= self.max_similarity <= 1.0:
            raise ValueError(f"DHSAConfig.max_similarity={self.max_similarity!r} must lie in [-1, 1]")
        if not isinstance(self.predictor_threshold, (int, float)) or not 0.0 < self.predictor_threshold < 1.0:
            raise ValueError(f"DHSAConfig.predictor_threshold={self.predictor_threshold!r} must lie in (0, 1)")
        if self.heads not in HEADS:
            raise ValueError(f"DHSAConfig.heads={self.heads!r} must be one of {HEADS}")
        if self.boundaries not in BOUNDARIES:
            raise ValueError(f"DHSAConfig.boundaries={self.boundaries!r} must be one of {BOUNDARIES}")
        if self.predictor is not None and (not isinstance(self.predictor, str) or self.boundaries != "predictor"):
            raise ValueError(f"DHSAConfig.predictor={self.predictor!r} must be None or a path (str) with boundaries='predictor'")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"DHSAConfig.layers={self.layers!r} must be None or non-negative layer indices")
        for name in ("sink", "dense_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DHSAConfig.{name}={getattr(self, name)!r} must be a bool")


# ------------------------------------------------------------------------------------------------
# boundaries


def similarity_scores(key: torch.Tensor, window: int) -> torch.Tensor:
    """Cosine similarity ``[B, S]`` at each gap: entry ``t`` compares the mean of keys ``t - window ..
    t - 1`` with the mean of keys ``t .. t + window - 1`` (windows clipped at the ends), heads
    concatenated (``key [B, Hkv, S, D]``). Entry 0 (no gap) is 1. After RoPE the rule is the same at
    every position: both means share the rotation of position ``t``, which cosine ignores."""
    b, h, s, d = key.shape
    x = key.float().permute(0, 2, 1, 3).reshape(b, s, h * d)
    csum = F.pad(x.cumsum(1), (0, 0, 1, 0))  # csum[:, t] = sum of keys < t
    t = torch.arange(s + 1, device=key.device)
    lo, hi = (t - window).clamp_min(0), (t + window).clamp_max(s)
    left = (csum[:, t] - csum[:, lo]) / (t - lo).clamp_min(1)[:, None]
    right = (csum[:, hi] - csum[:, t]) / (hi - t).clamp_min(1)[:, None]
    sim = F.cosine_similarity(left, right, dim=-1, eps=1e-6)[:, :s]
    sim[:, 0] = 1.0
    return sim


def pick_boundaries(score: torch.Tensor, cut: float, min_chunk: int) -> torch.Tensor:
    """Boundary candidates bool ``[B, S]`` from gap scores ``[B, S]`` (higher: more of a boundary; entry
    ``t`` is the gap before token ``t``): ``score > cut``, at least ``min_chunk`` tokens from both ends,
    and a strict maximum over the ``min_chunk - 1`` gaps before and at least as high as the
    ``min_chunk - 1`` after (one non-maximum suppression: kept candidates are ``min_chunk`` apart)."""
    b, s = score.shape
    m = min_chunk
    t = torch.arange(s, device=score.device)
    keep = (score > cut) & (t >= m) & (t <= s - m)
    if m > 1:
        pad = F.pad(score.float()[:, None], (m - 1, m - 1), value=float("-inf"))
        windows = pad.unfold(2, m - 1, 1)[:, 0]  # [B, S + m, m - 1]: windows[:, i] = score[i - m + 1 .. i - 1]
        before, after = windows[:, :s].amax(-1), windows[:, m : m + s].amax(-1)
        keep &= (score > before) & (score >= after)
    return keep


def chunk_starts(candidates: torch.Tensor, max_chunk: int) -> torch.Tensor:
    """Chunk starts bool ``[B, S]`` (token 0 always): the ``candidates`` plus even splits of every chunk
    longer than ``max_chunk`` into ``ceil(len / max_chunk)`` pieces (pieces differ by at most one token)."""
    b, s = candidates.shape
    starts = candidates.clone()
    starts[:, 0] = True
    cid = starts.long().cumsum(1) - 1
    t = torch.arange(s, device=candidates.device).expand(b, s)
    first = torch.zeros(b, s, dtype=torch.long, device=t.device).scatter_reduce(1, cid, t, "amin", include_self=False)
    length = torch.zeros(b, s, dtype=torch.long, device=t.device).scatter_add(1, cid, torch.ones_like(t))
    begin, size = first.gather(1, cid), length.gather(1, cid)
    pieces = -(-size // max_chunk)
    piece = ((t - begin + 1) * pieces - 1) // size  # piece j starts at begin + floor(j * size / pieces)
    split = piece != F.pad(piece, (1, 0), value=-1)[:, :s]
    return starts | (split & (t > begin))


class BoundaryPredictor(nn.Module):
    """DHSA's boundary predictor (the official ``BoundarySimilarityAttn`` design, re-implemented).

    ``forward(keys [B, S, C]) -> logits [B, S]``: entry ``t`` scores a boundary at the gap before token
    ``t`` from pre-RoPE keys (heads concatenated, ``C = Hkv * D``). The ``2 * window`` tokens around
    the gap (zero-padded at the ends) are encoded together by one multi-head self-attention (``heads``
    heads) and a LayerNorm, shared by both sides; each side is pooled by a learned softmax gate; the
    left and right vectors, their absolute difference, product and cosine similarity feed an MLP.
    """

    def __init__(self, channels: int, window: int = 4, hidden: int = 128, heads: int = 1) -> None:
        super().__init__()
        self.channels, self.window, self.hidden, self.heads = channels, window, hidden, heads
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)
        self.gate = nn.Linear(channels, 1, bias=False)
        self.mlp = nn.Sequential(nn.Linear(4 * channels + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(self.gate(x), 1) * x).sum(1)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        b, s, c = keys.shape
        w = self.window
        padded = F.pad(keys, (0, 0, w, w))  # token t sits at t + w
        windows = padded.unfold(1, 2 * w, 1)[:, :s].permute(0, 1, 3, 2).reshape(b * s, 2 * w, c)  # tokens t - w .. t + w - 1
        enc = self.norm(self.attn(windows, windows, windows, need_weights=False)[0])
        left, right = self._pool(enc[:, :w]), self._pool(enc[:, w:])
        sim = F.cosine_similarity(left, right, dim=-1, eps=1e-6)[:, None]
        feat = torch.cat([left, right, (left - right).abs(), left * right, sim], -1)
        return self.mlp(feat).view(b, s)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, window={self.window}, hidden={self.hidden}, heads={self.heads}"


def pre_rope_keys(module: nn.Module) -> list:
    """Forward hooks that store ``module``'s pre-RoPE keys ``[B, S, Hkv * D]`` (after ``k_norm`` when the
    model has one) on ``module.vzoo_pending_keys``. Returns the hook handles."""
    norm = getattr(module, "k_norm", None)
    kv_heads = module.config.num_key_value_heads

    def hook(mod, args, out):
        x = out.unflatten(-1, (kv_heads, -1))
        module.vzoo_pending_keys = (x if norm is None else norm(x)).flatten(-2).detach()

    return [module.k_proj.register_forward_hook(hook)]


def attach_predictor(model: nn.Module, module: nn.Module, config: DHSAConfig) -> Attachment | None:
    """With ``boundaries="predictor"``: give ``module`` its ``vzoo_boundary_predictor`` (loaded from
    ``config.predictor`` when set) and the hook that hands it the pre-RoPE keys."""
    if config.boundaries != "predictor":
        return None
    ref = module.k_proj.weight
    if config.predictor is not None:
        predictor = load_boundary_predictors(config.predictor, layers=(module.layer_idx,))[module.layer_idx]
        channels = module.config.num_key_value_heads * module.head_dim
        if predictor.channels != channels:
            raise ValueError(f"{config.predictor}: layer {module.layer_idx} predictor takes {predictor.channels} "
                             f"key channels, the model has {channels}")
    else:
        predictor = new_predictor(module, config)
    module.vzoo_boundary_predictor = predictor.to(ref.device).eval()
    return Attachment(module, ("vzoo_boundary_predictor", "vzoo_pending_keys"), tuple(pre_rope_keys(module)))


def new_predictor(module: nn.Module, config: DHSAConfig) -> BoundaryPredictor:
    """An untrained predictor for attention ``module``: one attention head per key/value head."""
    kv_heads = module.config.num_key_value_heads
    return BoundaryPredictor(kv_heads * module.head_dim, config.boundary_window, config.predictor_hidden, kv_heads)


def save_boundary_predictors(predictors: dict[int, BoundaryPredictor], path: str | Path) -> Path:
    """Write per-layer predictors (``{layer index: predictor}``) as one safetensors file, atomically
    (tensors ``layers.{i}.{parameter}``, architecture in the metadata)."""
    from safetensors.torch import save_file

    from vzoo.atomic import write_atomic

    if not predictors:
        raise ValueError("no boundary predictors to save")
    tensors, meta = {}, {"format": "vzoo-dhsa-boundaries"}
    for i, p in predictors.items():
        tensors.update({f"layers.{i}.{k}": v.detach().cpu().contiguous() for k, v in p.state_dict().items()})
        meta[f"layers.{i}"] = f"{p.channels},{p.window},{p.hidden},{p.heads}"
    write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return Path(path)


def load_boundary_predictors(path: str | Path, layers: tuple[int, ...] | None = None) -> dict[int, BoundaryPredictor]:
    """Predictors saved by :func:`save_boundary_predictors` (``layers``: only these; ``None``: all).
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable or foreign one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DHSA boundary predictor file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "vzoo-dhsa-boundaries":
                raise ValueError(f"{path}: not a DHSA boundary predictor file (no vzoo-dhsa-boundaries metadata)")
            stored = {int(k.split(".")[1]): v for k, v in meta.items() if k.startswith("layers.")}
            wanted = sorted(stored) if layers is None else list(layers)
            missing = [i for i in wanted if i not in stored]
            if missing:
                raise ValueError(f"{path}: no boundary predictor for layers {missing} (it has {sorted(stored)})")
            out = {}
            for i in wanted:
                channels, window, hidden, heads = (int(v) for v in stored[i].split(","))
                predictor = BoundaryPredictor(channels, window, hidden, heads)
                prefix = f"layers.{i}."
                predictor.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
                out[i] = predictor
            return out
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors for truncated / corrupt files
        raise ValueError(f"{path}: cannot read the DHSA boundary predictor file ({exc})") from exc


def _boundaries(config: DHSAConfig, key: torch.Tensor, module: nn.Module | None, pending: torch.Tensor | None) -> torch.Tensor:
    """Chunk starts bool ``[B, S]`` of a prompt with keys ``key [B, Hkv, S, D]`` (after RoPE)."""
    if config.boundaries == "predictor":
        if pending is None:
            raise RuntimeError("DHSA boundary predictor got no pre-RoPE keys: apply DHSAConfig(boundaries='predictor') "
                               "with apply_sparse_attention, which attaches the hooks")
        predictor = module.vzoo_boundary_predictor
        with torch.no_grad():
            prob = torch.sigmoid(predictor(pending.to(next(predictor.parameters()).dtype)).float())
        candidates = pick_boundaries(prob, config.predictor_threshold, config.min_chunk)
    else:
        candidates = pick_boundaries(-similarity_scores(key, config.boundary_window), -config.max_similarity, config.min_chunk)
    s = key.shape[2]
    if 0 < s - config.dense_tail:
        candidates[:, s - config.dense_tail] = True
    return chunk_starts(candidates, config.max_chunk)


# ------------------------------------------------------------------------------------------------
# selection


@dataclass
class Chunks:
    """A prompt's chunks and their padded layout.

    Attributes:
        cid: int64 ``[B, S]`` chunk of each token; ``C`` chunks per row at most (rows with fewer end in
            empty chunks).
        count: int64 ``[B, C]`` valid (unpadded) tokens of each chunk.
        first: int64 ``[B, C]`` position of each chunk's first token (``S`` for empty chunks).
        pos: int64 ``[B, S]`` padded position of each token (chunks start on ``block`` boundaries).
        block_chunk: int64 ``[B, NB]`` chunk of each padded block, ``-1`` past the row's last chunk.
        padded: padded length ``NB * block``.
    """

    cid: torch.Tensor
    count: torch.Tensor
    first: torch.Tensor
    pos: torch.Tensor
    block_chunk: torch.Tensor
    padded: int


def layout_chunks(starts: torch.Tensor, valid: torch.Tensor | None, block: int) -> Chunks:
    """Chunks from ``starts [B, S]`` (bool) and the unpadded tokens ``valid [B, S]`` (``None``: all), laid
    out from multiples of ``block``."""
    b, s = starts.shape
    dev = starts.device
    cid = starts.long().cumsum(1) - 1
    c = int(cid[:, -1].max()) + 1
    ones = torch.ones(b, s, dtype=torch.long, device=dev)
    length = torch.zeros(b, c, dtype=torch.long, device=dev).scatter_add(1, cid, ones)
    count = length if valid is None else torch.zeros_like(length).scatter_add(1, cid, valid.long())
    first = F.pad(length.cumsum(1), (1, 0))[:, :-1]  # empty (trailing) chunks start at S
    blocks = -(-length // block)
    first_block = F.pad(blocks.cumsum(1), (1, 0))  # [B, C + 1]
    pos = first_block[:, :-1].gather(1, cid) * block + torch.arange(s, device=dev) - first.gather(1, cid)
    nb = int(first_block[:, -1].max())
    n = torch.arange(nb, device=dev).expand(b, nb).contiguous()
    block_chunk = torch.searchsorted(first_block[:, :-1].contiguous(), n, right=True) - 1
    block_chunk = block_chunk.masked_fill(n >= first_block[:, -1:], -1)
    return Chunks(cid, count, first, pos, block_chunk, nb * block)


def _group(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x [B, H, S, D]`` averaged over groups of heads down to ``heads``, or repeated up to it."""
    h = x.shape[1]
    if heads >= h:
        return x.repeat_interleave(heads // h, 1)
    return x.unflatten(1, (heads, h // heads)).mean(2)


def representatives(x: torch.Tensor, chunks: Chunks, valid: torch.Tensor | None) -> torch.Tensor:
    """Length-normalised chunk representatives ``[B, H, C, D]`` (fp32) of ``x [B, H, S, D]``: the mean
    of each chunk's valid tokens times ``sqrt`` of their number (i.e. their sum / sqrt(count)); 0 for
    chunks without valid tokens."""
    b, h, s, d = x.shape
    x = x.float() if valid is None else x.float() * valid[:, None, :, None]
    index = chunks.cid[:, None, :, None].expand(b, h, s, d)
    sums = torch.zeros(b, h, chunks.count.shape[1], d, device=x.device).scatter_add(2, index, x)
    return sums / chunks.count.clamp_min(1).sqrt()[:, None, :, None]


def select_chunks(config: DHSAConfig, q_rep: torch.Tensor, k_rep: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """bool ``[B, Hs, C, C]``: key chunks kept by each query chunk, from representatives ``q_rep, k_rep
    [B, Hs, C, D]``. Causal at chunk level; forced chunks (own, ``local_chunks`` before it, the sink:
    the first chunk with a valid token) first, then the others by ``S_c = Q_c K_c^T`` (stable: ties to
    the earlier chunk), whole chunks while fewer than ``budget`` valid keys are kept. Query chunks that
    start in the last ``dense_tail`` positions keep every causal chunk."""
    b, hs, c, _ = q_rep.shape
    dev = q_rep.device
    scores = q_rep @ k_rep.transpose(-1, -2)
    i = torch.arange(c, device=dev)
    has = chunks.count > 0  # [B, C]
    allowed = (i[None, :] <= i[:, None]) & has[:, None, :]  # [B, C(q), C(k)]
    forced = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - config.local_chunks)
    if config.sink:
        first = has.long().argmax(1)  # [B]
        forced = forced | (i[None, None, :] == first[:, None, None])
    tail = chunks.first >= chunks.cid.shape[1] - config.dense_tail  # [B, C]
    forced = (forced | tail[:, :, None]) & allowed
    scores = scores.masked_fill(~allowed[:, None], float("-inf")).masked_fill(forced[:, None], float("inf"))
    order = scores.sort(dim=-1, descending=True, stable=True)
    sizes = chunks.count[:, None, None, :].expand(b, hs, c, c).gather(-1, order.indices)
    before = sizes.cumsum(-1) - sizes
    keep = (order.values > float("-inf")) & ((before < config.budget) | (order.values == float("inf")))
    return torch.zeros_like(keep).scatter(-1, order.indices, keep)


def _selected_pairs(chosen: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Causal (query, key) token pairs the chunk selection ``chosen [B, Hs, C, C]`` covers (float64 scalar)."""
    n = count.double()
    pairs = n[:, :, None] * n[:, None, :]
    diag = torch.diagonal(pairs, dim1=-2, dim2=-1)
    pairs = pairs.tril(-1) + torch.diag_embed((diag + n) / 2)
    return (chosen * pairs[:, None]).sum()


def dhsa_selection(
    config: DHSAConfig, query: torch.Tensor, key: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[Chunks, torch.Tensor, float]:
    """The chunks of a prompt (``starts [B, S]``), the kept chunk pairs ``[B, Hs, C, C]`` (``Hs`` by
    ``config.heads``) and the selected share of the causal (query, key) pairs, for ``query [B, H, S, D]``
    and ``key [B, Hkv, S, D]`` (after RoPE) with unpadded tokens ``valid [B, S]``."""
    hs = {"shared": 1, "kv": key.shape[1], "query": query.shape[1]}[config.heads]
    chunks = layout_chunks(starts, valid, config.block_size)
    q_rep = representatives(_group(query, hs), chunks, valid)
    k_rep = representatives(_group(key, hs), chunks, valid)
    chosen = select_chunks(config, q_rep, k_rep, chunks)
    n = chunks.count.sum(1).double()
    density = float(_selected_pairs(chosen, chunks.count) / (hs * (n * (n + 1) / 2).sum()).clamp_min(1))
    return chunks, chosen, density


def _pad(x: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """``x [B, H, S, D]`` scattered to its padded positions ``[B, H, P, D]`` (zeros elsewhere)."""
    b, h, s, d = x.shape
    out = x.new_zeros(b, h, chunks.padded, d)
    return out.scatter(2, chunks.pos[:, None, :, None].expand(b, h, s, d), x)


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunks: Chunks, chosen: torch.Tensor,
    valid: torch.Tensor | None, block: int, scale: float, tail: int = 0,
) -> torch.Tensor:
    """Attention of ``query [B, H, S, D]`` over the keys of the chunks ``chosen [B, Hs, C, C]`` keeps
    (token-causal, ``valid [B, S]`` keys only) on the block-sparse kernel. Returns ``[B, H, S, D]``.
    The last ``tail`` queries (a chunk must start at ``S - tail``; their chunks keep every key) run
    dense SDPA instead, so their full rows do not widen every row list of the kernel."""
    b, _, s, d = query.shape
    t0 = max(s - tail, 0)
    bc = chunks.block_chunk  # [B, NB]
    nb, (hs, c) = bc.shape[1], chosen.shape[1:3]
    rows = chosen.gather(2, bc.clamp_min(0)[:, None, :, None].expand(b, hs, nb, c))  # [B, Hs, NB, C]
    mask = rows.gather(3, bc.clamp_min(0)[:, None, None, :].expand(b, hs, nb, nb))  # [B, Hs, NB, NB]
    sparse_rows = (bc >= 0) & (chunks.first.gather(1, bc.clamp_min(0)) < t0)  # not in the dense tail
    mask &= sparse_rows[:, None, :, None] & (bc >= 0)[:, None, None, :]
    mask &= torch.ones(nb, nb, dtype=torch.bool, device=bc.device).tril()  # no key block after the query block
    keys = torch.ones_like(chunks.pos, dtype=torch.bool) if valid is None else valid
    key_mask = torch.zeros(b, chunks.padded, dtype=torch.bool, device=query.device).scatter(1, chunks.pos, keys)
    layout = BlockSparseLayout.from_block_mask(mask, block, block, chunks.padded, chunks.padded)
    out = block_sparse_attention(
        _pad(query, chunks), _pad(key, chunks), _pad(value, chunks), layout, causal=True, scale=scale, key_mask=key_mask
    )
    out = out.gather(2, chunks.pos[:, None, :, None].expand(b, query.shape[1], s, d))
    if t0 < s:
        pos = torch.arange(s, device=query.device)
        seen = (pos[None, :] <= pos[t0:, None])[None, None] & keys[:, None, None, :]  # [B, 1, S - t0, S]
        out[:, :, t0:] = dense_attention(query[:, :, t0:], key, value, seen, scale)
    return out


def dhsa_attention(
    config: DHSAConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, **_,
) -> torch.Tensor:
    """DHSA over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is transformers' (``None``: causal only, else bool / additive ``[B, 1, q, kv]``).
    Returns ``[B, H, q, D]``. Prompts (``q == kv > 1``) are sparse; decoding steps and prompts that
    continue a cache run the model's dense attention."""
    pending = getattr(module, "vzoo_pending_keys", None)
    if pending is not None:
        module.vzoo_pending_keys = None
    sq, skv = query.shape[2], key.shape[2]
    if sq != skv or sq == 1:
        return dense_attention(query, key, value, attention_mask, scale)
    valid = None if attention_mask is None else key_validity(attention_mask)[:, :skv]
    with torch.no_grad():
        starts = _boundaries(config, key, module, pending)
        chunks, chosen, density = dhsa_selection(config, query, key, starts, valid)
    if run_dense(module, config.dense_fallback, density, query.device, "dhsa"):
        return dense_attention(query, key, value, attention_mask, scale)
    return sparse_attention(query, key, value, chunks, chosen, valid, config.block_size, scale, config.dense_tail)


register_lm_method(LMMethod(
    config=DHSAConfig, attn_implementation="vzoo_dhsa", label="DHSA", attention=dhsa_attention,
    paper="Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs (2025)", arxiv="2510.24606",
    ops=("block_sparse_attention",),
    status="prefill-sparse (decode dense); similarity-rule or trained boundary predictor",
    attach=attach_predictor,
    window_error=lambda config, window: "its variable-length chunks have no sliding-window rule",
    bench=lambda tokens: {"dhsa (defaults)": DHSAConfig()},
    contract=lambda: {"dhsa": DHSAConfig(budget=10**6, min_chunk=2, max_chunk=8, block_size=4, dense_fallback=False)},
))
