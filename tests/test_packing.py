"""Packing: several examples per row, no attention across example boundaries, positions restarting
per example, and exactly the same targets (so the same per-example losses) as unpacked.

Tolerance: the tiny Llama runs in fp32; packed and unpacked forwards differ only in summation order
(different sequence lengths and masks), so logits, losses and gradients agree to 1e-5 (absolute).
"""

from __future__ import annotations

import json

import pytest
import torch

from deltafit.data import (
    IGNORE_INDEX,
    batch_tokens,
    example_lengths,
    make_collator,
    pack_examples,
    prepare_data,
    resolve_packing,
    use_packed_attention,
)
from deltafit.errors import UserError
from deltafit.recipe import DataSpec
from tests.helpers import run_cli, write_recipe

TOL = 1e-5
PAIRS = [("the cat", " sat on the mat"), ("hello", " world"), ("What is the capital of France?", " Paris."),
         ("add 2 and 3", " 5"), ("a great movie", " with a fine cast"), ("0 1 2", " 3 4 5 6 7 8 9"),
         ("deltafit trains", " small deltas of big models"), ("terrible", " , boring and far too long")]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    use_packed_attention(model)
    return model.eval()


@pytest.fixture()
def completion_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "text": t}) for p, t in PAIRS))
    return path


def prepared(tok, path, packing, **spec):
    spec = DataSpec(train=str(path), format="completion", prompt_column="prompt", max_length=64,
                    packing=packing, cache=False, **spec)
    return prepare_data(spec, tok, "causal-lm", seed=0, batch_size=4)


def segments(row):
    """(start, end) of each example inside a packed row."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts, starts[1:]))


def per_token_losses(logits, labels):
    """Cross-entropy of every next-token target (NaN-free: -100 targets get 0 and are not counted)."""
    targets = labels[..., 1:]
    losses = torch.nn.functional.cross_entropy(logits[..., :-1, :].transpose(1, 2), targets.clamp(min=0),
                                               reduction="none")
    return losses * (targets != IGNORE_INDEX), (targets != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# Rows: layout, positions and labels


def test_rows_hold_several_examples_with_restarting_positions(tok, completion_file):
    packed, single = prepared(tok, completion_file, True), prepared(tok, completion_file, False)
    assert len(packed.train) < len(single.train) == len(PAIRS)
    assert packed.stats["train_examples"] == len(PAIRS) and packed.stats["train_packed_rows"] == len(packed.train)
    found = []
    for row in packed.train:
        assert len(row["input_ids"]) <= 64 and "attention_mask" not in row
        for start, end in segments(row):
            assert row["position_ids"][start:end] == list(range(end - start))
            found.append(row["input_ids"][start:end])
    # Every example exactly once, token for token.
    assert sorted(found) == sorted(ex["input_ids"] for ex in single.train)


# train_on_inputs: every token is a target, so an example's first token would be one if not masked.
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_labels_never_cross_an_example_boundary(tok, completion_file, train_on_inputs):
    packed = prepared(tok, completion_file, True, train_on_inputs=train_on_inputs)
    single = prepared(tok, completion_file, False, train_on_inputs=train_on_inputs)
    by_ids = {tuple(ex["input_ids"]): ex["labels"] for ex in single.train}
    for row in packed.train:
        for start, end in segments(row):
            # The first token of each example is never a target (it would be predicted from the
            # previous example's last token); the rest are exactly the unpacked labels.
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1:end] == by_ids[tuple(row["input_ids"][start:end])][1:]
    # Same number of next-token targets as unpacked (position 0 is never one there either).
    count = lambda rows: sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    assert count(packed.train) == count(single.train) > 0


def test_best_fit_packing_respects_capacity_and_keeps_every_example():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([7, 3, 5, 2, 8, 1, 4, 6, 2, 9])]
    rows = pack_examples(examples, capacity=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert len(rows) == 5  # 47 tokens in rows of 10: 5 is the fewest possible
    assert sorted(example_lengths(rows)) == sorted(len(ex["input_ids"]) for ex in examples)
    assert rows == pack_examples(examples, capacity=10)  # deterministic


# ----------------------------------------------------------------------------------------------
# The model: per-example attention, logits, losses and gradients


def test_packed_batch_gives_each_example_its_own_logits_and_loss(tok, model, completion_file):
    packed, single = prepared(tok, completion_file, True), prepared(tok, completion_file, False)
    batch = make_collator(tok.pad_token_id, "causal-lm")(packed.train)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**batch).logits
    alone = {tuple(ex["input_ids"]): ex for ex in single.train}
    checked = 0
    for r, row in enumerate(packed.train):
        for start, end in segments(row):
            ex = alone[tuple(row["input_ids"][start:end])]
            with torch.no_grad():
                own = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert (logits[r, start:end] - own).abs().max() <= TOL
            mine, counted = per_token_losses(logits[r:r + 1, start:end], batch["labels"][r:r + 1, start:end])
            ref, ref_counted = per_token_losses(own[None], torch.tensor([ex["labels"]]))
            assert counted.sum() == ref_counted.sum()
            assert abs(float(mine.sum() / counted.sum()) - float(ref.sum() / ref_counted.sum())) <= TOL
            checked += 1
    assert checked == len(PAIRS)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_and_unpacked_batches_have_the_same_mean_loss_and_gradient(tok, tiny_llama, completion_file,
                                                                         train_on_inputs):
    from transformers import AutoModelForCausalLM

    from deltafit.loss import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    use_packed_attention(model)
    collate = make_collator(tok.pad_token_id, "causal-lm")
    packed = collate(prepared(tok, completion_file, True, train_on_inputs=train_on_inputs).train)
    unpacked = collate(prepared(tok, completion_file, False, train_on_inputs=train_on_inputs).train)
    results = []
    for batch in (packed, unpacked):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        with torch.no_grad():
            chunked = causal_lm_loss(model, batch)  # the trainer's loss path
        results.append((float(loss.detach()), float(chunked), grads))
    (packed_loss, packed_chunked, packed_grads), (loss, chunked, grads) = results
    assert abs(packed_loss - loss) <= TOL and abs(packed_chunked - chunked) <= TOL
    assert (packed_grads - grads).abs().max() <= TOL and grads.abs().max() > 0


def test_without_the_packed_inputs_examples_would_leak(tok, tiny_llama, completion_file):
    """The guard's reason: with a cache or an attention mask, transformers ignores the restarts."""
    from transformers import AutoModelForCausalLM

    leaky = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    batch = make_collator(tok.pad_token_id, "causal-lm")(prepared(tok, completion_file, True).train)
    row = next(r for r in range(batch["input_ids"].shape[0]) if len(segments(_row(batch, r))) > 1)
    start, end = segments(_row(batch, row))[1]
    with torch.no_grad():
        cached = leaky(**batch).logits[row, start:end]  # use_cache defaults to True in the config
        own = leaky(input_ids=batch["input_ids"][row:row + 1, start:end]).logits[0]
    assert (cached - own).abs().max() > 1e-3


