"""Method-specific tests of VeRA, LoRA-FA and SAID (the registry contract suite covers the rest).

Tiny Llama shapes (conftest): hidden 32, 4 heads, 2 KV heads of dim 8, so per block q_proj is
32 -> 32 and v_proj 32 -> 16; the default targets are q_proj and v_proj of both blocks.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafit import deltas
from deltafit.deltas.said import Fastfood, hadamard
from deltafit.recipe import validate_delta

from delta_testkit import forward, load_arch, make_batch, numel, perturb, train_step

QV_OUT = [32, 16, 32, 16]  # out_features of the 4 default targets, in model order
FP32_TOL = 1e-5  # merged vs unmerged logits: W0 x + dW x and (W0 + dW) x round differently


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def attach(arch, method: str, seed: int = 0, **options):
    model = arch.fresh()
    delta = deltas.build(validate_delta({"method": method, **options}))
    torch.manual_seed(seed)
    delta.attach(model, head=arch.head)
    return model, delta


def reload(arch, method: str, state: dict, **options):
    """A fresh model + delta under another global RNG seed, loaded from a saved safetensors state."""
    model, delta = attach(arch, method, seed=1234, **options)
    delta.load_state_dict(state)
    return model, delta


def saved(delta, tmp_path) -> dict:
    save_file({k: v.contiguous() for k, v in delta.state_dict().items()}, tmp_path / "delta.safetensors")
    return load_file(tmp_path / "delta.safetensors")


def updates(delta, kind):
    return [u for _, _, u in delta.insertions.hosts.values() if isinstance(u, kind)]


# -- VeRA ------------------------------------------------------------------------------------------


def test_vera_trains_r_plus_out_per_layer_and_stores_no_projection(llama):
    model, delta = attach(llama, "vera", r=16)
    params = delta.delta_parameters()
    assert numel(params.values()) == sum(16 + out for out in QV_OUT) == 160
    assert sorted({n.rsplit(".", 1)[-1] for n in params}) == ["b", "d"]
    assert set(delta.state_dict()) == set(params)  # A and B are regenerated, not saved
    shared = model.vera_projections
    assert shared.A.shape == (16, 32) and shared.B.shape == (32, 16)  # sized to the largest layer
    assert not shared.A.requires_grad and not shared.B.requires_grad
    assert "vera_projections.A" not in model.state_dict()  # non-persistent buffers
    from deltafit.deltas.vera import VeRAUpdate
    d, b = updates(delta, VeRAUpdate)[0].d, updates(delta, VeRAUpdate)[0].b
    assert torch.all(d == 0.1) and torch.all(b == 0)


def test_vera_projections_come_from_the_seed(llama):
    a, _ = attach(llama, "vera", seed=0, r=16, projection_seed=3)
    b, _ = attach(llama, "vera", seed=99, r=16, projection_seed=3)  # the global RNG does not matter
    c, _ = attach(llama, "vera", seed=0, r=16, projection_seed=4)
    assert torch.equal(a.vera_projections.A, b.vera_projections.A)
    assert torch.equal(a.vera_projections.B, b.vera_projections.B)
    assert not torch.allclose(a.vera_projections.A, c.vera_projections.A)
    assert not torch.allclose(a.vera_projections.B, c.vera_projections.B)


def test_vera_reload_from_checkpoint_reproduces_logits(llama, tmp_path):
    model, delta = attach(llama, "vera", r=16)
    perturb(delta)
    train_step(model, delta, make_batch("llama"))
    trained = forward(model, delta, make_batch("llama"))
    model2, delta2 = reload(llama, "vera", saved(delta, tmp_path), r=16)
    assert torch.equal(forward(model2, delta2, make_batch("llama")), trained)


def test_vera_matches_peft(llama):
    """Same seed -> PEFT's projections; same vectors -> PEFT's logits (the reference implementation)."""
    from peft import VeraConfig, get_peft_model

    from deltafit.deltas.vera import VeRAUpdate

    model, delta = attach(llama, "vera", r=16, projection_seed=5)
    perturb(delta)
    reference = get_peft_model(llama.fresh(), VeraConfig(r=16, target_modules=["q_proj", "v_proj"],
                                                         projection_prng_key=5))
    assert torch.equal(model.vera_projections.A, reference.base_model.vera_A["default"])
    assert torch.equal(model.vera_projections.B, reference.base_model.vera_B["default"])
    ours = {n.removesuffix(".vera"): u for n, (_, _, u) in delta.insertions.hosts.items() if isinstance(u, VeRAUpdate)}
    with torch.no_grad():
        for name, module in reference.base_model.model.named_modules():
            if name in ours:
                module.vera_lambda_d["default"].copy_(ours[name].d)
                module.vera_lambda_b["default"].copy_(ours[name].b)
    batch = make_batch("llama")
    assert torch.allclose(forward(model, delta, batch), forward(reference.eval(), None, batch), atol=1e-6)


# -- LoRA-FA ---------------------------------------------------------------------------------------


def test_lora_fa_step_moves_b_and_leaves_a_bit_identical(llama):
    from deltafit.deltas._lowrank import LowRankUpdate

    model, delta = attach(llama, "lora-fa", r=4)
    assert numel(delta.delta_parameters().values()) == sum(4 * out for out in QV_OUT) == 384
    layers = updates(delta, LowRankUpdate)
    A0 = [u.A.detach().clone() for u in layers]
    B0 = [u.B.detach().clone() for u in layers]
    perturb(delta)  # B starts at zero: give A a gradient path worth checking
    train_step(model, delta, make_batch("llama"))
    train_step(model, delta, make_batch("llama"))
    assert all(torch.equal(u.A, a) for u, a in zip(layers, A0))
    assert all(not torch.equal(u.B, b) for u, b in zip(layers, B0))
    assert all(u.A.grad is None for u in layers)  # never even computed


def test_lora_fa_checkpoint_holds_the_frozen_a_and_reloads_exactly(llama, tmp_path):
    model, delta = attach(llama, "lora-fa", r=4)
    perturb(delta)
    train_step(model, delta, make_batch("llama"))
    trained = forward(model, delta, make_batch("llama"))
    state = saved(delta, tmp_path)
    assert sorted({k.rsplit(".", 1)[-1] for k in state}) == ["A", "B"]
    assert len(state) == 2 * len(QV_OUT)
    model2, delta2 = reload(llama, "lora-fa", state, r=4)  # another seed drew another A: loading replaces it
    assert torch.equal(forward(model2, delta2, make_batch("llama")), trained)
    assert not any(p.requires_grad for n, p in delta2.state_dict().items() if n.endswith(".A"))


def test_lora_fa_projected_gradient_is_full_gradient_restricted_to_rows_of_a(llama):
    """PEFT's projection: scale * g_B' A equals G_W P_A, the full fine-tuning gradient of the weight
    projected onto A's row space (the best change reachable with A fixed)."""
    from deltafit.deltas._lowrank import LowRankUpdate

    model, delta = attach(llama, "lora-fa", r=4, alpha=8, project_grad=True)
    perturb(delta)
    host, _, update = next(iter(delta.insertions.hosts.values()))
    host.weight.requires_grad_(True)  # dL/dW0 = dL/d(delta W): the full fine-tuning gradient
    model(**make_batch("llama")).loss.backward()
    delta.before_optimizer_step(1)
    A = update.A.detach().double()
    row_space = A.T @ torch.linalg.solve(A @ A.T, A)
    expected = host.weight.grad.double() @ row_space
    assert isinstance(update, LowRankUpdate) and update.scale == 2.0
    torch.testing.assert_close(update.scale * update.B.grad.double() @ A, expected, rtol=1e-4, atol=1e-7)


