"""MQAR data and training loop (vzoo.mqar): the generator's invariants checked by plain loops, an oracle
that reads the pairs back scores 1.0, the schedule, and a tiny training run whose loss falls."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from vzoo.mqar import (
    SOFTMAX, MQARModel, MQARTask, MQARTrain, accuracy, build_model, converters, format_table, mqar_batch, mqar_rows,
    plot_curves, train_mqar,
)

TASKS = [
    MQARTask(),
    MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=4, random_non_queries=False),
    MQARTask(vocab_size=40, seq_len=34, num_kv_pairs=3, power_a=1.0),
]


@pytest.mark.parametrize("task", TASKS)
def test_batch_invariants(task):
    inputs, labels = mqar_batch(task, 24, torch.Generator().manual_seed(1))
    assert inputs.shape == labels.shape == (24, task.seq_len) and inputs.dtype == labels.dtype == torch.long
    n, half = task.num_kv_pairs, task.vocab_size // 2
    for x, y in zip(inputs.tolist(), labels.tolist()):
        pairs = {}
        for i in range(n):
            key, value = x[2 * i], x[2 * i + 1]
            assert 1 <= key < half and half <= value < task.vocab_size
            assert key not in pairs and value not in pairs.values()
            pairs[key] = value
        queried = []
        for t in range(task.seq_len):
            if t < 2 * n:
                assert y[t] == -100  # nothing scored inside the pairs
            elif y[t] != -100:
                assert (t - 2 * n) % 2 == 0  # queries sit at even offsets after the pairs
                assert x[t] in pairs and y[t] == pairs[x[t]]  # the label is the queried key's value
                queried.append(x[t])
            elif not task.random_non_queries:
                assert x[t] == 0
            else:
                assert 0 <= x[t] < task.vocab_size
        assert sorted(queried) == sorted(pairs)  # every key is queried exactly once


def test_batch_is_seeded_and_power_law_favours_short_gaps():
    task = MQARTask(vocab_size=128, seq_len=128, num_kv_pairs=4)
    a = mqar_batch(task, 8, torch.Generator().manual_seed(3))
    b = mqar_batch(task, 8, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))

    def early_share(power_a):  # share of queries in the first half of the query region
        _, labels = mqar_batch(MQARTask(128, 128, 4, power_a=power_a), 256, torch.Generator().manual_seed(0))
        pos = (labels != -100).nonzero()[:, 1].float()
        return ((pos - 8) < (128 - 8) / 2).float().mean().item()

    assert early_share(0.01) > 0.75 and 0.35 < early_share(1.0) < 0.65


@pytest.mark.parametrize("kwargs, name", [
    ({"seq_len": 63}, "seq_len"), ({"num_kv_pairs": 17}, "num_kv_pairs"), ({"vocab_size": 16}, "vocab_size"),
    ({"power_a": 0.0}, "power_a"),
])
def test_bad_task(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MQARTask(**kwargs)


def test_bad_settings():
    with pytest.raises(ValueError, match="num_heads"):
        MQARModel(hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="schedule"):
        MQARTrain(schedule="linear")


def test_lr_schedule():
    train = MQARTrain(steps=110, lr=1.0, warmup_steps=10)
    assert train.lr_at(0) == pytest.approx(0.1) and train.lr_at(9) == pytest.approx(1.0)
    assert train.lr_at(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_at(109) < 0.001
    assert MQARTrain(steps=110, lr=1.0, warmup_steps=10, schedule="constant").lr_at(100) == 1.0


class Oracle(torch.nn.Module):
    """Predicts, at every position whose token is a key of the pairs, that key's value (read by a loop);
    ``wrong`` shifts every prediction by one token."""

    def __init__(self, task, wrong=False):
        super().__init__()
        self.task, self.wrong = task, wrong

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.task.vocab_size)
        for i, x in enumerate(input_ids.tolist()):
            pairs = {x[2 * j]: x[2 * j + 1] for j in range(self.task.num_kv_pairs)}
            for pos in range(t):
                value = pairs.get(x[pos], 0)
                logits[i, pos, (value + self.wrong) % self.task.vocab_size] = 1.0
        return SimpleNamespace(logits=logits)


def test_accuracy_of_oracle():
    task = TASKS[1]
    inputs, labels = mqar_batch(task, 10, torch.Generator().manual_seed(2))
    assert accuracy(Oracle(task), inputs, labels, batch_size=3) == 1.0
    assert accuracy(Oracle(task, wrong=True), inputs, labels, batch_size=3) == 0.0


def test_training_loss_falls():
    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    train = MQARTrain(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=20, eval_examples=32)
    result = train_mqar(SOFTMAX, lambda m: m, task, MQARModel(hidden_size=32, intermediate_size=64), train)
    assert result.steps == 60 and [c[0] for c in result.curve] == [20, 40, 60] and result.error is None
    first, last = result.curve[0][2], result.curve[-1][2]
    assert last < first - 0.3, (first, last)  # from ~ln(16) for the value half of the vocabulary
    assert 0.0 <= result.accuracy <= 1.0 and result.params > 0 and result.seconds > 0


def test_time_limit_stops_early():
    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    train = MQARTrain(steps=10_000, batch_size=4, eval_every=10_000, eval_examples=8, time_limit_s=0.2)
    result = train_mqar(SOFTMAX, lambda m: m, task, MQARModel(hidden_size=16, intermediate_size=16), train)
    assert 0 < result.steps < 10_000 and result.curve[-1][0] == result.steps


def test_divergence_is_reported_with_its_step():
    class Blow(torch.nn.Module):  # a model whose logits get a NaN at the 4th call
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, input_ids, use_cache=False):  # NaN at one position that is never scored (the first)
            self.calls += 1
            logits = self.model(input_ids=input_ids).logits.clone()
            if self.calls == 4:
                logits[0, 0, 0] = math.nan
            return SimpleNamespace(logits=logits)

    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    train = MQARTrain(steps=10, batch_size=4, eval_every=2, eval_examples=4)
    result = train_mqar("blow", Blow, task, MQARModel(hidden_size=16, intermediate_size=16), train)
    # calls: steps 0, 1, evaluation after step 2 (one batch), then step 2 fails
    assert result.accuracy is None and result.steps == 2 and "FloatingPointError at step 2" in result.error
    assert [c[0] for c in result.curve] == [2]


def test_every_row_converts_and_runs():
    task = MQARTask()
    inputs, labels = mqar_batch(task, 2, torch.Generator().manual_seed(0))
    rows = converters()
    assert next(iter(rows)) == SOFTMAX
    for label, convert in rows.items():
        model = convert(build_model(task, MQARModel()))
        converted = getattr(model.config, "vzoo_conversion", None)
        assert (label == SOFTMAX) == (not converted), label  # every other row swapped its attention layers
        logits = model(input_ids=inputs).logits
        assert logits.shape == (2, task.seq_len, task.vocab_size) and torch.isfinite(logits).all(), label


def test_rows_keep_errors_and_write(tmp_path):
    def broken(model):
        raise RuntimeError("no such layer")

    rows = mqar_rows(True, {"broken": broken})
    assert rows[0]["accuracy"] is None and "no such layer" in rows[0]["error"] and rows[0]["quick"] is True
    good = {"label": "ok", "accuracy": 0.5, "steps": 10, "seconds": 1.0, "params": 5, "curve": [(10, 0.5, 1.0)],
            "error": None}
    diverged = {**good, "label": "nan", "accuracy": None, "steps": 13, "error": "FloatingPointError at step 13"}
    table = format_table([good, rows[0], diverged], "title")
    assert "| ok | 0.500 | 10 |" in table and "no such layer" in table
    assert "step 13; last held-out accuracy 0.500 at step 10" in table
    assert "Setting (quick: too few steps to converge): vocab 128" in format_table(rows)
    json.dumps(rows)
    plot_curves([good, rows[0], diverged], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
