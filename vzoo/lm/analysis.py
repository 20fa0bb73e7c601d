"""Preplan-and-anchor rhythm of a causal LM's attention (Li, Dong, Sun, ..., Yan, "Attention Illuminates LLM
Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization", arXiv 2510.13554, ICML 2026).

Heads are split by their average backward attention distance into *local* heads (the lowest fraction ``q``) and
*global* heads (the highest ``q``). On the local heads' mean map the **WAAD** (windowed average attention distance)
of token ``t`` is ``sum_{s<=t} A_loc[t, s] * min(t - s, W)``; on the global heads' mean map the **FAI** (future
attention influence) of token ``s`` is the mean of ``A_glob[t, s]`` over the response tokens ``t`` with
``s + h_lo <= t <= min(T - 1, s + h_hi)``. Preplan tokens are where WAAD jumps, anchors where FAI is high; the RL
credit scale ``gamma`` multiplies GRPO-style advantages only where the advantage is non-negative.

What was checked against the paper (the arXiv abstract and HTML front matter and the ICML 2026 abstract, found with a
search tool; the method section and its equations could not be read): the local/global head distinction, WAAD as
"the extent of backward attention within a clipped window", FAI as "the average attention a token receives from
subsequent tokens", the preplan-then-anchor reading and the three credit strategies (preplan tokens, anchor tokens,
their coupling); a third-party summary of the ICML version (papernotes.org) describes them as token-level advantage
amplification coefficients inside GRPO. Taken from the project spec
(``lm_methods.md`` section 13, itself from a third-party description citing the paper's Eqs. 7-18) and *not*
verified: the distance formula, the 30% head split, the 5 evenly spaced middle-third layers, ``W = 10``,
``h_lo = 10``, ``h_hi = 50``, the 40% token quantiles, ``k = 3``, ``gamma_amp = 1.5``, ``alpha = 0.5``. Assumed here
(our reading, documented at each function): how ties and counts are rounded, what "low WAAD" means for a locally
dominated anchor (at most the median response WAAD), how the coupled strategy splits credit (the anchor and its
preplan token each get ``1 + alpha * (gamma_amp - 1)``), and FAI = 0 for a token with no response token in its
future window.

Attention sinks are kept, as the definitions say: on SmolLM2-135M the first token takes much of every row, so WAAD
is largely ``W`` times the sink's mass and the first token has by far the largest FAI (the plot clips it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from vzoo.atomic import save_figure, write_json_atomic

from .layers import attention_modules

__all__ = [
    "analyze_rhythm", "apply_credit", "attention_maps", "classify_heads", "credit_scale", "fai",
    "head_average", "head_distance", "middle_layers", "preplan_anchor", "waad",
]

STRATEGIES = ("preplan", "anchor", "coupled")


def _response_mask(response: int | torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """``response`` (``None``: every token; an int: the tokens from that index on; a bool ``[T]`` mask) as a bool
    ``[T]`` mask."""
    if response is None:
        return torch.ones(length, dtype=torch.bool, device=device)
    if isinstance(response, int):
        if not 0 <= response < length:
            raise ValueError(f"response={response}: the first response token must lie in [0, {length})")
        return torch.arange(length, device=device) >= response
    if response.dtype != torch.bool or response.shape != (length,):
        raise ValueError(f"response: expected an int or a bool mask of shape ({length},), got {response.dtype} "
                         f"{tuple(response.shape)}")
    return response.to(device)


def _check_square(A: torch.Tensor, name: str = "A") -> int:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name}: expected attention maps [..., T, T], got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {A.dtype}")
    return A.shape[-1]


def _top_count(n: int, q: float) -> int:
    """How many of ``n`` items the top fraction ``q`` holds: ``max(1, floor(q * n))`` (0 when ``n`` is 0)."""
    return 0 if n == 0 else max(1, math.floor(q * n + 1e-9))


# ------------------------------------------------------------------------------------------- attention maps


@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Softmax attention maps ``[L, H, T, T]`` (fp32, every query head, causal) of ``input_ids [T]`` or ``[1, T]``
    from a transformers causal LM; the model runs eager attention for this call and gets its own implementation
    back."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape [T] or [1, T] (batch 1), got {tuple(input_ids.shape)}")
    attention_modules(model)
    original = model.config._attn_implementation
    if original != "eager":
        model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        if original != "eager":
            model.set_attn_implementation(original)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError(f"{type(model).__name__} returned no attention maps with output_attentions=True")
    return torch.stack([a[0].float() for a in out.attentions])


def middle_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced layers of the middle third ``[L // 3, ceil(2 L / 3))`` (all of it when shorter)."""
    if num_layers < 1 or count < 1:
        raise ValueError(f"num_layers={num_layers}, count={count}: both must be >= 1")
    lo, hi = num_layers // 3, math.ceil(2 * num_layers / 3)
    if hi - lo <= count:
        return list(range(lo, hi))
    if count == 1:
        return [(lo + hi - 1) // 2]
    return sorted({round(lo + i * (hi - 1 - lo) / (count - 1)) for i in range(count)})


# ---------------------------------------------------------------------------------------------- heads


def head_distance(A: torch.Tensor, response: int | torch.Tensor | None = None) -> torch.Tensor:
    """Average backward attention distance of every head: ``A [..., T, T]`` -> ``[...]``, the mean over response
    tokens ``t`` of ``sum_{s<=t} A[t, s] * (t - s)`` (uncapped)."""
    T = _check_square(A)
    r = _response_mask(response, T, A.device)
    pos = torch.arange(T, device=A.device)
    dist = (pos[:, None] - pos[None, :]).clamp_min(0).to(A.dtype)
    per_token = (A * dist).sum(-1)  # [..., T]
    return per_token[..., r].mean(-1)


def classify_heads(distances: torch.Tensor, q: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Split heads by ``distances`` (any shape, e.g. ``[L, H]``) into bool masks ``(local, global)`` of the same
    shape: the ``max(1, floor(q * n))`` smallest and the as many largest distances (ties by flat index)."""
    if not 0 < q <= 0.5:
        raise ValueError(f"q={q}: the fraction of local (and of global) heads must lie in (0, 0.5]")
    n = distances.numel()
    if n < 2:
        raise ValueError(f"distances: need at least 2 heads to split, got shape {tuple(distances.shape)}")
    k = _top_count(n, q)
    order = torch.argsort(distances.flatten(), stable=True)
    local = torch.zeros(n, dtype=torch.bool, device=distances.device)
    glob = torch.zeros_like(local)
    local[order[:k]] = True
    glob[order[n - k:]] = True
    return local.view(distances.shape), glob.view(distances.shape)


def head_average(A: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Mean map ``[T, T]`` of the heads ``heads`` (bool, ``A``'s leading shape) selects from ``A [..., T, T]``."""
    _check_square(A)
    if heads.dtype != torch.bool or heads.shape != A.shape[:-2] or not heads.any():
        raise ValueError(f"heads: expected a non-empty bool mask of shape {tuple(A.shape[:-2])}, got {heads.dtype} "
                         f"{tuple(heads.shape)}")
    return A[heads].mean(0)


# ------------------------------------------------------------------------------------------ WAAD and FAI


def waad(A: torch.Tensor, W: int = 10) -> torch.Tensor:
    """Windowed average attention distance ``[..., T]`` of ``A [..., T, T]``: ``sum_{s<=t} A[t, s] min(t - s, W)``;
    lies in ``[0, W]`` for row-stochastic causal maps."""
    T = _check_square(A)
    if W < 1:
        raise ValueError(f"W={W}: the window must be >= 1")
    pos = torch.arange(T, device=A.device)
    dist = (pos[:, None] - pos[None, :]).clamp(0, W).to(A.dtype)
    return (A * dist).sum(-1)


def fai(A: torch.Tensor, h_lo: int = 10, h_hi: int = 50, response: int | torch.Tensor | None = None) -> torch.Tensor:
    """Future attention influence ``[..., T]`` of ``A [..., T, T]``: for token ``s`` the mean of ``A[t, s]`` over
    response tokens ``t`` with ``s + h_lo <= t <= min(T - 1, s + h_hi)``; 0 where that set is empty."""
    T = _check_square(A)
    if not 0 <= h_lo <= h_hi:
        raise ValueError(f"h_lo={h_lo}, h_hi={h_hi}: need 0 <= h_lo <= h_hi")
    r = _response_mask(response, T, A.device)
    pos = torch.arange(T, device=A.device)
    gap = pos[:, None] - pos[None, :]  # [t, s] = t - s
    window = (gap >= h_lo) & (gap <= h_hi) & r[:, None]
    count = window.sum(0)  # [s]
    total = (A * window.to(A.dtype)).sum(-2)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


# ------------------------------------------------------------------------------- preplan, anchors, credit


def preplan_anchor(waad_t: torch.Tensor, fai_t: torch.Tensor, q: float = 0.4, k: int = 3,
                   response: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Preplan and anchor tokens of one sequence from ``waad_t, fai_t [T]``; all flags are ``False`` outside the
    response. Returns ``[T]`` tensors:

    - ``delta``: ``|WAAD_t - WAAD_{t+1}|`` (0 at the last token and where ``t + 1`` is not a response token);
    - ``preplan``: the ``max(1, floor(q n))`` response tokens with the largest ``delta`` (``n`` response tokens,
      ties by position);
    - ``anchor``: as many response tokens with the largest FAI;
    - ``dominated``: anchors that are *locally dominated*: WAAD at most the response median and a preplan token
      among the ``k`` tokens before it;
    - ``source``: for a dominated anchor the nearest such preplan token (its credit goes back there), else -1.
    """
    if waad_t.dim() != 1 or fai_t.shape != waad_t.shape:
        raise ValueError(f"waad_t, fai_t: expected two [T] tensors, got {tuple(waad_t.shape)} and {tuple(fai_t.shape)}")
    if not 0 < q <= 1 or k < 1:
        raise ValueError(f"q={q}, k={k}: need 0 < q <= 1 and k >= 1")
    T = waad_t.shape[0]
    r = _response_mask(response, T, waad_t.device)
    delta = torch.zeros_like(waad_t)
    if T > 1:
        delta[:-1] = (waad_t[1:] - waad_t[:-1]).abs() * r[1:]

    def top(values: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(r).flatten()
        keep = idx[torch.argsort(values[idx], descending=True, stable=True)[: _top_count(idx.numel(), q)]]
        flags = torch.zeros(T, dtype=torch.bool, device=values.device)
        flags[keep] = True
        return flags

    preplan, anchor = top(delta), top(fai_t)
    low = waad_t <= waad_t[r].median()
    source = torch.full((T,), -1, dtype=torch.long, device=waad_t.device)
    for t in torch.nonzero(anchor & low).flatten().tolist():
        for p in range(t - 1, max(t - k, 0) - 1, -1):
            if preplan[p]:
                source[t] = p
                break
    return {"delta": delta, "preplan": preplan, "anchor": anchor, "dominated": source >= 0, "source": source}


def credit_scale(flags: dict[str, torch.Tensor], strategy: str = "coupled", gamma_amp: float = 1.5,
                 alpha: float = 0.5) -> torch.Tensor:
    """Per-token credit scale ``gamma [T]`` from :func:`preplan_anchor`'s ``flags`` (detached; 1 = unchanged).

    ``"preplan"``: ``gamma_amp`` on preplan tokens; ``"anchor"``: ``gamma_amp`` on anchors; ``"coupled"``:
    ``gamma_amp`` on anchors that are not locally dominated, and for a dominated anchor its credit is shared with
    the preplan token it points back to, each getting ``1 + alpha (gamma_amp - 1)``; a token that qualifies twice
    keeps the larger scale. With the defaults ``gamma`` takes values in ``{1, 1.25, 1.5}``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if gamma_amp < 1 or not 0 <= alpha <= 1:
        raise ValueError(f"gamma_amp={gamma_amp}, alpha={alpha}: need gamma_amp >= 1 and 0 <= alpha <= 1")
    anchor, preplan = flags["anchor"], flags["preplan"]
    gamma = torch.ones(anchor.shape, dtype=torch.float32, device=anchor.device)
    if strategy == "preplan":
        gamma[preplan] = gamma_amp
    elif strategy == "anchor":
        gamma[anchor] = gamma_amp
    else:
        shared = 1 + alpha * (gamma_amp - 1)
        gamma[anchor & ~flags["dominated"]] = gamma_amp
        source = flags["source"]
        for t in torch.nonzero(flags["dominated"]).flatten().tolist():
            gamma[t] = max(gamma[t].item(), shared)
            gamma[source[t]] = max(gamma[source[t]].item(), shared)
    return gamma.detach()


def apply_credit(advantages: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``advantages [..., T]`` times ``gamma [T]`` (or the same shape) where the advantage is >= 0, unchanged where
    it is negative; ``gamma`` is detached (a credit signal, never a gradient path)."""
    try:
        gamma = torch.broadcast_to(gamma.detach().to(advantages.dtype), advantages.shape)
    except RuntimeError:
        raise ValueError(f"gamma: shape {tuple(gamma.shape)} does not broadcast to advantages "
                         f"{tuple(advantages.shape)}") from None
    return torch.where(advantages >= 0, advantages * gamma, advantages)


# ---------------------------------------------------------------------------------------------- command


def _plot(path: Path, w: torch.Tensor, f: torch.Tensor, flags: dict[str, torch.Tensor], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.arange(w.shape[0])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, w.shape[0] / 40), 6), sharex=True)
    top.plot(x, w, lw=0.8, color="tab:blue", label="WAAD (local heads)")
    top.scatter(x[flags["preplan"]], w[flags["preplan"]], s=12, color="tab:red", zorder=3, label="preplan")
    top.set_ylabel("WAAD")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(x, f, lw=0.8, color="tab:green", label="FAI (global heads)")
    bottom.scatter(x[flags["anchor"]], f[flags["anchor"]], s=12, color="tab:orange", zorder=3, label="anchor")
    dom = flags["dominated"]
    bottom.scatter(x[dom], f[dom], s=30, facecolors="none", edgecolors="black", zorder=4, label="locally dominated")
    ranked = f.sort(descending=True).values
    if f.shape[0] > 1 and ranked[0] > 3 * ranked[1] > 0:  # an attention sink would flatten the curve: clip it
        bottom.set_ylim(0, 1.3 * ranked[1].item())
        t = int(f.argmax())
        bottom.annotate(f"token {t}: FAI {ranked[0].item():.3f} (off scale)", (t, 1.25 * ranked[1].item()), fontsize=8)
    bottom.set_ylabel("FAI")
    bottom.set_xlabel("token")
    bottom.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def analyze_rhythm(model_dir: str | Path, text_file: str | Path, out_dir: str | Path, *, gguf_file: str | None = None,
                   prompt_tokens: int = 0, max_tokens: int = 1024, layers: list[int] | None = None, W: int = 10,
                   h_lo: int = 10, h_hi: int = 50, q_heads: float = 0.3, q_tokens: float = 0.4, k: int = 3,
                   strategy: str = "coupled") -> dict:
    """Rhythm analysis of the text in ``text_file`` under the causal LM folder ``model_dir`` (transformers
    ``save_pretrained`` layout, or a GGUF file ``gguf_file`` inside it), eager attention, fp32, CPU.

    The first ``max_tokens`` tokens of the text are scored; the first ``prompt_tokens`` of them are the prompt
    and the rest the response (default: the whole text is the response). Heads of ``layers`` (default
    :func:`middle_layers`) are split by :func:`head_distance` on the response; WAAD uses the local heads' mean
    map, FAI the global heads'. Writes ``out_dir/rhythm.png`` (WAAD and FAI curves, preplan and anchor tokens
    marked) and ``out_dir/rhythm.json`` (per token: text, WAAD, FAI, delta, flags, gamma; the head split and the
    parameters), both atomically, and returns the JSON object."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, text_file, out_dir = Path(model_dir), Path(text_file), Path(out_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model_dir={str(model_dir)!r} is not a folder")
    if not text_file.is_file():
        raise ValueError(f"text_file={str(text_file)!r} is not a file")
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: need at least 2 tokens")
    if strategy not in STRATEGIES:  # the other settings are checked before the model is loaded, too
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if not (0 < q_tokens <= 1 and k >= 1 and 0 < q_heads <= 0.5 and W >= 1 and 0 <= h_lo <= h_hi):
        raise ValueError(f"q_tokens={q_tokens}, k={k}, q_heads={q_heads}, W={W}, h_lo={h_lo}, h_hi={h_hi}: need "
                         "0 < q_tokens <= 1, k >= 1, 0 < q_heads <= 0.5, W >= 1 and 0 <= h_lo <= h_hi")
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **extra)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", **extra)
    model.eval()
    ids = tokenizer.encode(text_file.read_text(), add_special_tokens=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text_file={str(text_file)!r}: {len(ids)} tokens, need at least 2")
    T = len(ids)
    if not 0 <= prompt_tokens < T:
        raise ValueError(f"prompt_tokens={prompt_tokens}: must lie in [0, {T}) for a text of {T} tokens")
    A = attention_maps(model, torch.tensor([ids]))
    num_layers = A.shape[0]
    layers = middle_layers(num_layers) if layers is None else list(layers)
    if not layers or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"layers={layers}: need layer indices in [0, {num_layers})")
    A = A[layers]
    dist = head_distance(A, prompt_tokens)
    local, glob = classify_heads(dist, q_heads)
    w = waad(head_average(A, local), W)
    f = fai(head_average(A, glob), h_lo, h_hi, prompt_tokens)
    flags = preplan_anchor(w, f, q_tokens, k, prompt_tokens)
    gamma = credit_scale(flags, strategy)
    texts = [tokenizer.decode([i]) for i in ids]
    tokens = [{
        "index": t, "id": ids[t], "text": texts[t], "response": t >= prompt_tokens, "waad": round(w[t].item(), 6),
        "fai": round(f[t].item(), 6), "delta": round(flags["delta"][t].item(), 6),
        "preplan": bool(flags["preplan"][t]), "anchor": bool(flags["anchor"][t]),
        "dominated": bool(flags["dominated"][t]), "source": int(flags["source"][t]), "gamma": gamma[t].item(),
    } for t in range(T)]
    result = {
        "model": str(model_dir) if gguf_file is None else str(model_dir / gguf_file),
        "text": str(text_file),
        "params": {"tokens": T, "prompt_tokens": prompt_tokens, "W": W, "h_lo": h_lo, "h_hi": h_hi,
                   "q_heads": q_heads, "q_tokens": q_tokens, "k": k, "strategy": strategy},
        "heads": {
            "layers": layers,
            "distance": [[round(v, 4) for v in row] for row in dist.tolist()],
            "local": [[layers[i], j] for i, j in torch.nonzero(local).tolist()],
            "global": [[layers[i], j] for i, j in torch.nonzero(glob).tolist()],
        },
        "summary": {
            "preplan": [t for t in range(T) if flags["preplan"][t]],
            "anchor": [t for t in range(T) if flags["anchor"][t]],
            "dominated": [t for t in range(T) if flags["dominated"][t]],
            "waad_mean": w[prompt_tokens:].mean().item(), "fai_mean": f[prompt_tokens:].mean().item(),
        },
        "tokens": tokens,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{model_dir.name}: {T} tokens, layers {layers}, {int(local.sum())} local / {int(glob.sum())} global "
             f"heads, W={W}, FAI window [{h_lo}, {h_hi}]")
    _plot(out_dir / "rhythm.png", w, f, flags, title)
    write_json_atomic(result, out_dir / "rhythm.json")
    return result