def _row(batch, r):
    positions = batch["position_ids"][r].tolist()
    n = len(positions) - next(i for i, p in enumerate(reversed(positions)) if p != 0)
    return {"position_ids": positions[:n]}


def test_a_model_that_ignores_positions_is_refused(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    drop = lambda module, args, kwargs: (args, {k: v for k, v in kwargs.items() if k != "position_ids"})
    model.register_forward_pre_hook(drop, with_kwargs=True)
    with pytest.raises(UserError, match=r"data\.packing.*attend.*set data\.packing: false"):
        use_packed_attention(model)


# ----------------------------------------------------------------------------------------------
# Collation and stats


def test_collator_pads_packed_rows_and_counts_real_tokens(tok, completion_file):
    rows = prepared(tok, completion_file, True).train
    batch = make_collator(7, "causal-lm")(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (len(rows), width)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][i, :n].tolist() == row["position_ids"]
        assert (batch["position_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == 7).all()
    assert batch_tokens(batch) == sum(len(r["input_ids"]) for r in rows) < batch["input_ids"].numel()
    unpacked = make_collator(7, "causal-lm")(prepared(tok, completion_file, False).train)
    assert batch_tokens(unpacked) == batch_tokens(batch)


def test_stats_report_rows_and_padding_before_and_after(tok, completion_file):
    stats = prepared(tok, completion_file, True).stats
    assert stats["train_packed_rows"] < stats["train_examples"] == len(PAIRS)
    assert 0 <= stats["train_padding"] < stats["train_padding_unpacked"] < 1
    off = prepared(tok, completion_file, False).stats
    assert off["train_padding"] == stats["train_padding_unpacked"] and "train_packed_rows" not in off


# ----------------------------------------------------------------------------------------------
# Defaults and refusals


def test_packing_is_the_causal_lm_default_and_refused_where_it_cannot_work():
    from deltafit import deltas

    auto = DataSpec(train="x.json")
    on, off = DataSpec(train="x.json", packing=True), DataSpec(train="x.json", packing=False)
    assert resolve_packing(auto, "causal-lm", deltas.get("lora")) is None  # decided on the data, below
    assert resolve_packing(on, "causal-lm", deltas.get("lora")) is True
    assert resolve_packing(auto, "seq-cls") is False  # classification recipes need not say anything
    assert resolve_packing(off, "causal-lm", deltas.get("lora")) is False
    with pytest.raises(UserError, match=r"data\.packing.*classification"):
        resolve_packing(on, "seq-cls")
    for method in ("prefix", "prompt"):
        cls = deltas.get(method)
        assert cls.supports_packing is False and resolve_packing(auto, "causal-lm", cls) is False
        with pytest.raises(UserError, match=rf"data\.packing.*'{method}' cannot train on packed rows"):
            resolve_packing(on, "causal-lm", cls)


def test_by_default_rows_are_packed_where_that_saves_compute(tok, completion_file, tmp_path):
    spec = dict(format="completion", prompt_column="prompt", max_length=64, cache=False)
    varied = prepare_data(DataSpec(train=str(completion_file), **spec), tok, "causal-lm", 0, batch_size=4)
    assert varied.packed and varied.stats["train_padding"] < varied.stats["train_padding_unpacked"]
    # Examples of about the same length, each over half of max_length: no two share a row, and
    # packing would save nothing, so the default leaves them unpacked (and says why in the stats).
    same = tmp_path / "same.jsonl"
    rows = ({"prompt": "the cat", "text": " sat on the mat" * (3 + i % 2)} for i in range(8))
    same.write_text("\n".join(json.dumps(row) for row in rows))
    lengths = [len(ex["input_ids"]) for ex in prepared(tok, same, False).train]
    spec["max_length"] = int(1.6 * min(lengths))
    assert 2 * min(lengths) > spec["max_length"] >= max(lengths)
    similar = prepare_data(DataSpec(train=str(same), **spec), tok, "causal-lm", 0, batch_size=4)
    assert not similar.packed and len(similar.train) == 8
    assert similar.stats["train_padding_if_packed"] >= similar.stats["train_padding"]
    forced = prepare_data(DataSpec(train=str(same), packing=True, **spec), tok, "causal-lm", 0, batch_size=4)
    assert forced.packed  # data.packing: true always packs


def test_eval_data_is_never_packed(tok, completion_file):
    data = prepare_data(DataSpec(train=str(completion_file), eval=str(completion_file), format="completion",
                                 prompt_column="prompt", max_length=64, cache=False), tok, "causal-lm", 0)
    assert all("position_ids" in row for row in data.train) and len(data.train) < len(PAIRS)
    assert len(data.eval) == len(PAIRS) and all("position_ids" not in ex for ex in data.eval)


def test_train_packs_by_default_and_validate_shows_it(tmp_path, tiny_llama, completion_file, capsys):
    data = {"train": str(completion_file), "eval": str(completion_file), "format": "completion",
            "prompt_column": "prompt", "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, train={"max_steps": 2})
    code, out, _ = run_cli(capsys, "validate", recipe)
    assert code == 0 and "packing=auto" in out
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "packed")
    assert code == 0, err
    assert f"packing: {len(PAIRS)} examples -> " in err
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "unpacked", "--set", "data.packing=false")
    assert code == 0, err
    assert f"packing: off, {len(PAIRS)} examples" in err
    evals = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("packed", "unpacked")]
    # Evaluation is per example in both runs: the same target tokens are scored.
    tokens = [next(r["eval_tokens"] for r in records if "eval_tokens" in r) for records in evals]
    assert tokens[0] == tokens[1] > 0


def test_prefix_trains_unpacked_by_default_and_refuses_explicit_packing(tmp_path, tiny_llama, completion_file, capsys):
    data = {"train": str(completion_file), "format": "completion", "prompt_column": "prompt", "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, delta={"method": "prefix", "num_virtual_tokens": 2,
                                                                       "hidden": 8}, train={"max_steps": 1})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    assert "packing: off" in err
    code, out, err = run_cli(capsys, "validate", recipe, "--set", "data.packing=true")
    assert code == 2 and "data.packing" in err and "'prefix'" in err and "Traceback" not in err
