"""AdapterFusion's own promises (the contract suite in test_contract.py covers the rest): the paper's
mixing formula at one place, averaging at init, frozen sources that never move, checkpoints that
reference their sources by path and SHA-256 and refuse a changed one, the regularizer, and
stage 1 -> stage 2 -> eval through the CLI on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltafit import checkpoint, deltas
from deltafit.deltas.adapter_fusion import Fusion
from deltafit.errors import UserError
from deltafit.fsutil import sha256_file
from deltafit.loading import attach_from_checkpoint
from deltafit.recipe import validate_delta
from tests.helpers import assert_one_clean_line, run_cli, write_recipe

from delta_testkit import fusion_sources, load_arch, make_batch, numel, perturb, saved_checkpoint, trainer_parts

STAGE1 = {"method": "adapter", "bottleneck": 8, "train_layernorms": False}


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_bert) -> list[str]:
    """Two different stage-1 adapter checkpoints for the tiny BERT."""
    return fusion_sources(tmp_path_factory.mktemp("stage1"), tiny_bert, "seq-cls")


def fusion(adapters: list[str], **options):
    return deltas.build(validate_delta({"method": "adapter-fusion", "adapters": adapters, **options}))


def attached(spec, adapters: list[str], **options):
    model, delta = spec.fresh(), fusion(adapters, **options)
    torch.manual_seed(0)
    delta.attach(model, head=spec.head)
    return model, delta


def first_place(delta) -> tuple[str, Fusion]:
    name, (_, _, module) = next(iter(delta.insertions.hosts.items()))
    return name.rsplit(".fusion", 1)[0], module


def by_hand(tensors: dict, host: str, h: torch.Tensor) -> torch.Tensor:
    """u = W_up relu(W_down h + b_down) + b_up, from a source checkpoint's tensors."""
    down_w, down_b = tensors[f"{host}.adapter.down.weight"], tensors[f"{host}.adapter.down.bias"]
    up_w, up_b = tensors[f"{host}.adapter.up.weight"], tensors[f"{host}.adapter.up.bias"]
    return torch.relu(h @ down_w.T + down_b) @ up_w.T + up_b


def source_tensors(adapters: list[str]) -> list[dict]:
    return [load_file(str(checkpoint.find_checkpoint(p) / checkpoint.TENSORS)) for p in adapters]


# -- (1) the formula at one place --------------------------------------------------------------------


def test_output_is_the_papers_formula_at_one_place(bert, sources):
    model, delta = attached(bert, sources)
    perturb(delta, scale=0.3)  # Q, K and V away from their init, so every term counts
    host, module = first_place(delta)
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    u = [by_hand(t, host, h) for t in source_tensors(sources)]
    q = module.query(h)
    scores = torch.stack([(q * module.key(u_n)).sum(-1) for u_n in u], dim=-1)
    s = scores.softmax(-1)
    expected = h + sum(s[..., n:n + 1] * (u[n] @ module.value.weight.T) for n in range(len(u)))
    with torch.no_grad():
        assert torch.allclose(module(h), expected, atol=1e-5)


def test_with_v_identity_a_dominant_adapter_takes_over_and_equal_scores_average(bert, sources):
    model, delta = attached(bert, sources)
    host, module = first_place(delta)
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    u = torch.stack([by_hand(t, host, h) for t in source_tensors(sources)])  # (N, 2, 5, 32)
    with torch.no_grad():
        module.value.weight.copy_(torch.eye(32))
        module.key.weight.copy_(torch.eye(32))
        module.key.bias.zero_()
        module.query.weight.copy_(1e6 * torch.eye(32))  # scores 1e6 h.u_n: the softmax is one-hot
        module.query.bias.zero_()
        dominant = (h * u).sum(-1).argmax(0)  # per token, the adapter with the largest h.u_n
        picked = torch.gather(u, 0, dominant[None, ..., None].expand(1, *u.shape[1:]))[0]
        assert torch.allclose(module(h), h + picked, atol=1e-5)
        module.key.weight.zero_()  # equal scores: the plain average of the adapters' outputs h + u_n
        assert torch.allclose(module(h), h + u.mean(0), atol=1e-6)


# -- (2) at init it averages ---------------------------------------------------------------------------


