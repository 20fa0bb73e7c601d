"""Torch backend: block-sparse attention in vectorised PyTorch, touching only the selected blocks.

The CPU default. Query blocks are processed in cache-sized chunks: the chunk's selected key/value
blocks are gathered into a reusable buffer, then scores, softmax and the value product run as
batched matmuls on that buffer, so nothing of size ``Sq x Skv`` is ever formed. Units (query blocks
of one head) are visited longest row first and each chunk is padded only to its own longest row, so
layouts whose rows differ in length (causal rows, mass thresholds, per-head budgets) do not pay for
the longest row everywhere. The ``G`` query
heads of a GQA group that share a row list are stacked into one matmul (as in NSA / fla). Math is
fp32. Backward recomputes the probabilities chunk by chunk (FlashAttention-2 style, arXiv
2307.08691) and scatters dK/dV with ``index_add_``, which is deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

import torch.nn.functional as F

from .block_sparse import broadcast_heads, empty_attention
from .layout import BlockSparseLayout
from .merge import merge_attention_states
from .reference import all_finite, layout_token_mask, nonfinite_rows

__all__ = ["attend", "masked_sdpa"]

# Target number of fp32 score elements per chunk (4 MiB): large enough for efficient matmuls,
# small enough that the chunk's scores stay in cache between matmul, softmax and matmul.
_CHUNK_ELEMS = 1 << 20
# The flash path (inference): gathered key and value elements per chunk (32 MiB: few chunks, few calls), and
# the fewest rows per unit (G query heads x block_m) for which it beats the batched matmuls. Measured on a
# 2-core AVX-512 CPU: units of 192 rows (GQA 3 x 64, SmolLM2) over 30 blocks of 64 keys ran 277 -> 240 ms,
# units of 128 rows (one head, blocks of 128) over 6 blocks 37 -> 46 ms.
_FLASH_CHUNK_ELEMS = 1 << 23
_FLASH_MIN_ROWS = 192


@dataclass
class _Plan:
    """Everything both passes need, derived once from the inputs.

    A *unit* is one (batch, layout head, query block): ``R = G * block_m`` query rows that share one
    row list of ``K`` key blocks (``L = K * block_n`` keys).
    """

    layout: BlockSparseLayout
    group: int  # query heads per unit (G)
    flat_blocks: torch.Tensor  # int64 [U * K], index into k viewed as [B * Hkv * NKB, block_n, D]
    slot_on: torch.Tensor | None  # bool [U, R, K]: slot usable by the row (count, token mask)
    token_masked: bool  # slot_on holds a token mask (else only counts, needed by padded chunks alone)
    key_pos: torch.Tensor | None  # int64 [U, 1, K, block_n]: key positions, when masking tokens
    row_pos: torch.Tensor | None  # int64 [U, R, 1, 1]: query positions (bottom-right aligned)
    dead: torch.Tensor | None  # bool [U, R]: rows that see no key
    partial: torch.Tensor | None  # bool [U, K]: slots some (row, key) pair of which the token rules hide
    chunks: list[tuple[torch.Tensor, int, bool]]  # (unit ids, their slots, whether some use fewer), longest first
    scale: float
    causal: bool
    window: int  # 0: none
    sink: int
    key_ok: torch.Tensor | None  # bool [U, 1, K, block_n]: keys the key mask keeps
    bad_rows: torch.Tensor | None  # bool [B, Hkv, Skv]: keys whose key or value holds NaN / Inf
    bad: torch.Tensor | None  # bool [U, 1, K, block_n]: the same, gathered like the key blocks
    flash: bool  # CPU inference, units of >= _FLASH_MIN_ROWS rows, rules cutting only last slots: fused flash kernel

    @property
    def widest(self) -> int:
        """Units of the largest chunk times its slots (the buffer size in blocks)."""
        return max(len(u) * k for u, k, _ in self.chunks)


def _plan(
    q: torch.Tensor, k: torch.Tensor, layout: BlockSparseLayout, token_mask, causal: bool, scale: float, window: int,
    sink: int, key_mask: torch.Tensor | None, v: torch.Tensor, inference: bool,
) -> _Plan:
    b, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    hu = layout.num_heads
    group = hq // hu  # G query heads per unit: Hq // Hkv when shared by a group, else 1
    bm, bn, maxk = layout.block_m, layout.block_n, layout.max_blocks
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    dev = q.device
    idx = layout.kv_indices.long()
    kv_head = torch.arange(hu, device=dev) // (hu // hkv)  # layout head -> kv head
    base = (torch.arange(b, device=dev)[:, None] * hkv + kv_head[None, :]) * nkb  # [B, Hu]
    flat_blocks = (base[:, :, None, None] + idx.clamp_min(0)).reshape(-1)

    rows = group * bm
    q_pos = torch.arange(nqb * bm, device=dev).view(nqb, 1, bm).expand(nqb, group, bm).reshape(nqb, rows)
    need_counts = bool((layout.kv_num_blocks < maxk).any())
    ragged_kv = skv % bn != 0
    slot_on = None
    if need_counts or token_mask is not None:
        slot_on = (torch.arange(maxk, device=dev) < layout.kv_num_blocks[..., None]).view(-1, 1, maxk)
        if token_mask is not None:
            tm = torch.nn.functional.pad(token_mask, (0, 0, 0, nqb * bm - sq)).view(b, hu, nqb, 1, bm, maxk)
            tm = tm.expand(b, hu, nqb, group, bm, maxk).reshape(-1, rows, maxk)
            slot_on = slot_on & tm
    key_pos = row_pos = None
    ruled = causal or window > 0
    if ruled or ragged_kv:
        key_pos = (idx.clamp_min(0)[..., None] * bn + torch.arange(bn, device=dev)).view(-1, 1, maxk, bn)
    if ruled:
        row_pos = (q_pos + (skv - sq)).view(1, nqb, rows).expand(b * hu, nqb, rows).reshape(-1, rows, 1, 1)
    # A row is dead when no usable slot holds a visible key; with the causal / window rule a block
    # [first, last] holds one iff first <= hi (hi: its last key the rule allows) and, under a window,
    # the sink starts it or the window's left edge lies at or before hi.
    if ruled and window == 0 and (slot_on is None or slot_on.shape[1] == 1):
        # Every row of a unit uses the same slots, so a row sees a key iff the unit's first usable key lies
        # at or before it: O(U * (K + R)) instead of O(U * R * K).
        first = key_pos[:, 0, :, 0]
        usable = first <= skv - 1 if slot_on is None else slot_on[:, 0] & (first <= skv - 1)
        earliest = torch.where(usable, first, torch.iinfo(first.dtype).max).amin(-1)  # [U]; no usable slot: max
        dead = earliest[:, None] > (row_pos[:, :, 0, 0] if causal else skv - 1)
    else:
        visible = slot_on if slot_on is not None else torch.ones(1, 1, maxk, dtype=torch.bool, device=dev)
        if ruled:
            first, p = key_pos[:, :, :, 0], row_pos[:, :, :, 0]
            hi = torch.clamp(first + bn - 1, max=skv - 1)
            hi = torch.minimum(hi, p) if causal else hi
            seen = first <= hi
            if window > 0:
                seen = seen & ((first < sink) | (torch.maximum(first, p - window + 1) <= hi))
            visible = visible & seen
        dead = ~visible.any(-1)
    dead = dead.expand(b * hu * nqb, rows) if bool(dead.any()) else None
    key_ok = None
    if key_mask is not None:  # gathered like the key blocks: [B * Hkv * NKB, block_n] -> [U, 1, K, block_n]
        table = F.pad(key_mask, (0, nkb * bn - skv)).view(b, 1, nkb, bn).expand(b, hkv, nkb, bn).reshape(-1, bn)
        key_ok = table.index_select(0, flat_blocks).view(-1, 1, maxk, bn)
    partial = _partial_slots(key_pos, row_pos, key_ok, skv, causal, window, sink)
    # Inference on the CPU with units of at least _FLASH_MIN_ROWS rows, when the token rules cut at most each
    # unit's last slot: the fused flash kernel, which forms no score buffer, so chunks are sized by their gathered
    # keys and values instead.
    flash = (inference and rows >= _FLASH_MIN_ROWS and dev.type == "cpu"
             and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))
    if flash and partial is not None:
        before_last = torch.arange(maxk, device=dev) < layout.kv_num_blocks.reshape(-1, 1) - 1
        flash = not bool((partial & before_last).any())
    counts = layout.kv_num_blocks.reshape(-1)
    if flash:  # the cut last slot still forms scores [n, R, block_n]: at most _CHUNK_ELEMS of them per chunk
        cap = _CHUNK_ELEMS // (rows * bn) if partial is not None else None
        chunks = _unit_chunks(counts, 2 * bn * q.shape[-1], _FLASH_CHUNK_ELEMS, cap)
    else:
        chunks = _unit_chunks(counts, rows * bn)
    bad_rows, bad = nonfinite_rows(k, v), None
    if bad_rows is not None:
        bad = F.pad(bad_rows, (0, nkb * bn - skv)).view(-1, bn).index_select(0, flat_blocks).view(-1, 1, maxk, bn)
    return _Plan(
        layout, group, flat_blocks, slot_on, token_mask is not None, key_pos, row_pos, dead, partial, chunks, scale, causal, window, sink,
        key_ok, bad_rows, bad, flash,
    )


def _partial_slots(key_pos, row_pos, key_ok, skv: int, causal: bool, window: int, sink: int) -> torch.Tensor | None:
    """bool ``[U, K]``: the slots whose block the token rules (tail past ``skv``, causal, window, key mask)
    hide from some row of the unit; ``None`` when there are none. Only these are masked key by key; under
    a causal rule with aligned blocks that is one slot per row list (its diagonal block)."""
    if key_pos is None and key_ok is None:
        return None
    partial = None
    if key_pos is not None:
        first = key_pos[:, 0, :, 0]  # [U, K]
        last = first + key_pos.shape[-1] - 1
        partial = last >= skv
        if row_pos is not None:
            rows = row_pos[:, :, 0, 0]
            low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
            if causal:
                partial = partial | (last > low)
            if window > 0:
                partial = partial | ((last >= sink) & (first <= high - window))
    if key_ok is not None:
        masked = ~key_ok[:, 0].all(-1)
        partial = masked if partial is None else partial | masked
    return partial if bool(partial.any()) else None


def _unit_chunks(counts: torch.Tensor, elems_per_slot: int, budget: int = _CHUNK_ELEMS, cap: int | None = None
                 ) -> list[tuple[torch.Tensor, int, bool]]:
    """Split the units (``counts [U]``: used slots per unit) into chunks of about ``budget`` elements (score
    elements, or gathered key and value elements for the flash path) and at most ``cap`` units, longest rows
    first, a new chunk wherever the count changes, so no chunk masks padding slots; each chunk keeps its units'
    slots (at least 1; the flag marks units with none). One host sync (the sorted counts). Callers handle empty
    problems (no unit, no slot) before."""
    ordered, order = torch.sort(counts, descending=True, stable=True)
    used = ordered.tolist()
    chunks, start = [], 0
    while start < len(used):
        width = max(used[start], 1)
        units = budget // (elems_per_slot * width)
        stop = min(len(used), start + max(1, units if cap is None else min(units, cap)))
        while used[stop - 1] != used[start]:
            stop -= 1
        chunks.append((order[start:stop], width, used[start] < width))
        start = stop
    return chunks


def _to_units(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[B, Hq, Sq, D]`` -> fp32 ``[U, R, D]`` (rows of a unit: its G heads x block_m tokens)."""
    lay = plan.layout
    b, hq, sq, d = x.shape
    nqb, bm = lay.num_q_blocks, lay.block_m
    x = x.float()
    if nqb * bm != sq:
        x = torch.nn.functional.pad(x, (0, 0, 0, nqb * bm - sq))
    x = x.view(b, hq // plan.group, plan.group, nqb, bm, d).transpose(2, 3)
    return x.reshape(-1, plan.group * bm, d)


def _from_units(x: torch.Tensor, plan: _Plan, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_to_units` (drops padded rows)."""
    lay = plan.layout
    b, hq, sq, d = shape
    x = x.view(b, hq // plan.group, lay.num_q_blocks, plan.group, lay.block_m, d).transpose(2, 3)
    return x.reshape(b, hq, -1, d)[:, :, :sq]


def _kv_blocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[B, Hkv, Skv, D]`` -> contiguous fp32 ``[B * Hkv * NKB, block_n, D]`` (zero-padded tail; the
    rows of keys holding NaN / Inf zeroed, so a masked probability never multiplies them).

    Strided inputs (head-split views of a fused projection) are copied once here: a contiguous copy
    followed by ``index_select`` of whole blocks beats gathering small blocks from strided memory."""
    bn = plan.layout.block_n
    pad = -x.shape[2] % bn
    x = x.float() if plan.bad_rows is None else x.float().masked_fill(plan.bad_rows[..., None], 0.0)
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.contiguous().view(-1, bn, x.shape[-1])


@dataclass
class _Chunk:
    """One chunk of units: their ids, the slots used, the gathered flat block ids and masks."""

    units: torch.Tensor  # int64 [n]
    width: int  # slots K' (the longest row of the chunk)
    blocks: torch.Tensor  # int64 [n * K']
    slot_on: torch.Tensor | None  # [n|1, R, K']: only for a token mask or units without slots
    key_pos: torch.Tensor | None  # [n, 1, K', block_n]
    row_pos: torch.Tensor | None  # [n, R, 1, 1]
    key_ok: torch.Tensor | None  # [n, 1, K', block_n]
    partial: torch.Tensor | None  # [n, K']
    bad: torch.Tensor | None  # [n, 1, K', block_n]
    dead: torch.Tensor | None  # [n, R]


def _take(x: torch.Tensor | None, units: torch.Tensor, width: int, slot_dim: int | None = 2) -> torch.Tensor | None:
    """Rows ``units`` of a per-unit plan tensor (broadcast ones kept), its first ``width`` slots."""
    if x is None:
        return None
    x = x if x.shape[0] == 1 else x.index_select(0, units)
    return x if slot_dim is None else x.narrow(slot_dim, 0, width)


def _probs(plan: _Plan, c: _Chunk, qc: torch.Tensor, kg: torch.Tensor, out: torch.Tensor, want_lse: bool = False
           ) -> torch.Tensor | None:
    """Write softmax probabilities ``[n, R, L]`` of the chunk ``c`` into ``out``; optionally return
    their log-sum-exp ``[n, R]``."""
    torch.baddbmm(out, qc, kg.transpose(1, 2), beta=0.0, alpha=plan.scale, out=out)
    n, rows, keys = out.shape
    blocked = out.view(n, rows, c.width, keys // c.width)
    if c.bad is not None:  # a visible key holding NaN / Inf makes its row NaN; the masks below hide the rest
        blocked.masked_fill_(c.bad, float("nan"))
    if c.slot_on is not None:
        blocked.masked_fill_(~c.slot_on[..., None], float("-inf"))
    if c.partial is not None:  # token rules, on the partial slots only: [P, R, block_n]
        unit, slot = c.partial.nonzero(as_tuple=True)
        hidden = None
        if c.key_pos is not None:
            kp = c.key_pos[unit, 0, slot][:, None, :]
            hidden = kp >= plan.layout.kv_len
            if c.row_pos is not None:
                rp = c.row_pos[unit, :, 0]
                if plan.causal:
                    hidden = hidden | (kp > rp)
                if plan.window > 0:
                    hidden = hidden | ((kp <= rp - plan.window) & (kp >= plan.sink))
        if c.key_ok is not None:
            gone = ~c.key_ok[unit, 0, slot][:, None, :]
            hidden = gone if hidden is None else hidden | gone
        blocked[unit, :, slot] = blocked[unit, :, slot].masked_fill(hidden, float("-inf"))
    peak = out.amax(-1) if want_lse or c.key_ok is not None else None
    empty = torch.isneginf(peak) if c.key_ok is not None else None  # masked keys can empty a row
    torch.ops.aten._softmax.out(out, -1, False, out=out)
    if c.dead is not None:
        out.masked_fill_(c.dead[:, :, None], 0.0)
    if empty is not None:
        out.masked_fill_(empty[..., None], 0.0)
    # max(p) = exp(max(score) - lse): the log-sum-exp without another pass over exp(scores).
    if not want_lse:
        return None
    lse = peak - torch.log(out.amax(-1))
    return lse if empty is None else lse.masked_fill(empty, float("-inf"))


def _chunks(plan: _Plan, kb: torch.Tensor, vb: torch.Tensor) -> Iterator[tuple[_Chunk, torch.Tensor, torch.Tensor]]:
    """Walk the units chunk by chunk: ``(chunk, K [n, L, D], V [n, L, D])``, the selected key/value
    blocks gathered into buffers reused from chunk to chunk (``L = K' * block_n``)."""
    maxk, bn, d = plan.layout.max_blocks, plan.layout.block_n, kb.shape[-1]
    kbuf, vbuf = kb.new_empty(plan.widest, bn, d), vb.new_empty(plan.widest, bn, d)
    table = plan.flat_blocks.view(-1, maxk)
    for units, width, padded in plan.chunks:
        n = len(units)
        blocks = table.index_select(0, units)[:, :width].reshape(-1)
        kg, vg = kbuf[: n * width], vbuf[: n * width]
        torch.index_select(kb, 0, blocks, out=kg)
        torch.index_select(vb, 0, blocks, out=vg)
        slot_on = _take(plan.slot_on, units, width) if padded or plan.token_masked else None
        c = _Chunk(
            units, width, blocks, slot_on, _take(plan.key_pos, units, width),
            _take(plan.row_pos, units, width, None), _take(plan.key_ok, units, width), _take(plan.partial, units, width, 1),
            _take(plan.bad, units, width), _take(plan.dead, units, width, None),
        )
        yield c, kg.view(n, width * bn, d), vg.view(n, width * bn, d)


def _flash_chunk(plan: _Plan, c: _Chunk, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, buf: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [n, R, D], lse [n, R])`` of a chunk whose token rules cut only its last slot: PyTorch's fused CPU
    flash kernel over the other slots (no mask) and :func:`_probs` on the last slot, merged by log-sum-exp."""
    n, rows, d = qc.shape
    bn, width = plan.layout.block_n, c.width
    if c.partial is None:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qc[:, None], kc[:, None], vc[:, None], 0.0, False, scale=plan.scale)
        return o[:, 0], lse[:, 0]
    last = _Chunk(c.units, 1, c.blocks, None, None if c.key_pos is None else c.key_pos[:, :, -1:], c.row_pos, None,
                  c.partial[:, -1:], None, c.dead)
    pc = buf[: n * rows * bn].view(n, rows, bn)
    lse_l = _probs(plan, last, qc, kc[:, -bn:], pc, want_lse=True)
    o_l = torch.bmm(pc, vc[:, -bn:])
    if width == 1:
        return o_l, lse_l
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qc[:, None], kc[:, None, :-bn], vc[:, None, :-bn], 0.0, False, scale=plan.scale)
    hidden = ~torch.isfinite(lse_l)  # rows the last slot hides entirely (their probabilities are NaN)
    lse_l, o_l = lse_l.masked_fill(hidden, float("-inf")), o_l.masked_fill_(hidden[..., None], 0.0)
    out, lse = merge_attention_states([o, o_l[:, None]], [lse, lse_l[:, None]])
    return out[:, 0], lse[:, 0]


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, need_lse: bool):
        lay = plan.layout
        qu = _to_units(q, plan)
        kb, vb = _kv_blocks(k, plan), _kv_blocks(v, plan)
        units, rows, _ = qu.shape
        out = torch.empty_like(qu)
        lse = qu.new_empty(units, rows) if need_lse else None
        p = qu.new_empty(plan.widest * rows * lay.block_n)
        for c, kc, vc in _chunks(plan, kb, vb):
            n = len(c.units)
            qc = qu.index_select(0, c.units)
            if plan.flash and c.slot_on is None and c.key_ok is None and c.bad is None:
                oc, part = _flash_chunk(plan, c, qc, kc, vc, p)
            else:
                pc = p[: n * rows * kc.shape[1]].view(n, rows, kc.shape[1])
                part = _probs(plan, c, qc, kc, pc, want_lse=need_lse)
                oc = torch.bmm(pc, vc)
            out.index_copy_(0, c.units, oc)
            if need_lse:
                lse.index_copy_(0, c.units, part)
        if need_lse and plan.dead is not None:
            lse.masked_fill_(plan.dead, float("-inf"))
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out)
        o = _from_units(out, plan, q.shape).to(q.dtype)
        lse_out = _from_units(lse[..., None], plan, (*q.shape[:3], 1))[..., 0] if need_lse else None
        return o, lse_out

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out = ctx.saved_tensors
        plan: _Plan = ctx.plan
        lay = plan.layout
        qu = _to_units(q, plan)
        do = _to_units(dout, plan)
        kb, vb = _kv_blocks(k, plan), _kv_blocks(v, plan)
        rows, d = qu.shape[1:]
        delta = (do * out).sum(-1)  # [U, R]
        if dlse is not None:
            delta = delta - _to_units(dlse.float()[..., None], plan)[..., 0]
        dq = torch.empty_like(qu)
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        size = plan.widest * rows * lay.block_n
        p, dp = qu.new_empty(size), qu.new_empty(size)
        for c, kc, vc in _chunks(plan, kb, vb):
            n, keys = len(c.units), kc.shape[1]
            pc, dpc = p[: n * rows * keys].view(n, rows, keys), dp[: n * rows * keys].view(n, rows, keys)
            qc, doc = qu.index_select(0, c.units), do.index_select(0, c.units)
            _probs(plan, c, qc, kc, pc)
            torch.bmm(doc, vc.transpose(1, 2), out=dpc)
            dpc.sub_(delta.index_select(0, c.units)[:, :, None]).mul_(pc)  # dS = P * (dP - delta)
            dq.index_copy_(0, c.units, torch.bmm(dpc, kc).mul_(plan.scale))
            dkb.index_add_(0, c.blocks, torch.bmm(dpc.transpose(1, 2), qc).mul_(plan.scale).view(-1, lay.block_n, d))
            dvb.index_add_(0, c.blocks, torch.bmm(pc.transpose(1, 2), doc).view(-1, lay.block_n, d))
        skv = k.shape[2]
        dk = dkb.view(k.shape[0], k.shape[1], -1, d)[:, :, :skv].to(k.dtype)
        dv = dvb.view(v.shape[0], v.shape[1], -1, d)[:, :, :skv].to(v.dtype)
        return _from_units(dq, plan, q.shape).to(q.dtype), dk, dv, None, None


# Cost model for choosing between the two CPU strategies (fitted on a 2-core AVX-512 CPU): batched
# matmuls over gathered blocks reach about 160 GFLOP/s but pay about 4 us per unit (query block x head);
# dense SDPA with a token mask reaches about 100 GFLOP/s on all Sq x Skv pairs. With tiny blocks and a
# high density (BiFormer's 2x2-token regions, 16 of 49 routed) the per-unit cost dominates and the
# dense masked kernel is several times faster. It is used for inference only: PyTorch's CPU SDPA
# backward loses accuracy at large logits (fp32 dV relative error 2e-6 against 3e-8 here at |logit|
# 8e4, measured on a BiFormer-like layout; worse in the fuzzing of issue 12, and in bf16), so when q, k
# or v require grad the gathered path always runs.
_SPARSE_FLOPS, _UNIT_SECONDS, _DENSE_FLOPS = 160e9, 4e-6, 100e9
_MAX_MASK_ELEMS = 1 << 27


def _dense_is_faster(q: torch.Tensor, k: torch.Tensor, layout: BlockSparseLayout) -> bool:
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    mask_heads = layout.num_heads if layout.num_heads in (1, hq) else hq
    if b * mask_heads * sq * skv > _MAX_MASK_ELEMS:
        return False
    units = b * hq * layout.num_q_blocks
    pairs = float(layout.kv_num_blocks.sum()) * (b * hq) / (layout.batch_size * layout.num_heads)  # block pairs
    sparse = 4.0 * d * pairs * layout.block_m * layout.block_n
    dense = 4.0 * d * b * hq * sq * skv
    return dense / _DENSE_FLOPS < sparse / _SPARSE_FLOPS + units * _UNIT_SECONDS


def _dense_masked(
    q, k, v, layout: BlockSparseLayout, token_mask, causal: bool, scale: float, window: int, sink: int,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """SDPA over all keys with the layout's token mask ``[B|1, 1|Hq, Sq, Skv]``; empty rows give zeros."""
    mask = layout_token_mask(layout, token_mask, causal, window, sink)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    if mask.shape[1] not in (1, q.shape[1]):
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    return masked_sdpa(q, k, v, mask, scale)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused SDPA with a bool ``mask`` broadcastable to ``[B, Hq, Sq, Skv]`` (GQA allowed); rows that see
    no key give zeros instead of NaN; keys holding NaN / Inf reach only the rows that see them (NaN).

    Keys and values are scanned for NaN / Inf only when the output is not finite (a sum over the
    output, cheap next to two passes over K and V in decoding); then SDPA reruns on zeroed rows."""
    dead = ~mask.any(-1, keepdim=True)  # [B, H, Sq, 1]
    dead = dead if bool(dead.any()) else None
    # give empty rows one key so SDPA stays finite, then zero them
    run = mask if dead is None else mask | (dead & (torch.arange(mask.shape[-1], device=q.device) == 0))
    out = _sdpa(q, k, v, run, scale, dead)
    if all_finite(out.detach()):
        return out
    bad = nonfinite_rows(k, v)
    if bad is None:  # finite inputs, overflowing output: as SDPA gives it
        return out
    k, v = k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0)
    seen = (mask & bad.repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, None, :]).any(-1, keepdim=True)
    return _sdpa(q, k, v, run, scale, dead).masked_fill(seen, float("nan"))


def _sdpa(q, k, v, mask: torch.Tensor, scale: float, dead: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out if dead is None else out.masked_fill(dead, 0.0)


@torch.compiler.disable  # chunk loops and data-dependent masks: run eagerly inside compiled models
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    token_mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    need_lse: bool,
    window: int = 0,
    sink: int = 0,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention; ``layout`` with ``Hl`` in ``{1, Hkv, Hq}``; ``window``/``sink`` as in
    :func:`~vzoo.kernels.reference.visible_keys`; ``key_mask [B, Skv]`` hides keys.

    Returns ``out [B, Hq, Sq, D]`` (``q.dtype``) and ``lse [B, Hq, Sq]`` fp32 when ``need_lse``. Uses
    dense SDPA with the token mask instead when the cost model says it is faster, for inference only
    (neither for lse nor when an input requires grad).
    """
    if layout.max_blocks == 0:  # every row is empty
        out, lse = empty_attention(q, k, v)
        return out, (lse if need_lse else None)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not need_lse and not needs_grad and _dense_is_faster(q, k, layout):
        return _dense_masked(q, k, v, layout, token_mask, causal, scale, window, sink, key_mask), None
    layout, token_mask = broadcast_heads(layout, token_mask, q, k)
    plan = _plan(q, k, layout, token_mask, causal, scale, window, sink, key_mask, v, inference=not needs_grad)
    return _BlockSparse.apply(q, k, v, plan, need_lse)
