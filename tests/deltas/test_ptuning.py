"""P-Tuning (v1: virtual tokens from an LSTM/MLP prompt encoder) and P-Tuning v2 (prefix tuning
trained directly): what makes each of them that method. The generic contract is in test_contract.py."""

from __future__ import annotations

import json

import pytest
import torch

from deltafit import checkpoint, deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import forward, load_arch, make_batch, numel, perturb, train_step

TOLERANCE = 1e-5  # fp32 on CPU, as tests/test_peft_interop.py
ENCODERS = ["lstm", "mlp"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


def build(method: str, **options):
    return deltas.build(validate_delta({"method": method, **options}))


def attached(spec, method: str = "ptuning", seed: int = 0, **options):
    model, delta = spec.fresh(), build(method, **options)
    torch.manual_seed(seed)
    delta.attach(model, head=spec.head)
    return model, delta


def encoder_of(delta):
    return delta.insertions.hosts["delta_ptuning"][2]


# -- P-Tuning: the encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_prompt_encoder_is_what_trains(llama, encoder):
    """The trainable set is exactly the encoder (its embedding and heads), with no prompt table beside
    it, and one step moves the heads too: the virtual tokens really come out of the encoder."""
    model, delta = attached(llama, encoder=encoder, num_virtual_tokens=4, encoder_hidden_size=8)
    module = encoder_of(delta)
    assert {id(p) for p in delta.trainable_parameters().values()} == {id(p) for p in module.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in module.parameters()}
    heads = {"lstm": (torch.nn.LSTM, "lstm_head"), "mlp": (torch.nn.Sequential, "mlp_head")}[encoder]
    assert isinstance(getattr(module, heads[1]), heads[0])
    if encoder == "lstm":
        assert module.lstm_head.bidirectional and module.lstm_head.num_layers == 2
        assert module.lstm_head.hidden_size == 8
    before = {n: p.detach().clone() for n, p in delta.delta_parameters().items()}
    got_grad = train_step(model, delta, make_batch("llama"))
    assert {id(p) for p in module.parameters()} <= got_grad
    assert all(not torch.equal(p, before[n]) for n, p in delta.delta_parameters().items())
    assert any(".lstm_head." in n or ".mlp_head." in n for n in before)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_is_peft_prompt_encoder(llama, encoder):
    """Same parameters (names and shapes) and the same output as PEFT's PromptEncoder given the same
    tensors: a checkpoint's encoder is PEFT's, and its output is what PEFT would save."""
    from peft import PromptEncoder, PromptEncoderConfig

    model, delta = attached(llama, encoder=encoder, num_virtual_tokens=5, encoder_hidden_size=12)
    perturb(delta)
    ours = encoder_of(delta)
    theirs = PromptEncoder(PromptEncoderConfig(
        peft_type="P_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=32, num_transformer_submodules=1,
        num_attention_heads=4, num_layers=2, encoder_reparameterization_type=encoder.upper(), encoder_hidden_size=12))
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(), theirs(torch.arange(5)[None])[0], atol=1e-6)
    assert numel(delta.delta_parameters().values()) == delta.expected_trainable_params(llama.fresh())


def test_lstm_couples_the_virtual_tokens(llama):
    """Through the bidirectional LSTM, changing one input embedding changes every virtual token; the
    MLP maps each token on its own."""
    for encoder, coupled in [("lstm", True), ("mlp", False)]:
        _, delta = attached(llama, encoder=encoder, num_virtual_tokens=4, encoder_hidden_size=8)
        module = encoder_of(delta).eval()
        with torch.no_grad():
            before = module()
            module.embedding.weight[0] += 1.0
            after = module()
        changed = [not torch.allclose(after[i], before[i]) for i in range(4)]
        assert changed == ([True] * 4 if coupled else [True, False, False, False]), encoder


