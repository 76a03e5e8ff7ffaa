"""The benchmark script on tiny models, and the chunked causal-LM loss it motivated.

Tolerances for chunked vs plain loss (fp32 on CPU): the loss agrees to a relative 1e-5 and every
gradient to 1e-6 absolute + 1e-4 relative. The two differ only in summation order (per-chunk sums
of the same per-token losses), so anything larger is a real bug: a shifted label, a lost token,
a skipped hook.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltafit.loss as loss_module
from deltafit.allocator import find_library, huge_pages_env
from deltafit.loss import causal_lm_loss, chunked_cross_entropy, supports_chunked_loss

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL, GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-6, 1e-4


# ----------------------------------------------------------------------------------------------
# scripts/bench.py --quick on tiny models


def test_quick_bench_runs_both_systems_and_writes_tables(tmp_path, tiny_llama, alpaca_file):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nrest\n")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--workloads", "smollm2-qv", "--steps", "2",
         "--packing", "off", "--llm-model", str(tiny_llama), "--llm-data", str(alpaca_file),
         "--out", str(out), "--readme", str(readme)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["system"]: r for r in results["runs"]}
    fallback = runs.pop("deltafit-system-malloc", None)  # run when tcmalloc is there, to show a user without it
    assert set(runs) == {"deltafit", "reference"}
    assert runs["reference"]["malloc"] == "system malloc"  # as its users run it: nothing of deltafit's
    assert (fallback is not None) == (find_library() is not None)
    # without tcmalloc: the C library's malloc, with deltafit's huge pages where Linux offers them
    plain = "system malloc" if huge_pages_env({}) is None else "system malloc + huge pages"
    if fallback is None:
        assert runs["deltafit"]["malloc"] == plain
    else:  # the allocator decides where memory comes from, never a computed value
        assert fallback["malloc"] == plain and runs["deltafit"]["malloc"].startswith("tcmalloc")
        assert fallback["final_loss"] == runs["deltafit"]["final_loss"]
    for run in runs.values():
        assert run["steps"] == 2 and run["real_tokens_per_s"] > 0 and run["peak_rss_gb"] > 0
        assert 0 < run["real_fraction"] <= 1 and math.isfinite(run["final_loss"])
    # Same model, same LoRA, same batches: same trainable count, and after two small steps from the
    # same starting loss the losses can only differ by the LoRA A init (B starts at zero on both).
    assert runs["deltafit"]["trainable_params"] == runs["reference"]["trainable_params"] == 1792
    assert abs(runs["deltafit"]["final_loss"] - runs["reference"]["final_loss"]) < 1e-2
    assert runs["deltafit"]["real_tokens_per_s"] / runs["deltafit"]["padded_tokens_per_s"] == \
        pytest.approx(runs["reference"]["real_tokens_per_s"] / runs["reference"]["padded_tokens_per_s"])
    metrics = {r["metric"] for r in results["summary"]["ratios"]}
    assert {"real_tokens_per_s", "peak_rss_gb", "s_per_step"} <= metrics
    # The distance to the limit: a measured matmul peak per precision, and each run's share of it.
    # Same model and same batches: the same FLOPs per step on both sides (the base's linear layers
    # dominate; the adapters' own FLOPs differ only by how each side builds them), so GFLOP/s
    # and tokens/s move together.
    peaks = results["meta"]["peak_gflops"]
    assert set(peaks) == {"float32", "bfloat16"} and all(v > 0 for v in peaks.values())
    start, end = results["meta"]["peak_gflops_at_start"], results["meta"]["peak_gflops_at_end"]
    assert all(peaks[k] == max(start[k], end[k]) for k in peaks)  # the better of two measurements
    for run in runs.values():
        assert run["gflops"] > 0 and run["peak_share"] == pytest.approx(run["gflops"] / peaks["float32"])
    flops_per_token = [run["gflops"] / run["padded_tokens_per_s"] for run in runs.values()]
    assert flops_per_token[0] == pytest.approx(flops_per_token[1], rel=0.05)
    text = readme.read_text()
    assert "Matmul peak measured" in text and "% of peak" in text
    assert text.startswith("intro\n<!-- bench:begin -->\n") and text.endswith("<!-- bench:end -->\nrest\n")
    assert "old table" not in text and "| smollm2-qv | reference |" in text
    assert (out / "results.md").read_text() in text


def test_plan_runs_each_workload_in_each_precision_and_qlora_alone(tmp_path, alpaca_file):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import parse_args, plan

    args = parse_args(["--workloads", "smollm2-qv,qlora-qv", "--precisions", "fp32,bf16", "--packing", "off",
                       "--llm-data", str(alpaca_file), "--cls-data", str(alpaca_file)])
    args.fallback = False
    groups = {group[0].label: group for group in plan(args)}
    assert set(groups) == {"smollm2-qv", "smollm2-qv bf16", "qlora-qv", "qlora-qv bf16"}
    assert [(j.system, j.precision) for j in groups["smollm2-qv bf16"]] == [("deltafit", "bf16"), ("reference", "bf16")]
    args.fallback = True  # what parse_args sets where tcmalloc is found: one more run, on the C library's malloc
    first = plan(args)[0]
    assert (first[-1].system, first[-1].preload, first[-1].sets) == ("deltafit-system-malloc", False, first[0].sets)
    assert [j.system for j in groups["qlora-qv"]] == ["deltafit"] and "delta.method=qlora" in groups["qlora-qv"][0].sets
    with pytest.raises(SystemExit):
        parse_args(["--precisions", "fp16", "--llm-data", str(alpaca_file), "--cls-data", str(alpaca_file)])


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.count("\n") == 1 and "no CUDA GPU" in proc.stdout


def test_model_flops_per_token_counts_linear_layers_and_attention():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import model_flops_per_token

    model = _tiny_causal_lm()
    for p in model.parameters():
        p.requires_grad_(False)
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 3 * 4 * 2 * 16 * 32  # 3 x (fwd score + value products) x layers x length x width
    assert model_flops_per_token(model, 16) == 4 * linear + attention
    model.lm_head.weight.requires_grad_(True)  # a trained weight adds its gradient's 2 W
    assert model_flops_per_token(model, 16) == 4 * linear + 2 * 300 * 32 + attention


# ----------------------------------------------------------------------------------------------
# Chunked causal-LM loss


def _tiny_causal_lm(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**base, **config}))


def _batch(rows=3, length=19):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (rows, length))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _attach(model, method="lora", **options):
    from deltafit import deltas
    from deltafit.recipe import validate_delta

    delta = deltas.build(validate_delta({"method": method, **options}))
    delta.attach(model, head=[])
    return delta


def _loss_and_grads(model, delta, batch, chunked):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks on both paths
    inputs = delta.prepare_inputs(dict(batch)) if delta is not None else dict(batch)
    loss = causal_lm_loss(model, inputs) if chunked else model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, delta, batch):
    plain, plain_grads = _loss_and_grads(model, delta, batch, chunked=False)
    chunked, chunked_grads = _loss_and_grads(model, delta, batch, chunked=True)
    assert torch.isfinite(plain)
    torch.testing.assert_close(chunked, plain, rtol=LOSS_RTOL, atol=0)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of 7 tokens, so every batch here spans several."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 300 * 7)
    return 7


def test_chunked_loss_matches_plain_loss_and_grads_with_lora_dropout(small_chunks):
    model = _tiny_causal_lm()
    delta = _attach(model, target_modules=["q_proj", "v_proj"], r=4, dropout=0.1)
    for insertion in delta.trainable_parameters().values():
        torch.nn.init.normal_(insertion, std=0.1)
    model.train()
    _assert_same(model, delta, _batch())


def test_chunked_loss_matches_plain_loss_and_grads_with_lora_on_lm_head(small_chunks):
    # No dropout here: a dropout on lm_head's own LoRA draws its masks per chunk, so they differ from
    # the plain path's (same distribution; each chunk's recompute in backward reuses its own mask).
    model = _tiny_causal_lm()
    delta = _attach(model, target_modules=["q_proj", "v_proj", "lm_head"], r=4)
    for insertion in delta.trainable_parameters().values():  # B != 0, so lm_head's LoRA changes the logits
        torch.nn.init.normal_(insertion, std=0.1)
    model.train()
    _assert_same(model, delta, _batch())


def test_chunked_loss_projects_only_counted_tokens_a_chunk_at_a_time(small_chunks):
    model = _tiny_causal_lm()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    batch = _batch()
    loss = causal_lm_loss(model, batch)
    loss.backward()
    counted = int((batch["labels"][:, 1:] != -100).sum())
    forward_calls = seen[: math.ceil(counted / small_chunks) + 1]  # the first call is the empty logits_to_keep one
    assert forward_calls[0] == 0 and max(seen) <= small_chunks
    assert sum(forward_calls) == counted
    assert sum(seen) == 2 * counted  # backward recomputes each chunk once: the logits were not kept


def test_chunked_loss_accepts_prepare_inputs_kwargs_of_prefix_and_prompt(small_chunks):
    for method, options in (("prefix", {"num_virtual_tokens": 3}),
                            ("prompt", {"num_virtual_tokens": 3, "init": "random"})):
        model = _tiny_causal_lm()
        delta = _attach(model, method, **options)
        model.train()
        _assert_same(model, delta, _batch())


def test_chunked_loss_on_packed_rows(small_chunks):
    model = _tiny_causal_lm()
    delta = _attach(model, target_modules=["q_proj", "v_proj"])
    batch = _batch(rows=2, length=16)
    batch.pop("attention_mask")
    batch["position_ids"] = torch.tensor([list(range(9)) + list(range(7)), list(range(16))])
    _assert_same(model, delta, batch)


def test_eval_mode_and_no_counted_token_match_transformers(small_chunks):
    model = _tiny_causal_lm().eval()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, rtol=LOSS_RTOL, atol=0)
        batch["labels"][:] = -100
        assert math.isnan(float(causal_lm_loss(model, batch))) and math.isnan(float(model(**batch).loss))


def test_models_that_change_logits_after_the_head_keep_the_plain_loss():
    capped = _tiny_causal_lm(final_logit_softcapping=3.0)
    assert not supports_chunked_loss(capped)
    assert supports_chunked_loss(_tiny_causal_lm())
    batch = _batch()
    torch.testing.assert_close(causal_lm_loss(capped, batch), capped(**batch).loss, rtol=0, atol=0)


def test_classifiers_keep_their_own_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4)).eval()
    batch = {"input_ids": torch.randint(0, 100, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    assert not supports_chunked_loss(model)
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, rtol=0, atol=0)


def test_chunked_cross_entropy_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="do not line up"):
        chunked_cross_entropy(torch.nn.Linear(4, 10), torch.zeros(2, 5, 4), torch.zeros(2, 6, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# LoRA's lean dropout: torch's values, draws and gradients, a bool mask kept for backward


def _lora_path(lean: bool, seed: int = 3):
    from deltafit.deltas._lowrank import LowRankUpdate

    torch.manual_seed(0)
    update = LowRankUpdate(16, 12, r=4, scale=2.0, dropout=0.3)
    torch.nn.init.normal_(update.B)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(seed)
    if lean:
        y = update(x)
    else:  # the plain composition the lean path replaces
        y = (update.dropout(x) @ update.A.t()) @ update.B.t() * update.scale
    y.pow(2).sum().backward()
    return y.detach(), x.grad, update.A.grad, update.B.grad, torch.rand(1)


def test_lean_dropout_is_bit_identical_to_torch_dropout():
    lean, plain = _lora_path(lean=True), _lora_path(lean=False)
    for a, b in zip(lean, plain):  # outputs, all gradients and the RNG state after it
        assert torch.equal(a, b)
    assert not torch.equal(_lora_path(lean=True)[0], _lora_path(lean=True, seed=4)[0])  # dropout did act


def test_lean_dropout_keeps_a_bool_mask_not_the_float_noise():
    from deltafit.deltas._lowrank import LowRankUpdate

    saved = []
    update = LowRankUpdate(32, 8, r=4, scale=2.0, dropout=0.5).train()
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        update(x).sum().backward()
    # The dropout's own trace is a bool mask: no float noise and no dropped-out copy of x is kept.
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.float32, torch.bool]
    assert any(t is x for t in saved)
    update.eval()  # eval: dropout is the identity
    assert torch.equal(update(x), (x @ update.A.t()) @ update.B.t() * update.scale)
