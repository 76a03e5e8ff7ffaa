"""Compositions from the CLI: `delta:` as a list trains, saves namespaced tensors with every delta's
config, resumes after SIGKILL bit for bit (AdaLoRA's rank schedule beside a prefix), evaluates from the
checkpoint path alone, merges where every delta can, and every mistake is one line (exit 2) naming
the delta and the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltafit import deltas
from deltafit.recipe import TrainSpec, load_recipe, validate_delta
from tests.helpers import assert_one_clean_line, run_cli, write_recipe
from tests.test_resume import assert_bitwise_equal, final_tensors, finish, kill_and_resume, start

LORA_IA3 = [{"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            {"method": "ia3", "lr": 3e-2}]
STEPS = 12
# Two schedules whose state must survive the kill: AdaLoRA's rank allocation (importance averages,
# masks) and LISA's sampled blocks (its own generator); the prefix adds cache tokens at its own rate.
SCHEDULED = [{"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2},
             {"method": "lisa", "gamma": 1, "interval": 2},
             {"method": "prefix", "num_virtual_tokens": 3, "hidden": 16, "lr": 2e-2}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("compose-data") / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(24)]))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, data):
    """LoRA + IA3 (its own lr), 4 steps with eval data; the CLI's train output and run directory."""
    root = tmp_path_factory.mktemp("compose")
    recipe = write_recipe(root / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca", "eval_fraction": 0.25},
                          delta=LORA_IA3)
    with pytest.MonkeyPatch.context() as mp:
        capture = _Capture()
        mp.setattr("sys.stdout", capture)
        code = _main("train", recipe, "--output", root / "run")
    assert code == 0
    return root


class _Capture:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def _main(*argv) -> int:
    from deltafit.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def test_checkpoint_namespaces_tensors_and_records_every_delta(trained):
    final = trained / "run" / "final"
    tensors = load_file(str(final / "delta.safetensors"))
    assert {k.split(".", 1)[0] for k in tensors} == {"lora", "ia3"}
    meta = json.loads((final / "deltafit.json").read_text())
    assert meta["method"] == "compose"
    assert [d["method"] for d in meta["delta_config"]["deltas"]] == ["lora", "ia3"]
    assert meta["delta_config"]["deltas"][1]["lr"] == 3e-2
    written = yaml.safe_load((final / "recipe.yaml").read_text())
    assert isinstance(written["delta"], list) and written["delta"][0]["r"] == 4  # the list the user wrote
    trained_b = [t for k, t in tensors.items() if k.startswith("lora.") and k.endswith(".B")]
    assert trained_b and max(float(t.abs().max()) for t in trained_b) > 0  # LoRA trained
    scales = [t for k, t in tensors.items() if k.startswith("ia3.")]
    assert any(not torch.equal(t, torch.ones_like(t)) for t in scales)  # and so did IA3


def test_eval_needs_only_the_path_and_reproduces_the_final_eval(trained, capsys):
    code, out, err = run_cli(capsys, "eval", trained / "run" / "final")
    assert code == 0, err
    result = json.loads((trained / "run" / "final-eval.json").read_text())
    logged = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]
    assert result["loss"] == pytest.approx(final_eval, rel=1e-5)


def test_merge_folds_every_delta(trained, capsys):
    code, out, err = run_cli(capsys, "merge", trained / "run" / "final", "--output", trained / "merged")
    assert code == 0, err
    assert (trained / "merged" / "config.json").is_file()


def test_merge_names_the_deltas_that_cannot_merge(tmp_path, tiny_llama, data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca"},
                          delta=[LORA_IA3[0], {"method": "prompt", "num_virtual_tokens": 2, "init": "random"}],
                          train={"max_steps": 1})
    assert run_cli(capsys, "train", recipe, "--output", tmp_path / "run")[0] == 0
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert_one_clean_line(code, err, "cannot be merged", "delta 'prompt'")
    code, out, err = run_cli(capsys, "export", tmp_path / "run" / "final", "--output", tmp_path / "peft")
    assert_one_clean_line(code, err, "composition", "lora (lora)", "prompt (prompt)", "PEFT")


