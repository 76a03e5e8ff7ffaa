"""LoRA's `init` option: default (unchanged), gaussian, and the residual inits pissa and olora, whose
base weights are changed in place: the model starts at the base, detach restores W0 bit for bit,
a checkpoint reloads exactly, merge keeps the trained weights, and the PEFT export (a plain LoRA
of rank 2r on the ORIGINAL base) gives the trained model's logits in real peft."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltafit import checkpoint, deltas
from deltafit.deltas._lowrank import LowRankUpdate
from deltafit.errors import UserError
from deltafit.loading import attach_from_checkpoint, load_source, source_recipe
from deltafit.model import build_model
from deltafit.peft_io import export_checkpoint
from deltafit.recipe import recipe_from_dict, validate_delta

from delta_testkit import forward, load_arch, make_batch, perturb, quiet_transformers, snapshot, train_step

TOLERANCE = 1e-5  # fp32 on CPU


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def lora(**options):
    return deltas.build(validate_delta({"method": "lora", "r": 4, "alpha": 8, **options}))


def attach(arch, seed: int = 0, **options):
    model, delta = arch.fresh(), lora(**options)
    torch.manual_seed(seed)
    delta.attach(model, head=arch.head)
    return model, delta


def updates(delta):
    """{host module name: (host, LowRankUpdate)}"""
    return {key.rsplit(".", 1)[0]: (host, update) for key, (host, _, update) in delta.insertions.hosts.items()}


def test_default_init_is_unchanged(llama):
    """`init: default` draws exactly what LoRA always drew (Kaiming-uniform A from the global RNG, zero B)."""
    _, delta = attach(llama)
    torch.manual_seed(0)
    for _, update in updates(delta).values():
        drawn = LowRankUpdate(update.A.shape[1], update.B.shape[0], 4, update.scale, 0.0)
        assert torch.equal(update.A, drawn.A) and not update.B.any()
    assert "A0" not in "".join(delta.state_dict())


def test_gaussian_init_draws_a_with_std_one_over_r(llama):
    model, delta = attach(llama, init="gaussian", r=8, alpha=16, target_modules="all-linear")
    A = torch.cat([u.A.flatten() for _, u in updates(delta).values()])
    assert abs(A.std().item() - 1 / 8) < 0.01 and abs(A.mean().item()) < 0.01  # Kaiming's bound is ~0.3 here
    assert all(not u.B.any() for _, u in updates(delta).values())
    batch = make_batch("llama")
    assert torch.equal(forward(model, delta, batch), forward(llama.pristine, None, batch))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_plus_lora_path_equals_w0(llama, init):
    originals = dict(llama.pristine.named_modules())
    _, delta = attach(llama, init=init)
    for name, (host, update) in updates(delta).items():
        w0 = originals[name].weight
        assert not torch.equal(host.weight, w0), "the frozen weight must be the residual"
        assert torch.allclose(host.weight + update.delta_weight(), w0, atol=1e-6)
        assert torch.equal(update.A, update.A0) and torch.equal(update.B, update.B0)


def test_pissa_factors_are_the_principal_part(llama):
    originals = dict(llama.pristine.named_modules())
    _, delta = attach(llama, init="pissa", r=3, alpha=12)
    for name, (_, update) in updates(delta).items():
        u, s, vh = torch.linalg.svd(originals[name].weight.double(), full_matrices=False)
        top = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(update.delta_weight().double(), top, atol=1e-5)
        # A = sqrt(S_r / scale) V_r^T and B = U_r sqrt(S_r / scale): equal row/column norms
        assert torch.allclose(update.A.norm(dim=1), update.B.norm(dim=0), atol=1e-5)
        assert torch.allclose(update.A.norm(dim=1) ** 2 * update.scale, s[:3].float(), atol=1e-4)


def test_olora_b_has_orthonormal_columns(llama):
    _, delta = attach(llama, init="olora")
    for _, update in updates(delta).values():
        assert torch.allclose(update.B.T @ update.B, torch.eye(4), atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_fresh_model_equals_the_base(llama, init):
    model, delta = attach(llama, init=init, target_modules="all-linear")
    batch = make_batch("llama")
    diff = (forward(model, delta, batch) - forward(llama.pristine, None, batch)).abs().max().item()
    assert diff <= TOLERANCE  # fp32 rounding of W0 - s B0 A0 + s B0 A0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_detach_after_training_restores_w0_bit_for_bit(llama, init):
    model, delta = attach(llama, init=init, target_modules="all-linear")
    original = snapshot(llama.pristine)
    train_step(model, delta, make_batch("llama"))
    delta.detach()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original["tensors"][name]), name


def test_checkpoint_reload_is_exact_and_uses_the_stored_factors(llama, monkeypatch):
    model, delta = attach(llama, init="pissa")
    perturb(delta)
    train_step(model, delta, make_batch("llama"))
    state = {k: v.clone() for k, v in delta.state_dict().items()}
    assert {k.rsplit(".", 1)[1] for k in state} == {"A", "B", "A0", "B0"}
    batch = make_batch("llama")
    trained = forward(model, delta, batch)
    # Reloading where the SVD gives slightly other factors (another LAPACK, a GPU): the checkpoint's rule.
    import deltafit.deltas.lora as lora_module

    exact = lora_module.base_factors
    monkeypatch.setattr(lora_module, "base_factors", lambda *a: tuple(t * 1.001 for t in exact(*a)))
    model2, delta2 = attach(llama, init="pissa")
    residuals = {n: m.weight for n, (m, _) in updates(delta).items()}
    assert not any(torch.equal(m.weight, residuals[n]) for n, (m, _) in updates(delta2).items())
    delta2.load_state_dict(state)
    assert torch.equal(forward(model2, delta2, batch), trained)
    assert all(torch.equal(m.weight, residuals[n]) for n, (m, _) in updates(delta2).items())


def test_restoring_attach_skips_the_factorization_and_reloads_exactly(llama, monkeypatch):
    """eval/merge/export/--resume reattach with restoring=True: no SVD (its result would be
    overwritten by the stored A0, B0), and the reloaded model is the trained one, bit for bit."""
    model, delta = attach(llama, init="pissa", target_modules="all-linear")
    perturb(delta)
    train_step(model, delta, make_batch("llama"))
    state = {k: v.clone() for k, v in delta.state_dict().items()}
    batch = make_batch("llama")
    trained = forward(model, delta, batch)
    import deltafit.deltas.lora as lora_module

    def no_svd(*args):
        raise AssertionError("a restoring attach must not factorize")

    monkeypatch.setattr(lora_module, "base_factors", no_svd)
    model2, delta2 = llama.fresh(), lora(init="pissa", target_modules="all-linear")
    delta2.attach(model2, head=llama.head, restoring=True)
    delta2.load_state_dict(state)
    assert torch.equal(forward(model2, delta2, batch), trained)
    delta2.detach()  # and the original weights still come back
    original = snapshot(llama.pristine)
    assert all(torch.equal(t, original["tensors"][n]) for n, t in model2.state_dict().items())


def test_randomized_svd_starts_at_the_base_near_the_principal_part(llama):
    originals = dict(llama.pristine.named_modules())
    model, delta = attach(llama, init="pissa", svd_niter=4, r=3, alpha=12, target_modules="all-linear")
    batch = make_batch("llama")
    assert (forward(model, delta, batch) - forward(llama.pristine, None, batch)).abs().max().item() <= TOLERANCE
    for name, (_, update) in updates(delta).items():
        w0 = originals[name].weight.double()
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        best = torch.linalg.norm(w0 - (u[:, :3] * s[:3]) @ vh[:3])  # Eckart-Young: no rank-3 part does better
        drawn = torch.linalg.norm(w0 - update.delta_weight().double())
        assert best <= drawn + 1e-6 and drawn <= 1.05 * best, name  # and the randomized one is close


def test_svd_niter_needs_pissa():
    with pytest.raises(Exception, match="svd_niter.*pissa"):
        lora(init="olora", svd_niter=4)


def test_merge_keeps_the_trained_weights(llama):
    model, delta = attach(llama, init="pissa")
    perturb(delta)
    batch = make_batch("llama")
    unmerged = forward(model, delta, batch)
    delta.merge()
    assert (forward(model, None, batch) - unmerged).abs().max().item() <= TOLERANCE
    assert (forward(model, None, batch) - forward(llama.pristine, None, batch)).abs().max().item() > 1e-3


def test_attaches_on_the_meta_device(llama):
    with torch.device("meta"):
        model = type(llama.pristine)(llama.pristine.config)
    delta = lora(init="pissa")
    delta.attach(model)
    assert all(t.device.type == "meta" for t in delta.state_dict().values())
    assert numel_of(delta) == delta.expected_trainable_params(model)


def numel_of(delta) -> int:
    return sum(p.numel() for p in delta.delta_parameters().values())


def test_tied_weights_are_refused(tiny_gpt2):
    gpt2 = load_arch("gpt2", tiny_gpt2)  # lm_head shares the token embedding
    with pytest.raises(UserError, match="recipe key 'delta.init'.*'lm_head'.*shares it"):
        lora(init="pissa", target_modules=["lm_head"]).attach(gpt2.fresh())


def test_pissa_on_conv1d_layers(tiny_gpt2):
    """GPT-2's Conv1D stores W^T: the factors are of W (out x in), the residual stored transposed."""
    gpt2 = load_arch("gpt2", tiny_gpt2)
    model, delta = attach(gpt2, init="pissa")
    batch = make_batch("gpt2")
    assert (forward(model, delta, batch) - forward(gpt2.pristine, None, batch)).abs().max().item() <= TOLERANCE
    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), gpt2.pristine.state_dict().values()))


