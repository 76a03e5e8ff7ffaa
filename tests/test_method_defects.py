"""Four method defects, each pinned by tests that failed before the fix:

1. BitFit's subset is the query bias and the middle-of-MLP bias (BERT's `intermediate.dense`,
   hidden -> 4 x hidden), not the MLP output bias.
2. GPT-2-style models: transformers' Conv1D (weight stored in x out) is a linear layer for target
   finding, shapes, the low-rank folds and every method that sizes its update from a target.
3. `train.mixed_precision: bf16` (and fp16) with LoRA dropout on CPU: the low-rank path's custom
   backward met bf16 gradients against fp32 tensors and crashed.
4. `mixed_precision: no` unquoted in YAML is the boolean False: it means "no"; true is refused.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import load_recipe, validate_delta
from tests.helpers import assert_one_clean_line, run_cli, write_recipe

sys.path.insert(0, str(Path(__file__).parent / "deltas"))
from delta_testkit import forward, load_arch, make_batch, perturb  # noqa: E402


def build(**options):
    return deltas.build(validate_delta(options))


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_arch("gpt2", tiny_gpt2)


# -- 1. BitFit's subset --------------------------------------------------------------------------


def _block_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".bias") and ".encoder.layer." in n}


def test_bitfit_subset_is_query_and_intermediate_bias_of_every_block(bert):
    model = bert.fresh()
    delta = build(method="bitfit", subset=True)
    delta.attach(model, head=bert.head)
    layers = model.config.num_hidden_layers
    expected = {f"bert.encoder.layer.{i}.{m}.bias" for i in range(layers)
                for m in ("attention.self.query", "intermediate.dense")}
    assert set(delta.delta_parameters()) == expected
    # The intermediate bias is the 4 x hidden one (hidden -> intermediate), the MLP output's is hidden-wide.
    assert model.bert.encoder.layer[0].intermediate.dense.bias.numel() == model.config.intermediate_size
    h, i = model.config.hidden_size, model.config.intermediate_size
    block = sum(p.numel() for p in _block_biases(model).values())
    # q, k, v, attention output, MLP output and 2 LayerNorms are hidden-wide, plus the intermediate
    assert block == layers * (7 * h + i)
    subset = sum(p.numel() for p in delta.delta_parameters().values())
    assert subset == layers * (h + i) == delta.expected_trainable_params(bert.fresh())
    assert subset / block == pytest.approx((h + i) / (7 * h + i))


def test_bitfit_subset_share_on_bert_base_shapes_is_about_half():
    """The paper's 768/3072 shapes: the subset is ~45% of the block biases (it was 18%)."""
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=1))
    subset = build(method="bitfit", subset=True).expected_trainable_params(model)
    block = sum(p.numel() for p in _block_biases(model).values())
    assert subset == 768 + 3072
    assert 0.4 < subset / block < 0.5


# -- 2. GPT-2's Conv1D ---------------------------------------------------------------------------


def test_conv1d_shapes_and_targets(gpt2):
    from deltafit.deltas._targets import dense_weight, find_targets, shape

    model = gpt2.fresh()
    c_attn = model.transformer.h[0].attn.c_attn  # Conv1D(nf=3 x 32, nx=32): weight 32 x 96
    assert tuple(c_attn.weight.shape) == (32, 96)
    assert shape(c_attn) == (96, 32)
    assert tuple(dense_weight(c_attn).shape) == (96, 32)
    assert set(find_targets(model, None)) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    every = find_targets(model, "all-linear")
    assert {n.split(".", 3)[-1] for n in every} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert "lm_head" not in every


@pytest.mark.parametrize("method, options", [
    ("lora", {"r": 4, "alpha": 8}), ("lora-fa", {"r": 4}), ("vera", {"r": 8}),
    ("adalora", {"init_r": 4, "target_r": 2}), ("aflora", {"r": 2}), ("lamda", {"r": 4}), ("lamda-pp", {"r": 4}),
    ("said", {"dimension": 64}),
])
def test_default_targets_on_gpt2_attach_count_and_merge(gpt2, method, options):
    """Default targets (c_attn) attach; the update is sized out x in (96 x 32), counted as the
    formula says, and merges into the transposed weight exactly."""
    model, delta = gpt2.fresh(), build(method=method, **options)
    expected = delta.expected_trainable_params(model)
    delta.attach(model)
    assert sum(p.numel() for p in delta.delta_parameters().values()) == expected
    perturb(delta)
    batch = make_batch("gpt2")
    unmerged = forward(model, delta, batch)
    assert not torch.allclose(unmerged, forward(gpt2.pristine, None, batch))
    for _, _, update in delta.insertions.hosts.values():
        if hasattr(update, "delta_weight"):
            assert tuple(update.delta_weight().shape) == (96, 32)
    delta.merge()
    assert (forward(model, None, batch) - unmerged).abs().max().item() <= 1e-5