def test_fresh_fusion_of_identical_adapters_computes_that_adapter(bert, tiny_bert, tmp_path):
    same = [str(saved_checkpoint(tmp_path / f"copy-{i}", tiny_bert, STAGE1, task="seq-cls", seed=3)[0])
            for i in range(2)]
    model, delta = attached(bert, same)
    # The adapter alone, its tensors loaded, the head the same (untouched) one.
    alone, adapter = bert.fresh(), deltas.build(validate_delta(STAGE1))
    adapter.attach(alone, head=bert.head)
    stage1 = source_tensors(same)[0]
    with torch.no_grad():
        for name, p in adapter.delta_parameters().items():
            p.copy_(stage1[name])
    batch = make_batch("bert")
    with torch.no_grad():
        reference = alone(**batch).logits
        assert not torch.allclose(reference, bert.pristine(**batch).logits)  # the adapter matters
        assert torch.allclose(model(**batch).logits, reference, atol=1e-4)  # V = I + 1e-6 off the diagonal
        for _, _, module in delta.insertions.hosts.values():
            module.value.weight.copy_(torch.eye(32))
        assert torch.allclose(model(**batch).logits, reference, atol=1e-6)


# -- (3) only the fusion (and the head) trains ------------------------------------------------------


def test_only_fusion_and_head_train_and_the_sources_stay_bit_identical(bert, sources):
    model, delta = attached(bert, sources)
    trainable = delta.trainable_parameters()
    assert all(".fusion." in n and n.rsplit(".", 2)[-2] in ("query", "key", "value") or n.startswith("head.")
               for n in trainable)
    head = numel(p for n, p in trainable.items() if n.startswith("head."))
    assert numel(trainable.values()) == delta.expected_trainable_params(bert.fresh()) + head
    assert delta.expected_trainable_params(bert.fresh()) == 4 * (3 * 32 * 32 + 2 * 32)  # 2 blocks x Houlsby
    frozen = {n: b.clone() for n, b in model.named_buffers() if ".fusion.adapters." in n}
    assert len(frozen) == 4 * 2 * 4  # places x sources x (down, up) x (weight, bias)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer, scheduler = trainer_parts(delta, total=3, weight_decay=0.1)  # decay would move a leaked tensor
    model.train()
    for _ in range(3):
        loss = model(**make_batch("bert")).loss + delta.extra_loss()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert not [n for n in delta.state_dict() if ".adapters." in n]  # referenced, not stored


# -- (4) the checkpoint references its sources by path and hash ------------------------------------


def saved_fusion(tmp_path, tiny_bert, adapters):
    return saved_checkpoint(tmp_path / "fusion", tiny_bert, {"method": "adapter-fusion", "adapters": adapters},
                            task="seq-cls")[0]


def test_checkpoint_records_sources_and_refuses_one_that_changed(bert, tiny_bert, tmp_path):
    adapters = fusion_sources(tmp_path / "stage1", tiny_bert, "seq-cls")
    final = saved_fusion(tmp_path, tiny_bert, adapters)
    meta, tensors = checkpoint.load(final)
    recorded = meta["delta_config"]
    assert recorded["adapters"] == adapters
    assert recorded["adapter_sha256"] == [sha256_file(checkpoint.find_checkpoint(p) / checkpoint.TENSORS)
                                          for p in adapters]
    assert all(".fusion." in k or k.startswith("head.") for k in tensors)
    attach_from_checkpoint(bert.fresh(), meta, tensors)  # unchanged sources: fine
    saved_checkpoint(adapters[1], tiny_bert, STAGE1, task="seq-cls", seed=11)  # source 1 retrained in place
    with pytest.raises(UserError) as err:
        attach_from_checkpoint(bert.fresh(), meta, tensors)
    message = str(err.value)
    assert "'delta.adapters.1'" in message and "changed since this fusion was trained" in message
    assert adapters[1] in message and "\n" not in message


def _lora(tmp_path, tiny_bert):
    return str(saved_checkpoint(tmp_path / "lora", tiny_bert, {"method": "lora", "r": 2}, task="seq-cls")[0])


def _norms(tmp_path, tiny_bert):
    return str(saved_checkpoint(tmp_path / "norms", tiny_bert, {**STAGE1, "train_layernorms": True},
                                task="seq-cls")[0])


def _pfeiffer(tmp_path, tiny_bert):
    return str(saved_checkpoint(tmp_path / "pf", tiny_bert, {**STAGE1, "variant": "pfeiffer"}, task="seq-cls")[0])