def test_validate_prints_every_delta_and_the_total(tmp_path, tiny_llama, data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca"}, delta=LORA_IA3)
    code, out, err = run_cli(capsys, "validate", recipe)
    assert code == 0, err
    plan_counts = {}
    for name in ("lora", "ia3"):
        line = next(line for line in out.splitlines() if f"delta '{name}'" in line)
        plan_counts[name] = int(line.split(", ")[1].split(" params")[0].replace(",", "").split()[-1])
    total = next(line for line in out.splitlines() if "delta params" in line)
    assert f"{sum(plan_counts.values()):,}" in total and "(total)" in total
    assert min(plan_counts.values()) > 0


def test_each_delta_trains_at_its_own_rate():
    from deltafit.train import build_optimizer

    delta = deltas.build(validate_delta([{"method": "lora", "r": 2}, {"method": "ia3", "lr": 0.5,
                                                                      "weight_decay": 0.3}]))
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    delta.attach(model)
    optimizer = build_optimizer(delta, TrainSpec(lr=1e-3, weight_decay=0.01))
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    lora = [by_param[id(p)] for k, p in delta.delta_parameters().items() if k.startswith("lora.")]
    ia3 = [by_param[id(p)] for k, p in delta.delta_parameters().items() if k.startswith("ia3.")]
    assert {lr for lr, _ in lora} == {1e-3} and {lr for lr, _ in ia3} == {0.5}
    assert {wd for _, wd in lora} == {0.01}  # LoRA's matrices decay at train.weight_decay
    assert all(wd == 0.0 for _, wd in ia3)  # IA3's vectors are 1-d: never decayed, whatever the rate


def test_set_reaches_a_delta_by_index_and_by_name(tmp_path, tiny_llama, data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca"}, delta=LORA_IA3)
    loaded = load_recipe(recipe, ["delta.lora.r=16", "delta.1.lr=0.2"])
    assert loaded.delta.deltas[0].r == 16 and loaded.delta.deltas[1].lr == 0.2
    single = load_recipe(recipe, ["delta=[{method: bitfit}]"])
    assert single.delta.method == "bitfit"  # a list of one is that method alone


@pytest.mark.parametrize("delta, overrides, needles", [
    ([{"method": "lora", "rr": 4}, {"method": "ia3"}], [], ["delta 'lora'", "delta.0.rr", "did you mean 'r'"]),
    ([{"method": "lora"}, {"method": "ia3", "lr": -1}], [], ["delta 'ia3'", "delta.1.lr"]),
    ([{"method": "lora"}, {"method": "lora"}], [], ["delta.1.name", "both named 'lora'"]),
    ([{"method": "lora"}, {"method": "lorra"}], [], ["delta.1.method", "did you mean 'lora'"]),
    ([{"method": "lora"}, "bitfit"], [], ["delta.1", "mapping"]),
    ([{"method": "lora"}, {"method": "ia3", "name": "a.b"}], [], ["delta.1.name"]),
    (LORA_IA3, ["delta.dora.r=2"], ["delta.dora.r", "lora, ia3"]),
    ([{"method": "lora", "target_modules": ["q_proj"]}, {"method": "dora", "target_modules": ["q_proj"]}], [],
     ["deltas 'lora' and 'dora'", "q_proj", "target_modules"]),
    ([{"method": "prompt", "num_virtual_tokens": 2}, {"method": "ptuning", "num_virtual_tokens": 2}], [],
     ["deltas 'prompt' and 'ptuning'", "virtual tokens"]),
    ([{"method": "lora"}, {"method": "prefix", "num_virtual_tokens": 2}], ["data.packing=true"],
     ["data.packing", "delta 'prefix'"]),
    ([{"method": "lora", "r": 999}, {"method": "ia3"}], [], ["delta 'lora'", "delta.0.r", "999"]),
], ids=["unknown-key", "bad-value", "duplicate-name", "unknown-method", "not-a-mapping", "bad-name",
        "set-no-such-delta", "owned-module", "one-slot", "packing", "size"])
def test_every_mistake_is_one_line_naming_the_delta_and_the_key(tmp_path, tiny_llama, data, capsys, monkeypatch,
                                                                delta, overrides, needles):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca"}, delta=delta)
    monkeypatch.setattr("deltafit.train.build_model", _no_weights)  # refused before any weight loads
    sets = [a for o in overrides for a in ("--set", o)]
    for command in ("validate", "train"):
        code, out, err = run_cli(capsys, command, recipe, *sets, *(["--output", tmp_path / "o"] if command == "train"
                                                                    else []))
        assert_one_clean_line(code, err, *needles)


def test_conflicting_base_tensors_are_refused_before_weights_load(tmp_path, tiny_bert, cls_file, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert,
                          {"train": str(cls_file), "format": "classification", "text_column": "sentence"},
                          delta=[{"method": "bitfit"}, {"method": "full"}], task="seq-cls")
    monkeypatch.setattr("deltafit.train.build_model", _no_weights)
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "o")
    assert_one_clean_line(code, err, "deltas 'bitfit' and 'full'", "both train the tensor", "bias")


def _no_weights(*args, **kwargs):
    raise AssertionError("a model was loaded before the composition was refused")


@pytest.fixture()
def scheduled(tmp_path, tiny_llama, data):
    return write_recipe(tmp_path / "s.yaml", tiny_llama, {"train": str(data), "format": "alpaca", "max_length": 200},
                        delta=SCHEDULED,
                        train={"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "save_every": 3, "keep_last": 10,
                               "lr": 5e-3, "scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01})


def test_sigkill_then_resume_is_bitwise_identical_with_schedules(scheduled, tmp_path):
    code, out = finish(start(scheduled, tmp_path / "reference"))
    assert code == 0, out
    reference = final_tensors(tmp_path / "reference")
    assert {k.split(".", 1)[0] for k in reference} == {"adalora", "lisa", "prefix"}
    run = tmp_path / "killed"
    kill_and_resume(scheduled, run, 7)  # past the first rank allocations, between checkpoints 6 and 9
    assert_bitwise_equal(final_tensors(run), reference)


def test_a_later_delta_targets_the_base_not_an_earlier_deltas_layers():
    """Two LoRAs on all-linear (distinct names): the second adapts exactly the base's linear layers,
    not the first's A and B, and both train, save and reload under their own names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    delta = deltas.build(validate_delta([{"method": "lora", "r": 2, "target_modules": "all-linear"},
                                         {"method": "lora", "name": "second", "r": 3, "target_modules": "all-linear"}]))
    delta.attach(model)
    first, second = (set(delta.parts[n].describe_targets()) for n in ("lora", "second"))
    assert first == second and len(first) == 7  # q k v o gate up down
    state = delta.state_dict()
    assert any(k.startswith("second.") and k.endswith(".A") and state[k].shape[0] == 3 for k in state)
    delta.detach()
    assert not any("lora" in n for n, _ in model.named_modules())


def test_a_composition_with_a_changing_trainable_set_asks_ddp_to_look_for_unused_parameters():
    from deltafit.train import _ddp_kwargs

    changing = deltas.build(validate_delta([{"method": "lora", "r": 2}, {"method": "lamda", "r": 2,
                                                                          "target_modules": ["o_proj"]}]))
    steady = deltas.build(validate_delta([{"method": "lora", "r": 2}, {"method": "ia3"}]))
    assert changing.trainables_change and not steady.trainables_change
    assert [k.find_unused_parameters for k in _ddp_kwargs(changing)] == [True] and _ddp_kwargs(steady) == []