def test_lora_fold_into_conv1d_is_the_transposed_update(gpt2):
    from deltafit.deltas._lowrank import LowRankUpdate, fold_into

    host = copy.deepcopy(gpt2.pristine.transformer.h[0].attn.c_attn)
    update = LowRankUpdate(32, 96, 4, 2.0, 0.0)
    nn.init.normal_(update.B)
    before = host.weight.detach().clone()
    update.fold(host)
    assert torch.allclose(host.weight, before + update.delta_weight().t(), atol=1e-6)
    fold_into(host, -update.delta_weight())  # the generic path, same orientation
    assert torch.allclose(host.weight, before, atol=1e-6)


def test_adapter_has_default_positions_on_gpt2(gpt2):
    delta = build(method="adapter", bottleneck=4)
    delta.attach(gpt2.fresh())
    assert {n.split(".", 3)[-1] for n in delta.describe_targets()} == {"attn.c_proj.adapter", "mlp.c_proj.adapter"}


def test_qlora_refuses_conv1d_targets_with_a_user_error(gpt2):
    with pytest.raises(UserError, match="delta.target_modules.*Conv1D"):
        build(method="qlora", r=4).attach(gpt2.fresh())


def test_cli_trains_and_merges_lora_on_gpt2_with_default_targets(tmp_path, tiny_gpt2, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_gpt2, {"train": str(alpaca_file), "format": "alpaca",
                                                           "max_length": 128}, train={"max_steps": 2})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", tmp_path / "run", "--output", tmp_path / "merged")
    assert code == 0, err


# -- 3. bf16/fp16 autocast with dropout ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_dropout_path_under_autocast_matches_torch(dtype):
    """The custom backward gives torch's own gradients for dropout(x) @ A^T under autocast."""
    from deltafit.deltas._lowrank import LowRankUpdate

    update = LowRankUpdate(16, 8, 4, 2.0, 0.1)
    nn.init.normal_(update.B)
    update.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(1)
        out = update(x)
    out.float().sum().backward()
    grad_a, grad_x = update.A.grad.clone(), x.grad.clone()
    update.A.grad = x.grad = None
    with torch.autocast("cpu", dtype=dtype):  # the same noise, drawn as torch's CPU dropout draws it
        torch.manual_seed(1)
        noise = torch.empty_like(x).bernoulli_(0.9).div_(0.9)
        reference = ((x * noise) @ update.A.t()) @ update.B.t() * update.scale
    reference.float().sum().backward()
    assert out.dtype == dtype and torch.equal(out, reference)
    assert grad_a.dtype == torch.float32 and torch.equal(grad_a, update.A.grad)
    assert torch.equal(grad_x, x.grad)


def test_cli_trains_lora_with_dropout_under_bf16(tmp_path, tiny_llama, alpaca_file, capsys):
    """The reported crash. (fp16 is not tested through the CLI: Accelerate runs fp16 without autocast
    on CPU; the contract suite runs both precisions under torch.autocast directly.)"""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca",
                                                            "max_length": 128},
                          delta={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                          train={"max_steps": 2, "mixed_precision": "bf16"})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    assert "Traceback" not in err


# -- 4. mixed_precision: no ------------------------------------------------------------------------

BASE = "model: {name: some/model}\ndata: {train: rows.json}\n"


@pytest.mark.parametrize("written", ["no", "false", "off", "No", "'no'", "bf16", "fp16", "auto"])
def test_mixed_precision_accepts_yaml_booleans_for_no(tmp_path, written):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + f"train:\n  mixed_precision: {written}\n")
    expected = written.strip("'") if written.strip("'") in ("bf16", "fp16", "auto") else "no"
    assert load_recipe(path).train.mixed_precision == expected


def test_mixed_precision_no_through_set_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE)
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("written", ["true", "yes", "on"])
def test_mixed_precision_true_is_refused_naming_the_choices(tmp_path, capsys, written):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + f"train:\n  mixed_precision: {written}\n")
    code, _, err = run_cli(capsys, "validate", path)
    assert_one_clean_line(code, err, "train.mixed_precision", "'auto'", "'no'", "'bf16'", "'fp16'")