def _damaged(tmp_path, tiny_bert):
    path = saved_checkpoint(tmp_path / "bad", tiny_bert, STAGE1, task="seq-cls")[0]
    data = bytearray((path / checkpoint.TENSORS).read_bytes())
    data[-1] ^= 1
    (path / checkpoint.TENSORS).write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("make, needles", [
    (lambda tmp, _: str(tmp / "missing"), ["does not exist", "method 'adapter'"]),
    (_lora, ["trained with method 'lora'", "method 'adapter'"]),
    (_norms, ["train_layernorms", "delta.train_layernorms=false"]),
    (_pfeiffer, ["same variant, target_modules and layers"]),
    (_damaged, ["damaged", "delta.safetensors"]),
], ids=["missing", "not-an-adapter", "trained-norms", "other-places", "damaged"])
def test_a_source_that_cannot_be_fused_is_refused_naming_its_key(bert, sources, tiny_bert, tmp_path, make, needles):
    model = bert.fresh()
    with pytest.raises(UserError) as err:
        fusion([sources[0], make(tmp_path, tiny_bert)]).attach(model, head=bert.head)
    message = str(err.value)
    assert message.startswith("recipe key 'delta.adapters.1'") and "\n" not in message
    assert all(n in message for n in needles), message
    assert not any(".fusion" in n for n, _ in model.named_modules())


def test_paths_are_resolved_against_the_current_directory(sources, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(sources[0]).parent)
    config = validate_delta({"method": "adapter-fusion", "adapters": [Path(s).name for s in sources]})
    assert config.adapters == sources
    with pytest.raises(UserError, match="delta.adapters"):
        validate_delta({"method": "adapter-fusion", "adapters": [sources[0]]})  # one source fuses nothing
    with pytest.raises(UserError, match="adapter_sha256"):
        validate_delta({"method": "adapter-fusion", "adapters": sources, "adapter_sha256": ["0" * 64]})


# -- (6) the regularizer ---------------------------------------------------------------------------------


def test_regularizer_is_extra_loss_and_zero_at_identity(bert, sources):
    model, delta = attached(bert, sources)
    places = [m for _, _, m in delta.insertions.hosts.values()]
    assert 0 < delta.extra_loss().item() < 1e-8  # V = I + 1e-6 off the diagonal
    with torch.no_grad():
        for m in places:
            m.value.weight.copy_(torch.eye(32))
    assert delta.extra_loss().item() == 0.0
    perturb(delta)
    expected = 0.01 * sum(((torch.eye(32) - m.value.weight) ** 2).sum() for m in places)
    loss = delta.extra_loss()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(m.value.weight.grad is not None and m.query.weight.grad is None for m in places)
    assert attached(bert, sources, regularization=0.0)[1].extra_loss() is None


# -- (5) stage 1 -> stage 2 -> eval through the CLI ----------------------------------------------------


def test_stage1_then_fusion_then_eval_with_only_the_fusion_path(tmp_path, tiny_bert, cls_file, capsys):
    data = {"train": str(cls_file), "eval": str(cls_file), "format": "classification",
            "text_column": "sentence", "label_column": "label", "max_length": 32}
    runs = []
    for seed in (1, 2):  # two stage-1 adapters (two "tasks": here the same data, other seeds)
        recipe = write_recipe(tmp_path / f"a{seed}.yaml", tiny_bert, data, STAGE1, task="seq-cls",
                              train={"max_steps": 3, "seed": seed})
        code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / f"stage1-{seed}")
        assert code == 0, err
        runs.append(str(tmp_path / f"stage1-{seed}"))
    recipe = write_recipe(tmp_path / "f.yaml", tiny_bert, data, {"method": "adapter-fusion", "adapters": runs},
                          task="seq-cls", train={"max_steps": 3})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert code == 0 and f"{4 * (3 * 32 * 32 + 2 * 32):,}" in out, out + err
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "fusion")
    assert code == 0, err
    final = tmp_path / "fusion" / "final"
    meta = json.loads((final / checkpoint.META).read_text())
    assert meta["delta_config"]["adapters"] == [f"{r}/final" for r in runs]
    assert len(meta["delta_config"]["adapter_sha256"]) == 2
    code, _, err = run_cli(capsys, "eval", final)
    assert code == 0, err
    assert {"accuracy", "f1"} <= set(json.loads((tmp_path / "fusion" / "final-eval.json").read_text()))
    # A stage-1 checkpoint rewritten since (retrained): eval refuses, one line naming the key.
    stage1 = checkpoint.find_checkpoint(runs[0])
    old_meta, tensors = checkpoint.load(stage1)
    tensors = {k: v + 0.01 if ".adapter.up." in k else v for k, v in tensors.items()}
    checkpoint.save(stage1, old_meta, tensors, checkpoint.read_recipe_dict(stage1))
    code, out, err = run_cli(capsys, "eval", final)
    assert_one_clean_line(code, err, "delta.adapters.0", "changed since this fusion was trained", out=out)