# -- SAID ------------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_hadamard_and_its_gradient_match_the_dense_matrix():
    from deltafit.deltas.said import _Hadamard

    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    H = sylvester(16)
    torch.testing.assert_close(hadamard(x), x @ H.T)
    g = torch.randn(3, 16, dtype=torch.float64)
    (_Hadamard.apply(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ H)


def test_fastfood_equals_its_explicit_dense_construction():
    """V = (H G Pi H B)[:D] / sqrt(D sum G^2) applied to the zero-padded input, built as matrices."""
    d, D = 5, 48
    ff = Fastfood(d, D, torch.Generator().manual_seed(0))
    L = ff.L
    assert L == 64
    H = sylvester(L)
    Pi = torch.zeros(L, L, dtype=torch.float64)
    Pi[torch.arange(L), ff.perm.long()] = 1.0  # (Pi v)_i = v[perm[i]]
    G, B = torch.diag(ff.gauss.double()), torch.diag(ff.signs.double())
    pad = torch.eye(L, d, dtype=torch.float64)
    V = (H @ G @ Pi @ H @ B @ pad)[:D] / torch.sqrt(D * ff.gauss.double().pow(2).sum())
    x = torch.randn(d)
    torch.testing.assert_close(ff(x).double(), V @ x.double(), rtol=1e-5, atol=1e-6)
    assert sorted(ff.perm.tolist()) == list(range(L)) and set(ff.signs.tolist()) == {-1, 1}


def test_fastfood_keeps_norms_and_memory_stays_linear_at_real_size():
    """SmolLM2's q_proj weight (576 x 576): O(D) buffers, no dense D x d matrix, |V x| ~ |x|."""
    D, d = 576 * 576, 1000
    ff = Fastfood(d, D, torch.Generator().manual_seed(0))
    assert ff.L == 1 << 19
    buffers = sum(b.numel() * b.element_size() for b in ff.buffers())
    assert buffers == ff.L * (1 + 4 + 4)  # int8 signs, int32 permutation, fp32 Gaussians: 4.7 MB, not D*d*4 = 1.3 GB
    x = torch.randn(d)
    assert 0.9 < (ff(x).norm() / x.norm()).item() < 1.1


def test_said_trains_d_plus_one_scale_per_tensor_and_stores_no_projection(llama):
    from deltafit.deltas.said import SAIDUpdate

    model, delta = attach(llama, "said", dimension=50)
    params = delta.delta_parameters()
    assert numel(params.values()) == 50 + len(QV_OUT)
    assert set(delta.state_dict()) == set(params) == {"said.theta"} | {
        f"model.layers.{i}.self_attn.{p}.said.scale" for i in (0, 1) for p in ("q_proj", "v_proj")}
    layers = updates(delta, SAIDUpdate)
    assert [u.projection.D for u in layers] == [32 * 32, 16 * 32, 32 * 32, 16 * 32]
    assert all(u.scale.item() == 1.0 for u in layers) and torch.all(model.said.theta == 0)


def test_said_projections_come_from_the_seed(llama):
    from deltafit.deltas.said import SAIDUpdate

    def perms(seed, projection_seed):
        _, delta = attach(llama, "said", seed=seed, dimension=50, projection_seed=projection_seed)
        return [u.projection.perm for u in updates(delta, SAIDUpdate)]

    same, again, other = perms(0, 1), perms(7, 1), perms(0, 2)
    assert all(torch.equal(a, b) for a, b in zip(same, again))
    assert not any(torch.equal(a, b) for a, b in zip(same, other))


def test_said_merge_folds_the_update_exactly(llama):
    from deltafit.deltas.said import SAIDUpdate

    model, delta = attach(llama, "said", dimension=50)
    perturb(delta, scale=0.5)
    batch = make_batch("llama")
    unmerged = forward(model, delta, batch)
    assert (unmerged - forward(llama.pristine, None, batch)).abs().max() > 1e-3
    expected = {id(host): host.weight + u.delta_weight().detach() for host, _, u in delta.insertions.hosts.values()
                if isinstance(u, SAIDUpdate)}
    hosts = [host for host, _, u in delta.insertions.hosts.values() if isinstance(u, SAIDUpdate)]
    delta.merge()
    assert all(torch.equal(h.weight, expected[id(h)]) for h in hosts)
    assert (forward(model, None, batch) - unmerged).abs().max().item() <= FP32_TOL
    assert not hasattr(model, "said")


# -- end to end: train -> checkpoint -> merge through the CLI -------------------------------------


@pytest.mark.slow  # three short training runs: ~10 s each on 2 cores
@pytest.mark.parametrize("method,options", [
    ("vera", {"r": 16}), ("lora-fa", {"r": 4, "alpha": 8}), ("said", {"dimension": 64}),
])
def test_cli_train_then_merge_gives_equal_logits(method, options, tmp_path, tiny_llama, alpaca_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltafit import checkpoint
    from deltafit.loading import attach_from_checkpoint
    from deltafit.model import build_model
    from deltafit.recipe import recipe_from_dict
    from tests.helpers import run_cli, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          delta={"method": method, **options}, train={"max_steps": 3})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    assert json.loads((final / "deltafit.json").read_text())["method"] == method
    code, out, err = run_cli(capsys, "merge", final, "--output", tmp_path / "merged")
    assert code == 0, err

    meta, tensors = checkpoint.load(final)
    model, _, _ = build_model(recipe_from_dict(checkpoint.read_recipe_dict(final)).model)
    attach_from_checkpoint(model, meta, tensors)  # projections regenerated from the saved config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(["Add 3 and 4."], return_tensors="pt")
    with torch.no_grad():
        tuned, plain = model(**ids).logits, merged(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(**ids).logits
    assert (tuned - base).abs().max() > 1e-4  # training changed something worth merging
    assert (plain - tuned).abs().max().item() <= FP32_TOL