# -- P-Tuning: the virtual tokens in the input ----------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
def test_virtual_tokens_go_in_front_and_out_of_the_loss(llama, encoder):
    model, delta = attached(llama, encoder=encoder, num_virtual_tokens=3, encoder_hidden_size=8)
    batch = make_batch("llama")
    prepared = delta.prepare_inputs(batch)
    embeds, labels, mask = prepared["inputs_embeds"], prepared["labels"], prepared["attention_mask"]
    assert "input_ids" not in prepared and embeds.shape[:2] == (3, 3 + 7)
    with torch.no_grad():
        tokens = encoder_of(delta)()
    for row in range(3):  # every row starts with the encoder's output
        assert torch.allclose(embeds[row, :3], tokens)
    assert torch.equal(embeds[0, 3:], model.get_input_embeddings()(batch["input_ids"][0]))  # then the input
    assert (labels[:, :3] == -100).all() and (mask[:, :3] == 1).all()
    # The loss is the base's loss terms only: the real tokens after the first, none of the virtual ones.
    real = batch["labels"][0][batch["attention_mask"][0].bool()]
    assert labels[0, 3:].tolist() == [-100] + real[1:].tolist()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fresh_attach_changes_the_output(request, arch, encoder):
    spec = request.getfixturevalue(arch)
    model, delta = attached(spec, encoder=encoder, num_virtual_tokens=4)
    assert delta.zero_init_identity is False and not delta.mergeable and not delta.supports_packing
    batch = make_batch(arch)
    out, base = forward(model, delta, batch), forward(spec.pristine, None, batch)
    if arch == "llama":
        out = out[:, 4:]  # the real tokens' logits (rows without left padding keep their layout)
        assert not torch.allclose(out[0], base[0], atol=1e-4)
    else:
        assert not torch.allclose(out, base, atol=1e-4)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_both_encoders_learn(llama, encoder):
    """A few AdamW steps on one batch lower its loss through either encoder."""
    model, delta = attached(llama, encoder=encoder, num_virtual_tokens=4, encoder_hidden_size=16)
    batch = make_batch("llama")
    optimizer = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**delta.prepare_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_runs_in_fp32_under_autocast(llama, encoder, dtype):
    """Mixed precision (Accelerate's autocast): the encoder stays fp32 (CPU has no fp16 LSTM kernel)
    and the step gives finite gradients to all of it."""
    model, delta = attached(llama, encoder=encoder, num_virtual_tokens=4, encoder_hidden_size=8)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        assert encoder_of(delta)().dtype == torch.float32
        loss = model(**delta.prepare_inputs(make_batch("llama"))).loss
    loss.backward()
    grads = [p.grad for p in delta.delta_parameters().values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("options, key", [
    ({"encoder": "mlp", "encoder_num_layers": 3}, "encoder_num_layers"),
    ({"encoder": "mlp", "encoder_dropout": 0.1}, "encoder_dropout"),
    ({"encoder": "none", "encoder_hidden_size": 64}, "encoder_hidden_size"),
    ({"encoder": "gru"}, "delta.encoder"),
])
def test_options_that_do_not_fit_the_encoder_are_refused(options, key):
    with pytest.raises(UserError, match=key) as err:
        validate_delta({"method": "ptuning", **options})
    assert "\n" not in str(err.value)


# -- P-Tuning: PEFT round trip ---------------------------------------------------------------------


def _train(tmp_path, capsys, model_dir, delta: dict, steps: int = 2):
    from tests.helpers import run_cli, write_recipe

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
                                for i in range(16)]))
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dir, {"train": str(data), "format": "alpaca"}, delta,
                          train={"max_steps": steps, "batch_size": 4, "lr": 2e-2})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run" / "final"


def _deltafit_model(path):
    from deltafit.loading import attach_from_checkpoint, load_source, source_recipe
    from deltafit.model import build_model

    directory, meta, tensors = load_source(str(path))
    model, _, _ = build_model(source_recipe(directory, meta).model)
    return model.eval(), attach_from_checkpoint(model, meta, tensors), meta


def _logits(model, delta, batch):
    with torch.no_grad():
        return model(**(delta.prepare_inputs(dict(batch)) if delta is not None else batch)).logits


