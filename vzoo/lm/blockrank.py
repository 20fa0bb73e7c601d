"""BlockRank: in-context ranking with structured attention (Gupta et al., arXiv 2510.05396;
nilesh2797/BlockRank).

The prompt is packed into ``M`` segments of ``block_length`` tokens, each left-padded: segment 0 holds
the instruction, segments ``1 .. M-2`` the candidate documents, segment ``M-1`` the query (ending where
the answer starts). Attention is causal inside a segment; documents also see the instruction and the
query sees everything. Positions restart at the instruction's length in every document and the query
starts at 16384, so a document's states do not depend on where it sits in the prompt.

Relevance is read at one middle layer: the last query tokens' softmax over the document tokens, averaged
over heads and those tokens and summed per document. The same scores feed the auxiliary contrastive
loss used for fine-tuning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels import BlockSparseLayout, block_sparse_attention
from vzoo.kernels.reference import visible_keys
from vzoo.kernels.torch_backend import masked_sdpa

from .layers import Attachment, record_density, select_layers
from .registry import LMMethod, register_lm_method

__all__ = [
    "BlockRankConfig", "BlockRankPrompt", "blockrank_attention", "blockrank_aux_loss", "blockrank_layout",
    "document_scores", "pack_ids", "pack_prompt", "rank", "scores_of",
]

QUERY_OFFSET = 16384  # the official position offset of the query segment
INSTRUCTION = "Rank the following passages by their relevance to the query."


@dataclass(frozen=True)
class BlockRankConfig:
    """BlockRank settings (official: segments of 160 tokens for training, 384 for evaluation; scores at
    layer 20 of 32 for Mistral-7B; two query tokens).

    Args:
        block_length: tokens per segment (``H``).
        score_layers: layers whose attention scores documents, averaged (``None``: the middle layer).
        score_tokens: last query tokens whose attention is read.
    """

    block_length: int = 160
    score_layers: tuple[int, ...] | None = None
    score_tokens: int = 2

    def __post_init__(self) -> None:
        for name in ("block_length", "score_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockRankConfig.{name}={value!r} must be a positive int")
        if self.score_layers is not None and (
            not self.score_layers or not all(isinstance(i, int) and i >= 0 for i in self.score_layers)
        ):
            raise ValueError(f"BlockRankConfig.score_layers={self.score_layers!r} must be None or layer indices")
        if self.score_tokens > self.block_length:
            raise ValueError(f"BlockRankConfig.score_tokens={self.score_tokens} exceeds block_length={self.block_length}")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """Every layer uses the structured attention."""
        self.scoring_layers(num_layers)  # checks score_layers against the model
        return tuple(range(num_layers))

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.score_layers is None:
            return (num_layers // 2,)
        return select_layers("BlockRankConfig.score_layers", self.score_layers, num_layers)


@dataclass
class BlockRankPrompt:
    """A packed prompt: ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``position_ids``,
    each ``[B, M * H]``; segment ``s`` spans tokens ``s * H .. (s + 1) * H - 1``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    block_length: int

    @property
    def num_segments(self) -> int:
        return self.input_ids.shape[1] // self.block_length

    @property
    def num_documents(self) -> int:
        return self.num_segments - 2

    @property
    def segment_ids(self) -> torch.Tensor:
        """``[B, M * H]``: 0 instruction, ``1 .. M-2`` documents, ``M-1`` query."""
        seg = torch.arange(self.input_ids.shape[1], device=self.input_ids.device) // self.block_length
        return seg.expand_as(self.input_ids)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pack_ids(
    instruction: list[int], documents: list[list[int]], query: list[int], block_length: int, pad_id: int
) -> BlockRankPrompt:
    """Pack token ids into ``2 + len(documents)`` left-padded segments (batch of one). Documents and the
    instruction keep their first ``block_length`` tokens, the query its last (it ends at the answer)."""
    if not documents:
        raise ValueError("BlockRank needs at least one document")
    if not query:
        raise ValueError("the query segment is empty")
    segments = [instruction[:block_length], *(d[:block_length] for d in documents), query[-block_length:]]
    ids = torch.full((len(segments), block_length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(segments), block_length, dtype=torch.long)
    for s, seg in enumerate(segments):
        if seg:
            ids[s, block_length - len(seg) :] = torch.tensor(seg)
            mask[s, block_length - len(seg) :] = 1
    pos = mask.cumsum(-1)
    pos[1:-1] += pos[0].max()  # documents continue after the instruction, all from the same position
    pos[-1] += QUERY_OFFSET
    pos = (pos - 1).clamp_min(0) * mask
    return BlockRankPrompt(ids.view(1, -1), mask.view(1, -1), pos.view(1, -1), block_length)


def pack_prompt(tokenizer, instruction: str, documents: list[str], query: str, block_length: int = 160) -> BlockRankPrompt:
    """Tokenise and pack: the instruction (with the tokenizer's BOS when it adds one), one segment per
    document, and ``"Query: ... Answer:"``."""
    enc = lambda text, special=False: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad segments with")
    docs = [enc(f"\n{d}") for d in documents]
    return pack_ids(enc(instruction, special=True), docs, enc(f"\nQuery: {query}\nAnswer:"), block_length, pad)


@functools.lru_cache(maxsize=64)  # one layout per prompt shape, shared by every layer
def blockrank_layout(num_segments: int, block_length: int, device=None) -> BlockSparseLayout:
    """Segment-level layout of the instruction and document segments (the query segment, which sees
    everything, is left out): the instruction sees itself, document ``i`` the instruction and itself;
    token causality comes from the kernel's causal rule."""
    m = num_segments - 1
    mask = torch.eye(m, dtype=torch.bool, device=device)
    mask[:, 0] = True
    n = m * block_length
    return BlockSparseLayout.from_block_mask(mask[None, None], block_length, block_length, n, n)


def blockrank_attention(
    config: BlockRankConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, **_,
) -> torch.Tensor:
    """BlockRank attention over ``query [B, H, q, D]`` and ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is the key validity ``[B, kv]`` from :func:`~vzoo.lm.layers.key_validity_mask` (or ``None``).
    For a prompt (``q == kv``) the instruction and document segments run on the block-sparse kernel
    with :func:`blockrank_layout` and the query segment, which sees every valid key before it, on
    SDPA; later tokens (decoding) see every valid key too. At a scoring layer, stores
    :func:`document_scores` on ``module.blockrank_scores``."""
    sq, skv = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"BlockRank expects a [B, kv] key mask from its mask function, got {tuple(attention_mask.shape)}")
    h = config.block_length
    if sq == skv and skv % h:
        raise ValueError(f"BlockRank: {skv} tokens are not whole segments of block_length={h}; pack the prompt with pack_prompt")
    tail = h if sq == skv else sq  # the rows that see every valid key before them
    allowed = visible_keys(tail, skv, True, device=query.device)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    out = masked_sdpa(query[:, :, sq - tail :], key, value, allowed, scale)
    if sq != skv:
        return out
    n = skv - h
    head_mask = None if attention_mask is None else attention_mask[:, :n]
    layout = blockrank_layout(skv // h, h, query.device)
    record_density(module, blockrank_density(skv // h, h))
    head = block_sparse_attention(query[:, :, :n], key[:, :, :n], value[:, :, :n], layout, causal=True, scale=scale, key_mask=head_mask)
    out = torch.cat([head, out], 2)
    if module is not None and getattr(module, "blockrank_scoring", False):
        module.blockrank_scores = document_scores(query, key, attention_mask, scale, h, config.score_tokens)
    return out


def blockrank_density(segments: int, length: int) -> float:
    """Share of the causal pairs of a packed prompt (``segments`` of ``length`` tokens, no padding) that
    BlockRank attends: each segment causally within itself, the instruction (first segment) from
    every document, and the query (last segment) everything before it."""
    own = length * (length + 1) // 2
    seen = segments * own + (segments - 2) * length * length + (segments - 1) * length * length
    n = segments * length
    return seen / (n * (n + 1) // 2)


def document_scores(
    query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scale: float, block_length: int, tokens: int
) -> torch.Tensor:
    """``[B, docs]``: the last ``tokens`` queries' softmax over the valid document tokens, averaged over
    heads and those queries and summed per document (each row sums to 1). Differentiable."""
    b, hq, n, _ = query.shape
    m = n // block_length
    k = key.repeat_interleave(hq // key.shape[1], 1)
    s = (query[:, :, -tokens:].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, t, n]
    doc = torch.zeros(n, dtype=torch.bool, device=query.device)
    doc[block_length : (m - 1) * block_length] = True
    keep = doc[None].expand(b, n) if key_valid is None else doc & key_valid
    p = torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1).mean((1, 2))  # [B, n]
    return p[:, block_length : (m - 1) * block_length].unflatten(1, (m - 2, block_length)).sum(-1)


def blockrank_aux_loss(scores: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Multi-positive InfoNCE over documents: ``-log(sum_pos e^{s/t} / sum_all e^{s/t})``, batch mean
    (official: temperature 0.05, added to the LM loss with weight 0.1). ``scores [B, docs]``,
    ``positives [B, docs]`` bool (at least one per row)."""
    if positives.shape != scores.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor {tuple(scores.shape)}, got {positives.dtype} {tuple(positives.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be positive")
    if not bool(positives.any(-1).all()):
        raise ValueError("every row of positives needs at least one relevant document")
    logits = scores / temperature
    return (logits.logsumexp(-1) - logits.masked_fill(~positives, float("-inf")).logsumexp(-1)).mean()


def attach_scoring(model: nn.Module, module: nn.Module, config: BlockRankConfig):
    """Mark a scoring layer's attention module (``blockrank_scoring``); undone on removal."""
    if module.layer_idx not in config.scoring_layers(module.config.num_hidden_layers):
        return None
    module.blockrank_scoring = True
    return Attachment(module, ("blockrank_scoring", "blockrank_scores"))


def scores_of(model: nn.Module) -> torch.Tensor:
    """``[B, docs]``: the document scores of the last forward pass, averaged over the scoring layers."""
    found = [m.blockrank_scores for m in model.modules() if getattr(m, "blockrank_scores", None) is not None]
    if not found:
        raise RuntimeError("no BlockRank scores: apply_sparse_attention(model, BlockRankConfig()) and run a packed prompt")
    return torch.stack(found).mean(0)


@torch.no_grad()
def rank(
    model: nn.Module,
    tokenizer,
    query: str,
    documents: list[str],
    instruction: str = INSTRUCTION,
    config: BlockRankConfig | None = None,
) -> list[tuple[str, float]]:
    """Documents sorted by BlockRank relevance (highest first), with their scores (summing to 1). Applies
    BlockRank for the call when the model does not use it already."""
    from .apply import apply_sparse_attention

    active = next((m.vzoo_config for m in model.modules() if isinstance(getattr(m, "vzoo_config", None), BlockRankConfig)), None)
    config = active or config or BlockRankConfig()
    prompt = pack_prompt(tokenizer, instruction, documents, query, config.block_length)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt.model_inputs().items()}
    handle = None if active is not None else apply_sparse_attention(model, config)
    try:
        model(**inputs, logits_to_keep=1)
        scores = scores_of(model)[0].tolist()
    finally:
        if handle is not None:
            handle.remove()
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    return [(documents[i], scores[i]) for i in order]


register_lm_method(LMMethod(
    config=BlockRankConfig, attn_implementation="vzoo_blockrank", label="BlockRank", attention=blockrank_attention,
    paper="Scalable In-context Ranking with Generative Models (BlockRank, 2025)", arxiv="2510.05396",
    ops=("block_sparse_attention",),
    status="structured segment attention, permutation-invariant positions, attention scores, aux loss",
    attach=attach_scoring, mask="keys", window_error=lambda config, window: "its pattern has no sliding-window rule",
    bench=lambda tokens: {f"blockrank ({tokens // 128 - 2} docs x 128 tokens)": BlockRankConfig(block_length=128)},
    contract=lambda: {"blockrank-one-segment": BlockRankConfig(block_length=64)},  # the query segment sees all
))
