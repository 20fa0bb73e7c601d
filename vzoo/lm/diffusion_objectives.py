"""Block-diffusion training objectives: noising, the ``[x_t ; x_0]`` input and the masked-token loss.

**Fast-dLLM v2** (Wu et al., arXiv 2509.26328), semantics of the released remote code
(``v2/.../modeling.py``, ``Fast_dLLM_QwenForCausalLM.forward`` in training mode):
:func:`complementary_masking` (per block ``t ~ U(0, 1)``, ``p = (1 - eps) t + eps``, response tokens masked
i.i.d. with ``p``; a second copy masks exactly the other response tokens, both copies along the batch),
:func:`bd3_inputs` (``[x_t ; x_0]``, both halves at positions ``0 .. T-1``), and :func:`diffusion_loss` with
``token_shift=True``: transformers' causal-LM loss, so the token at position ``i`` is predicted by the logits at
``i - 1``; plain mean cross-entropy over the supervised tokens, no ``1/t`` weight.

**Efficient-DLM** (Fu et al., arXiv 2512.14067): :func:`position_dependent_masking`, later in-block positions
masked more, one copy; no token shift (its model card decodes with ``shift_logits=False``), i.e.
:func:`diffusion_loss` with ``token_shift=False``. The schedule (:func:`position_dependent_mask_probs`) is
partly an assumption: the paper text was not available here and no official training code is public. Two
third-party accounts agree on exponential in-block weights ``w_i(t) = exp(beta (1 - t) i)`` (the paper's Eq. 2,
Sec. 3.2, per a public re-implementation, ``modern_lm/dlm.py``) parameterised by the half-life ratio
``lambda = ln 2 / (beta b)``, best at ``lambda = 0.1``; that re-implementation masks exactly ``ceil(t b)``
positions per block, drawn without replacement in proportion to ``w``. Turning ``w`` into independent per-token
probabilities whose block mean is ``t`` (``p_i = min(1, c w_i)``) is this module's choice.

Typical use: ``noisy, labels = complementary_masking(ids, response, 32, mask_id)``;
``ids2, pos = bd3_inputs(noisy, torch.cat([ids, ids]))``; ``logits = model(ids2, position_ids=pos, <BD3 mask>)
.logits[:, :T]``; ``loss = diffusion_loss(logits, labels, token_shift=True)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX", "bd3_inputs", "complementary_masking", "diffusion_loss", "pad_to_block",
    "position_dependent_mask_probs", "position_dependent_masking", "shift_labels",
]

IGNORE_INDEX = -100
SCHEDULES = ("exp", "uniform")
Schedule = str | Callable[[torch.Tensor, int], torch.Tensor]


def _check_int(name: str, value: int, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ValueError(f"{name}={value!r} must be an int" + ("" if low is None else f" >= {low}"))


def _check_ids(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer [N, T] tensor, got {desc}")


def _check_batch(name: str, ids: torch.Tensor, response_mask: torch.Tensor, block: int) -> None:
    """``ids [N, T]`` integer, ``response_mask`` bool of the same shape and device, ``block`` a positive int."""
    _check_ids(name, ids)
    _check_int("block", block, 1)
    if not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool \
            or response_mask.shape != ids.shape or response_mask.device != ids.device:
        desc = (f"{response_mask.dtype} {tuple(response_mask.shape)} on {response_mask.device}"
                if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__)
        raise ValueError(f"response_mask must be a bool tensor {tuple(ids.shape)} on {ids.device} like {name}, "
                         f"got {desc}")


def _check_noising(input_ids: torch.Tensor, response_mask: torch.Tensor, block: int, mask_id: int) -> None:
    _check_batch("input_ids", input_ids, response_mask, block)
    _check_int("mask_id", mask_id)
    if input_ids.shape[1] % block:
        raise ValueError(f"input_ids length {input_ids.shape[1]} is not a multiple of block={block}; "
                         f"right-pad with pad_to_block")


def _block_rates(t: torch.Tensor | float | None, eps: float, shape: tuple[int, int], generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """``(1 - eps) t + eps`` per block, ``[B, nblocks]``; ``t`` drawn ``U(0, 1)`` when None."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps!r} must be a float in [0, 1]")
    if t is None:
        t = torch.rand(shape, generator=generator, device=device)
    else:
        t = torch.as_tensor(t, device=device)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("t must lie in [0, 1]")
        try:
            t = t.expand(shape)
        except RuntimeError:
            raise ValueError(f"t {tuple(t.shape)} does not broadcast to [B, nblocks] = {list(shape)}") from None
    return (1.0 - eps) * t + eps


