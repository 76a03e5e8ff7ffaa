"""The Delta contract for compositions, generated from the registry: every pair of methods on one base.

Each pair either is refused at attach with one line naming both deltas (the conflicts in
`REFUSED_PAIRS`, each with its reason), or attaches, trains one step, saves, reloads to the same
output, detaches back to the pristine base bit for bit, and, when both parts merge, merges to the
unmerged output. A pair runs on the tiny Llama, or on the tiny BERT where a part refuses Llama
(BitFit: Llama has no biases). The set of refused pairs must be exactly the expected one, so a new
method that silently cannot share a model fails here until its conflict is declared.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_contract import OPTIONS, REFUSES

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import forward, load_arch, perturb, snapshot, train_step

# Pairs that cannot share one model (in registry order, as attached here), by the refusal's words.
REFUSED_PAIRS = {
    # Both train one tensor: base tensors in place (BitFit's biases, the adapters' and LayerNorm tuning's
    # norms, whole blocks, every tensor for full), or a weight a method owns (DoRA, masks, QLoRA).
    "both train the tensor": """
        adapter+layernorm adapter+lisa adapter+partial bitfit+adapter bitfit+layernorm bitfit+lisa bitfit+partial
        dora+lisa dora+partial full+adapter full+bitfit full+dora full+layernorm full+lisa full+masking
        full+partial full+qlora layernorm+lisa layernorm+partial masking+dora masking+lisa masking+partial
        partial+lisa qlora+masking""",
    # One module, and one of the two reads or rewrites its weights (exclusive_hosts: DoRA, QLoRA, masking).
    "both attach to": """
        adalora+dora adalora+masking adalora+qlora adapter+masking adapter+qlora adapter-fusion+masking
        adapter-fusion+qlora aflora+dora aflora+masking aflora+qlora diff-pruning+dora diff-pruning+masking
        dora+ia3 lamda+dora lamda+masking lamda+qlora lamda-pp+dora lamda-pp+masking lamda-pp+qlora lora+dora
        lora+masking lora+qlora lora-fa+dora lora-fa+masking lora-fa+qlora masking+ia3 qlora+diff-pruning
        qlora+ia3 said+dora said+masking said+qlora vera+dora vera+masking vera+qlora
        unipelt+dora unipelt+masking unipelt+qlora""",  # UniPELT's LoRA on q/v, beside theirs
    # One input slot (UniPELT and MAM hold a prefix: the attention cache).
    "both put virtual tokens": """
        prefix+ptuning-v2 prompt+ptuning mam+prefix mam+ptuning-v2 mam+unipelt unipelt+prefix
        unipelt+ptuning-v2""",  # the presets hold a prefix
    "cannot attach beside": "qlora+dora",  # DoRA's norms of QLoRA's 4-bit weights
}
EXPECTED = {frozenset(pair.split("+", 1)) if pair.count("+") == 1 else None: reason
            for reason, pairs in REFUSED_PAIRS.items() for pair in pairs.split()}


def expected_refusal(a: str, b: str):
    return EXPECTED.get(frozenset((a, b)))


def pick_arch(a: str, b: str) -> str:
    return "bert" if ("llama" in {arch for m, arch in REFUSES if m in (a, b)}) else "llama"


def test_every_expected_refusal_is_a_registered_pair():
    assert None not in EXPECTED and all(set(pair) <= set(deltas.METHODS) for pair in EXPECTED)


PAIRS = [pytest.param(a, b, id=f"{a}+{b}") for a, b in itertools.combinations(deltas.METHODS, 2)]


@pytest.fixture(scope="module")
def archs(tiny_llama, tiny_bert, tmp_path_factory):
    return {"llama": load_arch("llama", tiny_llama, files=tmp_path_factory.mktemp("llama-files")),
            "bert": load_arch("bert", tiny_bert, files=tmp_path_factory.mktemp("bert-files"))}


def composition(a: str, b: str, spec):
    return validate_delta([{"method": m, **OPTIONS.get(m, {}), **spec.file_options(m)} for m in (a, b)])


@pytest.mark.parametrize("a, b", PAIRS)
def test_pair(archs, a, b, tmp_path):
    spec = archs[pick_arch(a, b)]
    model, delta, batch = spec.fresh(), deltas.build(composition(a, b, spec)), spec.batch()
    original = snapshot(spec.fresh())
    refusal = expected_refusal(a, b)
    torch.manual_seed(0)
    if refusal:
        with pytest.raises(UserError) as err:
            delta.attach(model, head=spec.head)
        message = str(err.value)
        assert refusal in message and f"'{a}'" in message and f"'{b}'" in message and "\n" not in message
        assert message.startswith("recipe key 'delta'")
        assert _same(snapshot(model), original), "a refused composition must leave the model as it was"
        return
    delta.attach(model, head=spec.head)
    _trains_one_step(model, delta, spec, batch)
    _reloads(spec, a, b, delta, model, batch, tmp_path)
    if delta.mergeable:
        perturb(delta)
        unmerged = forward(model, delta, batch)
        delta.merge()
        assert (forward(model, None, batch) - unmerged).abs().max().item() <= 1e-5
    else:
        delta.detach()
        if delta.detach_restores_weights and not delta.lossy_base:  # the trained task head stays trained
            assert _same(snapshot(model), original, skip=spec.head), "detach must give back the pristine base"


def _trains_one_step(model, delta, spec, batch):
    trainable = {id(p) for p in delta.trainable_parameters().values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    names = {k.split(".", 1)[0] for k in delta.delta_parameters()}
    assert names == set(delta.parts), f"every delta trains something: {names} vs {set(delta.parts)}"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, delta, batch)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert moved <= {by_id[i] for i in trainable}, "only delta and head tensors may change"


def _reloads(spec, a, b, delta, model, batch, tmp_path):
    perturb(delta)
    expected = forward(model, delta, batch)
    save_file({k: v.contiguous() for k, v in delta.state_dict().items()}, str(tmp_path / "d.safetensors"))
    state = load_file(str(tmp_path / "d.safetensors"))
    assert all(k.startswith(("head.", f"{a}.", f"{b}.")) for k in state)
    again, rebuilt = spec.fresh(), deltas.build(composition(a, b, spec))
    rebuilt.attach(again, head=spec.head, restoring=True)
    rebuilt.load_state_dict(state)
    assert (forward(again, rebuilt, batch) - expected).abs().max().item() <= 1e-6


def _same(now: dict, original: dict, skip=()) -> bool:
    tensors = all(torch.equal(now["tensors"][k], v) for k, v in original["tensors"].items()
                  if not any(k == h or k.startswith(h + ".") for h in skip))
    return tensors and now["tensors"].keys() == original["tensors"].keys() and now["modules"] == original["modules"] \
        and now["hooks"] == original["hooks"]