# -- PEFT export: a plain LoRA on the original base ---------------------------------------------


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("pissa", True), ("olora", False)])
def test_residual_init_exports_as_lora_on_the_original_base(tmp_path, tiny_llama, init, rslora):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    delta_options = {"method": "lora", "r": 4, "alpha": 8, "init": init, "rslora": rslora,
                     "target_modules": ["q_proj", "v_proj", "down_proj"]}
    recipe = recipe_from_dict({"model": {"name": str(tiny_llama), "task": "causal-lm"},
                               "data": {"train": "unused.json", "format": "alpaca"}, "delta": delta_options})
    model, _, head = build_model(recipe.model)
    delta = deltas.build(recipe.delta)
    delta.attach(model, head=head)
    train_step(model, delta, make_batch("llama"))  # the trained factors move away from A0, B0
    meta = checkpoint.metadata(recipe, delta, None, step=1, epoch=0.0)
    directory = checkpoint.save(tmp_path / "ckpt", meta, delta.state_dict(), recipe.to_dict())
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                            tmp_path / "adapter").eval()
    batch = make_batch("llama")
    ours = forward(model.eval(), delta, batch)
    assert (forward(theirs, None, batch) - ours).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():  # the original base, not the residual: the adapter really matters
        assert (forward(theirs, None, batch) - ours).abs().max().item() > 1e-3
    # deltafit reads the export back as a plain LoRA of rank 2r with the same logits.
    source, meta2, tensors = load_source(str(tmp_path / "adapter"))
    plain, _, _ = build_model(source_recipe(source, meta2).model)
    assert meta2["delta_config"]["r"] == 8
    assert (forward(plain.eval(), attach_from_checkpoint(plain, meta2, tensors), batch) - ours).abs().max() <= 1e-5