def pad_to_block(ids: torch.Tensor, response_mask: torch.Tensor, block: int,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``ids [B, T]`` with ``pad_id`` and ``response_mask`` (bool ``[B, T]``) with False to the next
    multiple of ``block`` (Fast-dLLM v2 step 1). Returns the inputs themselves when ``T`` already is one."""
    _check_batch("ids", ids, response_mask, block)
    _check_int("pad_id", pad_id)
    extra = -ids.shape[1] % block
    if not extra:
        return ids, response_mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(response_mask, (0, extra), value=False)


def complementary_masking(input_ids: torch.Tensor, response_mask: torch.Tensor, block: int, mask_id: int,
                          generator: torch.Generator | None = None, eps: float = 1e-3, *,
                          t: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM v2 noising with its complementary copy.

    Args:
        input_ids: ``[B, T]`` token ids, ``T`` a multiple of ``block`` (see :func:`pad_to_block`).
        response_mask: bool ``[B, T]``, True on the tokens to learn (the response); others are never masked.
        block: diffusion block size ``b``.
        mask_id: the [MASK] token id.
        generator: for the draws (on ``input_ids.device``).
        eps: floor of the rate: ``p = (1 - eps) t + eps``.
        t: per-block noise levels ``[B, T // b]`` (or anything broadcasting to it) in [0, 1]; None: ``U(0, 1)``.

    Returns:
        ``noisy [2B, T]`` (rows ``0..B-1``: response tokens masked i.i.d. with their block's ``p``; rows
        ``B..2B-1``: exactly the other response tokens of the same sequence masked) and ``labels [2B, T]``
        (the original id where masked, :data:`IGNORE_INDEX` elsewhere): each response token is supervised
        exactly once per pair.
    """
    _check_noising(input_ids, response_mask, block, mask_id)
    b, n = input_ids.shape
    rate = _block_rates(t, eps, (b, n // block), generator, input_ids.device)
    drawn = torch.rand((b, n), generator=generator, device=input_ids.device, dtype=rate.dtype) \
        < rate.repeat_interleave(block, dim=1)
    masked = torch.cat([drawn & response_mask, ~drawn & response_mask])
    ids = torch.cat([input_ids, input_ids])
    return ids.masked_fill(masked, mask_id), ids.masked_fill(~masked, IGNORE_INDEX)


def _exp_probs(t: torch.Tensor, block: int, half_life: float) -> torch.Tensor:
    """``p_i = min(1, c w_i)``, ``w_i = exp(beta (1 - t) i)``, ``c`` such that ``mean_i p_i = t`` (log space, so
    no weight underflows)."""
    beta = math.log(2.0) / (half_life * block)
    i = torch.arange(block, device=t.device, dtype=t.dtype)
    logw = beta * (1.0 - t)[..., None] * i  # non-decreasing in i
    # water filling: with the last k positions clipped to 1, the head i < b-k shares the rest t b - k in proportion
    # to w, c_k = (t b - k) / sum_{i < b-k} w_i; the answer is the smallest k whose largest unclipped
    # probability c_k w_{b-k-1} is <= 1 (k = b - 1 always qualifies)
    log_head = torch.logcumsumexp(logw, -1).flip(-1)  # [k] = log sum_{i < b-k} w_i
    rest = t[..., None] * block - torch.arange(block, device=t.device, dtype=t.dtype)
    log_rest = torch.log(rest.clamp_min(0.0))
    tol = 8 * torch.finfo(t.dtype).eps * (1.0 + log_head.abs())
    fits = log_rest + logw.flip(-1) <= log_head + tol  # log_rest = -inf once nothing is left
    first = fits.to(torch.int8).argmax(-1, keepdim=True)
    return torch.exp((log_rest - log_head).gather(-1, first) + logw).clamp(max=1.0)


def _check_schedule(schedule: Schedule, half_life: float) -> None:
    if callable(schedule):
        return
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES} or a callable")
    if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not 0 < half_life < math.inf:
        raise ValueError(f"half_life={half_life!r} must be a positive finite float")


def _mask_probs(t: torch.Tensor, block: int, schedule: Schedule, half_life: float) -> torch.Tensor:
    if callable(schedule):
        probs = schedule(t, block)
        if not isinstance(probs, torch.Tensor) or probs.shape != (*t.shape, block):
            got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(f"schedule returned {got}, expected {(*t.shape, block)}")
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError("schedule returned probabilities outside [0, 1]")
        return probs
    if schedule == "uniform":
        return t[..., None].expand(*t.shape, block).clone()
    return _exp_probs(t, block, float(half_life))


def position_dependent_mask_probs(t: torch.Tensor | float, block: int, schedule: Schedule = "exp", *,
                                  half_life: float = 0.1) -> torch.Tensor:
    """Efficient-DLM per-position masking probabilities inside a block.

    ``"exp"`` (default): weights ``w_i = exp(beta (1 - t) i)`` over in-block positions ``i = 0 .. b-1`` with
    ``beta = ln 2 / (half_life * b)`` (at ``t = 0`` the weight doubles every ``half_life * b`` positions; at
    ``t = 1`` it is flat), turned into ``p_i = min(1, c w_i)`` with ``c`` chosen so that ``mean_i p_i = t``
    exactly. Invariants: ``p`` in [0, 1], non-decreasing in ``i``, block mean ``t``; unclipped neighbours keep
    the weight ratio ``p_{i+1} / p_i = exp(beta (1 - t))``. The weights and ``half_life = 0.1`` follow
    third-party accounts of the paper's Sec. 3.2; the mean-``t`` Bernoulli form is this module's assumption
    (see the module docstring). ``"uniform"``: ``p_i = t`` (plain masked diffusion). A callable
    ``schedule(t [...], block) -> [..., block]`` is used as given (checked for shape and range).

    Args:
        t: noise level(s) in [0, 1], a float or a tensor of any shape ``[...]`` (e.g. ``[B, nblocks]``).
        block: block size ``b``.
        schedule: ``"exp" | "uniform"`` or a callable.
        half_life: ``"exp"`` only: ``lambda``, the fraction of the block over which the weight halves.

    Returns:
        ``probs [..., block]`` in ``t``'s floating dtype (the default dtype for a float ``t``).
    """
    _check_int("block", block, 1)
    _check_schedule(schedule, half_life)
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError("t must lie in [0, 1]")
    return _mask_probs(t, block, schedule, half_life)


def position_dependent_masking(input_ids: torch.Tensor, response_mask: torch.Tensor, block: int, mask_id: int,
                               generator: torch.Generator | None = None, schedule: Schedule = "exp", *,
                               half_life: float = 0.1, eps: float = 1e-3,
                               t: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Efficient-DLM noising: per block a level ``(1 - eps) t + eps`` (``t ~ U(0, 1)`` unless given), then each
    response token masked independently with :func:`position_dependent_mask_probs` of that level at its in-block
    position ``j % block`` (blocks count from column 0, so a block shared with the prompt keeps its positions;
    prompt tokens are never masked). One copy, no token shift.

    Args:
        input_ids, response_mask, block, mask_id, generator, eps, t: as in :func:`complementary_masking`.
        schedule, half_life: as in :func:`position_dependent_mask_probs`.

    Returns:
        ``noisy [B, T]`` and ``labels [B, T]`` (original id where masked, :data:`IGNORE_INDEX` elsewhere).
    """
    _check_noising(input_ids, response_mask, block, mask_id)
    _check_schedule(schedule, half_life)
    b, n = input_ids.shape
    rate = _block_rates(t, eps, (b, n // block), generator, input_ids.device)
    probs = _mask_probs(rate, block, schedule, half_life).reshape(b, n)
    masked = (torch.rand((b, n), generator=generator, device=input_ids.device, dtype=probs.dtype) < probs) \
        & response_mask
    return input_ids.masked_fill(masked, mask_id), input_ids.masked_fill(~masked, IGNORE_INDEX)


def bd3_inputs(noisy: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The BD3-LM / Fast-dLLM v2 training input: ``input_ids = [noisy ; clean]`` ``[N, 2T]`` and
    ``position_ids [N, 2T]`` = ``0 .. T-1`` twice (both halves share RoPE positions; a broadcast view). For the
    complementary pair pass ``clean = torch.cat([input_ids, input_ids])``. The model must run it under the BD3 mask
    (:func:`vzoo.lm.block_diffusion.bd3_forward` does both); the loss reads the first ``T`` logits."""
    _check_ids("noisy", noisy)
    _check_ids("clean", clean)
    if clean.shape != noisy.shape or clean.device != noisy.device:
        raise ValueError(f"clean {tuple(clean.shape)} on {clean.device} must match noisy {tuple(noisy.shape)} on "
                         f"{noisy.device}")
    n, t = noisy.shape
    positions = torch.arange(t, device=noisy.device).repeat(2).expand(n, -1)
    return torch.cat([noisy, clean.to(noisy.dtype)], dim=1), positions


def shift_labels(labels: torch.Tensor, token_shift: bool) -> torch.Tensor:
    """Targets aligned with the logits rows: ``out[:, i]`` is what the logits at ``i`` must predict.

    ``token_shift=True`` (Fast-dLLM v2; transformers' ``labels=`` convention): ``out[:, i] = labels[:, i + 1]``,
    the last column :data:`IGNORE_INDEX` (a supervised token at position 0 has no row and is dropped).
    ``token_shift=False`` (Efficient-DLM): ``labels`` itself (token ``i`` predicted at ``i``)."""
    _check_ids("labels", labels)
    if not isinstance(token_shift, bool):
        raise ValueError(f"token_shift={token_shift!r} must be a bool")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if token_shift else labels


def diffusion_loss(logits: torch.Tensor, labels: torch.Tensor, token_shift: bool) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the supervised tokens of ``labels [N, T]`` (:data:`IGNORE_INDEX`
    elsewhere) given ``logits [N, T, V]`` of the noisy half, with the alignment of :func:`shift_labels`; no
    ``1/t`` weight (the released Fast-dLLM v2 code). ``0`` (still differentiable) when nothing is supervised."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        desc = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating [N, T, V] tensor, got {desc}")
    target = shift_labels(labels, token_shift)
    if logits.shape[:2] != target.shape or logits.device != target.device:
        raise ValueError(f"logits {tuple(logits.shape)} on {logits.device} must be [N, T, V] with labels "
                         f"{tuple(labels.shape)} on {labels.device} (only the noisy half's logits, [:, :T])")
    total = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)
