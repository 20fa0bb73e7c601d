"""The block-diffusion mask benchmark runs every case at a tiny length; the verdicts follow given rows."""

from __future__ import annotations

import pytest

from vzoo.bench_diffusion import CASES, MaskRow, check_diffusion_bar, format_masks, mask_rows


def test_mask_rows_run_every_case():
    rows = mask_rows((64,), repeats=1, block=8)
    assert [(r.mask, r.mode) for r in rows] == list(CASES)
    assert all(r.ms > 0 and r.dense_ms > 0 and 0 < r.density <= 1 for r in rows)
    assert abs(rows[0].density - 0.25 - 1 / 16) < 0.05  # BD3: about a quarter of the 2T x 2T pairs
    assert "block-causal" in format_masks(rows)


def test_verdicts():
    rows = [MaskRow("bd3 (training)", "fwd+bwd", 8192, 10.0, 30.0, 0.25),
            MaskRow("block-causal (prefill)", "fwd", 8192, 10.0, 15.0, 0.5), MaskRow("bd3 (training)", "fwd", 4096, 1.0, 9.0, 0.25)]
    assert check_diffusion_bar(rows) == [
        "PASS bd3 (training) fwd+bwd @8k vs dense 4-D mask through SDPA: 3.00x (bar 2.0x)",
        "FAIL block-causal (prefill) fwd @8k vs dense 4-D mask through SDPA: 1.50x (bar 2.0x)",
    ]


def test_reversal_task_layout():
    import torch

    from vzoo.bench_diffusion_decode import ReversalTask

    task = ReversalTask(lengths=(3, 3), block=8, seq_len=8)
    s = torch.tensor([1, 2, 3])
    ids, response = task.batch([s])
    assert ids[0].tolist() == [1, 2, 3, task.sep_id, 3, 2, 1, task.end_id]
    assert response[0].tolist() == [False] * 4 + [True] * 4
    assert task.prompt(s)[0].tolist() == [1, 2, 3, task.sep_id]
    assert task.answer(s).tolist() == [3, 2, 1, task.end_id]
    strings = task.sample(20, torch.Generator().manual_seed(0))
    assert all(x.numel() == 3 and int(x.max()) <= 9 for x in strings)
    import zlib

    held = task.sample(20, torch.Generator().manual_seed(0), held_out=True)
    assert all(zlib.crc32(bytes(x.tolist())) % 10 == 0 for x in held)  # the split rule, recomputed here
    assert not any(zlib.crc32(bytes(x.tolist())) % 10 == 0 for x in strings)
    with pytest.raises(ValueError, match="lengths"):
        ReversalTask(lengths=(4, 12), seq_len=16, block=16)
    with pytest.raises(ValueError, match="differ"):
        ReversalTask(sep_id=3)


def test_ar_generate_matches_transformers_greedy_search():
    import torch

    from vzoo.bench_diffusion_decode import ar_generate, tiny_llama

    model = tiny_llama(seed=3).eval()
    prompt = torch.tensor([[1, 4, 1, 5, 10]])
    got, forwards = ar_generate(model, prompt, 6, stop=99, mask_id=12)  # no stop: exactly 6 tokens, 6 forwards
    logits_mask = torch.zeros(16)
    logits_mask[12] = float("-inf")
    ids = prompt
    for _ in range(6):  # recompute the whole prefix each step, no cache
        with torch.no_grad():
            row = model(input_ids=ids).logits[0, -1] + logits_mask
        ids = torch.cat([ids, row.argmax().view(1, 1)], 1)
    assert forwards == 6 and got.tolist() == ids[0, 5:].tolist()
    stop = int(got[2])
    got, forwards = ar_generate(model, prompt, 6, stop=stop, mask_id=12)
    first = ids[0, 5:].tolist().index(stop)
    assert forwards == first + 1 and got.tolist() == ids[0, 5:5 + first + 1].tolist()


def test_decode_rows_and_verdicts():
    from vzoo.bench_diffusion_decode import DecodeRow, ReversalTask, check_decode_bar, decode_rows, train_models

    task = ReversalTask(lengths=(2, 5), block=8, seq_len=16)
    ar, dlm = train_models(task, pretrain_steps=2, tune_steps=2, batch=4, progress=False)
    rows = decode_rows(ar, dlm, task, examples=3, thresholds=(0.9, 1.0), sub_block=4, progress=False)
    assert [r.decoder for r in rows] == ["AR", "block t=0.9", "block t=1"]
    assert all(0 <= r.exact_match <= 1 and r.forwards_per_token > 0 for r in rows)
    verdict = check_decode_bar([DecodeRow("AR", None, 0.95, 1.0, 1.0), DecodeRow("block t=0.9", 0.9, 0.94, 0.4, 1.0)])
    assert verdict == ["PASS block decoding t=0.9 forwards vs AR: 0.400x (bar 0.5x)",
                       "PASS exact-match drop vs AR: 1.0 points (bar 2)"]
    verdict = check_decode_bar([DecodeRow("AR", None, 0.95, 1.0, 1.0), DecodeRow("block t=0.9", 0.9, 0.90, 0.6, 1.0)])
    assert [v.split()[0] for v in verdict] == ["FAIL", "FAIL"]