def _real_token_logits(model, delta, batch, p: int = 4):
    """(real tokens, vocab) logits, row by row, whichever layout put the prompt in front (deltafit's
    prepared mask, or PEFT's: the batch's mask after p prompt positions)."""
    mask = delta.prepare_inputs(dict(batch))["attention_mask"] if delta is not None else batch["attention_mask"]
    return _logits(model, delta, batch)[:, p:][mask[:, -batch["attention_mask"].shape[1]:].bool()]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_peft_round_trip(tmp_path, capsys, tiny_llama, encoder):
    """Train with the CLI, export as P_TUNING, load in real peft (same logits), import back (same logits)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from deltafit.peft_io import export_checkpoint

    final = _train(tmp_path, capsys, tiny_llama, {"method": "ptuning", "encoder": encoder, "num_virtual_tokens": 4,
                                                 "encoder_hidden_size": 16})
    model, delta, _ = _deltafit_model(final)
    assert checkpoint.read_meta(final)["delta_config"]["encoder"] == encoder
    stored = load_file(str(final / "delta.safetensors"))
    assert any(".lstm_head." in k or ".mlp_head." in k for k in stored)  # the checkpoint holds the encoder

    export_checkpoint(str(final), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["num_virtual_tokens"] == 4 and config["inference_mode"]
    assert config["encoder_reparameterization_type"] == encoder.upper() and config["encoder_hidden_size"] == 16
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(adapter) == {"prompt_embeddings"} and adapter["prompt_embeddings"].shape == (4, 32)

    torch.manual_seed(1234)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter").eval()
    # Rows without left padding (see prompt.py): row 0 unpadded, row 1 right-padded. PEFT lays a row
    # out [prompt][tokens][padding], deltafit [prompt][padding][tokens]: compare the real tokens' logits.
    batch = {k: v[:2] for k, v in make_batch("llama").items() if k != "labels"}
    ours = _real_token_logits(model, delta, batch)
    assert (_real_token_logits(theirs, None, batch) - ours).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():  # the adapter matters, so equal logits mean something
        assert (_logits(theirs, None, batch)[batch["attention_mask"].bool()] - ours).abs().max().item() > 1e-3

    imported, imported_delta, meta = _deltafit_model(tmp_path / "adapter")
    assert meta["method"] == "ptuning" and meta["delta_config"]["encoder"] == "none"
    assert (_real_token_logits(imported, imported_delta, batch) - ours).abs().max().item() <= TOLERANCE
    assert torch.allclose(encoder_of(imported_delta)(), adapter["prompt_embeddings"])


def test_peft_multi_stack_adapter_is_refused():
    from deltafit.deltas.ptuning import PTuning

    with pytest.raises(UserError, match="single-stack"):
        PTuning.from_peft({"num_transformer_submodules": 2}, {"prompt_embeddings": torch.zeros(8, 32)}, None)


# -- P-Tuning v2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_ptuning_v2_is_prefix_without_reparameterization(request, arch):
    """Same tensors (names, shapes, values) and same logits as prefix with reparameterize: false, from
    the same seed, before and after one training step."""
    spec = request.getfixturevalue(arch)
    model_a, v2 = attached(spec, "ptuning-v2", num_virtual_tokens=6)
    model_b, prefix = attached(spec, "prefix", num_virtual_tokens=6, reparameterize=False)
    assert v2.expected_trainable_params(spec.pristine) == prefix.expected_trainable_params(spec.pristine)
    a, b = v2.state_dict(), prefix.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list(a) == ["delta_prefix.embedding.weight"] + [k for k in a if k.startswith("head.")]
    batch = make_batch(arch)
    assert torch.equal(forward(model_a, v2, batch), forward(model_b, prefix, batch))
    for model, delta in [(model_a, v2), (model_b, prefix)]:
        torch.manual_seed(1)  # BERT's dropout draws in training mode
        train_step(model, delta, batch)
    assert torch.equal(forward(model_a, v2, batch), forward(model_b, prefix, batch))


def test_ptuning_v2_options_and_peft_export(llama):
    config = validate_delta({"method": "ptuning-v2"})
    assert config.num_virtual_tokens == 20 and config.reparameterize is False
    with pytest.raises(UserError, match="delta.hidden"):
        validate_delta({"method": "ptuning-v2", "hidden": 512})  # no MLP to size
    with pytest.raises(UserError, match="delta.reparameterize"):
        validate_delta({"method": "ptuning-v2", "reparameterize": True})  # that is 'prefix'
    cls = deltas.get("ptuning-v2")
    assert cls.peft_type == "PREFIX_TUNING" and not cls.mergeable and cls.family == "addition"
    _, v2 = attached(llama, "ptuning-v2", num_virtual_tokens=3)
    perturb(v2)
    prefix_config = validate_delta({"method": "prefix", "num_virtual_tokens": 3, "reparameterize": False})
    config_of = lambda: llama.pristine.config  # noqa: E731
    ours = cls.to_peft(v2.config, v2.state_dict(), config_of)
    theirs = deltas.get("prefix").to_peft(prefix_config, v2.state_dict(), config_of)
    assert ours[0] == theirs[0] and torch.equal(ours[1]["prompt_embeddings"], theirs[1]["prompt_embeddings"])
    assert ours[0]["prefix_projection"] is False
    back, state = cls.from_peft({**ours[0]}, ours[1], config_of)
    assert validate_delta(back).method == "ptuning-v2" and set(state) == {"delta_prefix.embedding.weight"}
