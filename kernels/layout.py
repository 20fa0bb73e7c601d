"""Block-sparse attention layouts: FlexAttention-compatible row lists of selected key blocks.

A layout says, for every query block of ``block_m`` tokens, which key blocks of ``block_n`` tokens it
attends to. Rows are stored like ``torch.nn.attention.flex_attention.BlockMask`` (BCSR):
``kv_num_blocks`` counts the blocks of a row and ``kv_indices`` lists them, ascending, padded with -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockSparseLayout", "ids_to_mask"]


def ids_to_mask(ids: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Dense bool ``[..., n]`` with True at the ids ``[..., K]`` where ``keep [..., K]`` holds (ids in
    ``[0, n)`` where kept; others are ignored, duplicates count once)."""
    mask = torch.zeros(*ids.shape[:-1], n + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, torch.where(keep, ids.long(), n), True)  # dropped ids land in the spare column n
    return mask[..., :n]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SIGNED_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)


def check_int(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) of at least ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, device: torch.device | None = None, dims: int = 4, layout: str = "[B, H, T, D]",
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor with ``dims`` dimensions (``layout`` in the
    message), a dtype in ``dtypes`` and, when ``device`` is given, on it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}; all must be on one device")


def check_cached_qkv(q: object, k: object, v: object) -> None:
    """Raise ``ValueError`` unless ``q [B, H, Tq, D]``, ``k [B, G, Tk, D]``, ``v [B, G, Tk, Dv]`` are float tensors
    of one dtype on one device, ``H`` a multiple of ``G`` (GQA) and ``Tq <= Tk`` (the queries are the last ``Tq``
    positions, a KV cache in front)."""
    check_tensor("q", q)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, q.device)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q D={d}, v Dv={v.shape[-1]}")
    if k.shape[0] != b or k.shape[3] != d or g == 0 or h % g:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [{b}, G, Tk, {d}] with the {h} query heads a multiple of G")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [{b}, {g}, {tk}, Dv] like k")
    if tq > tk:
        raise ValueError(f"q has {tq} tokens, more than the {tk} keys (queries are the last Tq of the Tk positions)")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math dtype of an op: float64 stays float64, everything else (half included) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_flag(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (``causal="no"`` must not read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool")


def _check_sizes(where: str, **sizes: object) -> None:
    """Raise ``ValueError`` unless every block size is an int >= 1 and every length an int >= 0 (bools
    are not sizes)."""
    for name, value in sizes.items():
        check_int(f"{where}.{name}", value, 1 if name.startswith("block") else 0)


def check_ids(name: str, ids: object, dims: int) -> None:
    """Raise ``ValueError`` unless ``ids`` is a signed-integer tensor of ``dims`` dims (bool and unsigned
    tensors are refused: -1, "unused", does not exist there)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != dims or ids.dtype not in _SIGNED_INTS:
        got = f"{ids.dtype} tensor of {ids.dim()} dims" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a signed integer tensor of {dims} dims, got {got}")


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Which key blocks each query block attends to.

    Attributes:
        kv_num_blocks: int32 ``[B, Hl, NQB]``, the number of selected key blocks per query block.
        kv_indices: int32 ``[B, Hl, NQB, MAXK]``, selected key-block ids, ascending, padded with -1.
        block_m: query-block size in tokens.
        block_n: key-block size in tokens.
        q_len: query length (need not be a multiple of ``block_m``).
        kv_len: key length (need not be a multiple of ``block_n``).

    ``Hl`` is 1 (shared by all heads), the number of key/value heads, or the number of query heads.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_m: int
    block_n: int
    q_len: int
    kv_len: int

    def __post_init__(self) -> None:
        _check_sizes("BlockSparseLayout", block_m=self.block_m, block_n=self.block_n, q_len=self.q_len, kv_len=self.kv_len)
        num, idx = self.kv_num_blocks, self.kv_indices
        for name, t, dim in (("kv_num_blocks", num, 3), ("kv_indices", idx, 4)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dim:
                got = f"{t.dtype} tensor of {t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"BlockSparseLayout.{name} must be an int32 tensor of {dim} dims, got {got}")
        if idx.shape[:3] != num.shape:
            raise ValueError(
                f"BlockSparseLayout: kv_indices {tuple(idx.shape)} must start with kv_num_blocks' shape {tuple(num.shape)}"
            )
        if num.device != idx.device:
            raise ValueError(f"BlockSparseLayout: kv_num_blocks on {num.device} but kv_indices on {idx.device}")
        if idx.device.type == "meta":
            raise ValueError("BlockSparseLayout: tensors on the meta device hold no block ids; build it on a real device")
        if num.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"BlockSparseLayout: {num.shape[2]} query-block rows, but q_len={self.q_len} with "
                f"block_m={self.block_m} needs {self.num_q_blocks}"
            )
        if num.numel() == 0 or torch.compiler.is_compiling():
            return  # the checks below read the data; a traced graph cannot
        maxk = idx.shape[3]
        valid = torch.arange(maxk, device=idx.device) < num[..., None]
        out_of_range = valid & ((idx < 0) | (idx >= self.num_kv_blocks))
        bad_padding = ~valid & (idx != -1)
        unsorted = (idx[..., 1:] <= idx[..., :-1]) & valid[..., 1:]
        bad_count = (num < 0) | (num > maxk)
        # one reduction (one host sync) on the common, valid path; the messages come after
        if not bool(out_of_range.any() | bad_padding.any() | unsorted.any() | bad_count.any()):
            return
        if bool(bad_count.any()):
            raise ValueError(f"BlockSparseLayout.kv_num_blocks must lie in [0, {maxk}] (the width of kv_indices)")
        if bool(out_of_range.any()):
            raise ValueError(
                f"BlockSparseLayout.kv_indices: key-block ids must lie in [0, {self.num_kv_blocks}) "
                f"(kv_len={self.kv_len}, block_n={self.block_n})"
            )
        if bool(bad_padding.any()):
            raise ValueError("BlockSparseLayout.kv_indices: entries past kv_num_blocks must be -1")
        raise ValueError("BlockSparseLayout.kv_indices: each row must be strictly ascending (no duplicates)")

    # ----------------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_n)

    @property
    def num_heads(self) -> int:
        """``Hl``, the head dimension of the layout (1 broadcasts over all heads)."""
        return self.kv_num_blocks.shape[1]

    @property
    def batch_size(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def max_blocks(self) -> int:
        """``MAXK``, the width of ``kv_indices``."""
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def __repr__(self) -> str:
        b, h, nqb = self.kv_num_blocks.shape
        return (
            f"BlockSparseLayout(B={b}, Hl={h}, NQB={nqb}, NKB={self.num_kv_blocks}, MAXK={self.max_blocks}, "
            f"block_m={self.block_m}, block_n={self.block_n}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"density={self.density():.3f})"
        )

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_block_mask(
        cls, mask: torch.Tensor, block_m: int, block_n: int, q_len: int, kv_len: int
    ) -> BlockSparseLayout:
        """Build from a dense bool ``mask [B, Hl, NQB, NKB]`` (True = the query block attends the key block)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError("from_block_mask: mask must be a bool tensor [B, Hl, NQB, NKB]")
        _check_sizes("from_block_mask", block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)
        nqb, nkb = _cdiv(q_len, block_m), _cdiv(kv_len, block_n)
        if mask.shape[2:] != (nqb, nkb):
            raise ValueError(
                f"from_block_mask: mask has {tuple(mask.shape[2:])} blocks, but q_len={q_len}, kv_len={kv_len} "
                f"with block_m={block_m}, block_n={block_n} need ({nqb}, {nkb})"
            )
        counts = mask.sum(-1, dtype=torch.int32)
        maxk = int(counts.max()) if counts.numel() else 0
        # Stable sort puts selected blocks first, in ascending block order.
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :maxk]
        slot = torch.arange(maxk, device=mask.device)
        indices = torch.where(slot < counts[..., None], order, -1).to(torch.int32)
        return cls(counts, indices.contiguous(), block_m, block_n, q_len, kv_len)

    @classmethod
    def from_topk(
        cls,
        indices: torch.Tensor,
        block_m: int,
        block_n: int,
        q_len: int,
        kv_len: int,
        counts: torch.Tensor | None = None,
    ) -> BlockSparseLayout:
        """Build from chosen key-block ids ``indices [B, Hl, NQB, K]`` in any order.

        ``counts [B, Hl, NQB]`` (integer) keeps only the first ``counts`` entries of each row; -1 entries
        are ignored. Duplicates are merged. Ids outside ``[0, NKB)`` (other than -1) raise ``ValueError``.
        """
        check_ids("from_topk: indices [B, Hl, NQB, K]", indices, 4)
        _check_sizes("from_topk", block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len)
        nkb = _cdiv(kv_len, block_n)
        idx = indices.long()
        keep = idx >= 0
        if counts is not None:
            check_ids("from_topk: counts", counts, 3)
            if counts.shape != indices.shape[:3]:
                raise ValueError(f"from_topk: counts {tuple(counts.shape)} must be {tuple(indices.shape[:3])}")
            keep &= torch.arange(idx.shape[-1], device=idx.device) < counts[..., None].long()
        if bool((idx[keep] >= nkb).any() | (idx < -1).any()):
            raise ValueError(
                f"from_topk: indices must lie in [0, {nkb}) or be -1 (kv_len={kv_len}, block_n={block_n})"
            )
        return cls.from_block_mask(ids_to_mask(idx, keep, nkb), block_m, block_n, q_len, kv_len)

    @classmethod
    def static(
        cls,
        q_len: int,
        kv_len: int,
        block_m: int,
        block_n: int,
        sink_blocks: int = 0,
        local_blocks: int = 0,
        stride: int = 0,
        causal: bool = False,
        device: torch.device | str | None = None,
    ) -> BlockSparseLayout:
        """LongGen-style static pattern shared by all heads (``B = Hl = 1``).

        Query block ``i`` is anchored at key block ``c_i``, the block holding the position of its last
        query token (bottom-right aligned: position ``+ kv_len - q_len``). It selects key block ``j`` when

        - ``j < sink_blocks`` (attention sink), or
        - ``c_i - local_blocks < j <= c_i`` (causal) / ``|j - c_i| < local_blocks`` (non-causal), or
        - ``stride > 0`` and ``(j + 1) % stride == 0`` (strided blocks at absolute positions),

        and, when ``causal``, only if ``j <= c_i``.
        """
        _check_sizes(
            "static", q_len=q_len, kv_len=kv_len, block_m=block_m, block_n=block_n, sink_blocks=sink_blocks,
            local_blocks=local_blocks, stride=stride,
        )
        check_flag("static.causal", causal)
        nqb, nkb = _cdiv(q_len, block_m), _cdiv(kv_len, block_n)
        i = torch.arange(nqb, device=device)
        j = torch.arange(nkb, device=device)
        last = torch.clamp((i + 1) * block_m, max=q_len) - 1 + (kv_len - q_len)
        c = torch.div(last, block_n, rounding_mode="floor")[:, None]
        jj = j[None, :]
        local = (jj > c - local_blocks) & (jj <= c) if causal else (jj - c).abs() < local_blocks
        mask = (jj < sink_blocks) | local
        if stride > 0:
            mask |= (jj + 1) % stride == 0
        if causal:
            mask &= jj <= c
        return cls.from_block_mask(mask[None, None], block_m, block_n, q_len, kv_len)

    # ----------------------------------------------------------------------------------------------
    def to_block_mask(self) -> torch.Tensor:
        """Dense bool ``[B, Hl, NQB, NKB]``."""
        return ids_to_mask(self.kv_indices, self.kv_indices >= 0, self.num_kv_blocks)

    def density(self, causal: bool = False) -> float:
        """Fraction of (query block, key block) pairs selected, averaged over batch and heads. With
        ``causal``: the fraction of the causal (query, key) token pairs (bottom-right aligned, query
        ``i`` sees key ``j <= i + kv_len - q_len``) that the selected blocks hold, counted exactly
        in closed form per (row, block) without a token-level mask."""
        if not causal:
            total = self.kv_num_blocks.numel() * self.num_kv_blocks
            return float(self.kv_num_blocks.sum()) / total if total else 0.0
        off, bm, bn = self.kv_len - self.q_len, self.block_m, self.block_n
        rows = torch.arange(self.num_q_blocks, device=self.device)
        first = rows * bm + off  # kv position of each row's first and one-past-last query
        last = torch.clamp(rows * bm + bm, max=self.q_len) + off
        ids = self.kv_indices.long()
        start = ids * bn
        length = torch.clamp(start + bn, max=self.kv_len) - start

        def seen(n: torch.Tensor) -> torch.Tensor:  # keys of each block visible to the queries at 0 .. n - 1
            x = torch.minimum((n[:, None] - start).clamp_min(0), length)
            return x * (x + 1) // 2 + length * (n[:, None] - start - length).clamp_min(0)

        pairs = ((seen(last) - seen(first)) * (ids >= 0)).sum()
        causal_pairs = (self.q_len * (self.q_len + 1) // 2 + self.q_len * off) * self.kv_num_blocks.shape[:2].numel()
        return float(pairs) / causal_pairs if causal_pairs else 0.0

    def transpose(self) -> BlockSparseLayout:
        """Column lists: the layout of the transposed problem (rows = key blocks, ids = query blocks).

        ``block_m``/``block_n`` and ``q_len``/``kv_len`` swap. Used by backward passes that walk, for
        each key block, the query blocks that selected it (deterministic dK/dV without atomics).
        """
        return BlockSparseLayout.from_block_mask(
            self.to_block_mask().transpose(-1, -2), self.block_n, self.block_m, self.kv_len, self.q_len
        )

    def to_flex_block_mask(self, mask_mod=None):
        """A ``torch.nn.attention.flex_attention.BlockMask`` selecting the same blocks.

        Requires ``block_m``/``block_n`` accepted by FlexAttention. ``mask_mod`` adds token-level
        masking inside the selected blocks (e.g. causal); without it every selected block is full.
        """
        from torch.nn.attention.flex_attention import BlockMask

        nkb = self.num_kv_blocks
        idx = torch.zeros(*self.kv_indices.shape[:3], nkb, dtype=torch.int32, device=self.device)
        k = min(self.max_blocks, nkb)
        idx[..., :k] = self.kv_indices[..., :k].clamp_min(0)
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks.contiguous(),
            idx,
            BLOCK_SIZE=(self.block_m, self.block_n),
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def to(self, device: torch.device | str) -> BlockSparseLayout:
        """The same layout with its tensors on ``device``."""
        if torch.device(device) == self.device:
            return self
        return BlockSparseLayout(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_m, self.block_n, self.q_len, self.kv_len
        )

    def expand_heads(self, batch: int, heads: int) -> BlockSparseLayout:
        """The same layout broadcast to ``[batch, heads, ...]`` (``Hl`` must be 1 or ``heads``)."""
        b, h = self.kv_num_blocks.shape[:2]
        if (b, h) == (batch, heads):
            return self
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"layout with B={b}, Hl={h} cannot broadcast to B={batch}, H={heads}")
        return BlockSparseLayout(
            self.kv_num_blocks.expand(batch, heads, -1).contiguous(),
            self.kv_indices.expand(batch, heads, -1, -1).contiguous(),
            self.block_m,
            self.block_n,
            self.q_len,
            self.kv_len,
        )


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, ...]`` -> ``[B, num_heads, ...]``: query head ``h`` reads key/value head ``h // (num_heads / Hkv)``
    (GQA order, as SDPA's ``enable_gqa``)."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
