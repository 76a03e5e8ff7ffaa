"""Method-specific behaviour the generic contract cannot see."""

from __future__ import annotations

import pytest
import torch

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import PAD, forward, load_arch, make_batch, numel, perturb, train_step


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


@pytest.fixture(scope="module")
def llama_cls(tiny_llama):
    """Tiny Llama with a sequence-classification head (pools the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2, pad_token_id=PAD)
    return model.eval()


def build(method: str, **options):
    return deltas.build(validate_delta({"method": method, **options}))


def rows_alone(model, delta, batch) -> list[torch.Tensor]:
    """Logits of each row run on its own, unpadded (what a padded batch must reproduce)."""
    outs = []
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        one = {"input_ids": batch["input_ids"][i][keep][None], "attention_mask": batch["attention_mask"][i][keep][None]}
        outs.append(forward(model, delta, one)[0])
    return outs


# -- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora,scale", [(False, 8 / 4), (True, 8 / 2)])
def test_lora_scale_and_update(llama, rslora, scale):
    model, delta = llama.fresh(), build("lora", r=4, alpha=8, rslora=rslora)
    delta.attach(model)
    perturb(delta)
    host = model.model.layers[0].self_attn.q_proj
    update = host.lora
    assert update.scale == pytest.approx(scale)
    x = torch.randn(2, 5, host.in_features)
    with torch.no_grad():
        expected = x @ host.weight.t() + scale * (x @ update.A.t() @ update.B.t())
        assert torch.allclose(host(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    "targets,layers,expected",
    [
        (["model.layers.0.self_attn.q_proj"], None, ["model.layers.0.self_attn.q_proj"]),  # exact
        (["v_proj"], None, ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]),  # suffix
        (r".*\.layers\.1\.mlp\.(up|down)_proj", None, ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]),
        (["q_proj", "k_proj"], [-1], ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),
        (["q_proj"], [0, -1], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    ],
)
def test_lora_target_modules(llama, targets, layers, expected):
    model, delta = llama.fresh(), build("lora", target_modules=targets, layers=layers)
    delta.attach(model)
    assert sorted(delta.describe_targets()) == sorted(f"{n}.lora" for n in expected)


def test_lora_all_linear_skips_the_output_head(llama):
    model, delta = llama.fresh(), build("lora", target_modules="all-linear")
    delta.attach(model)
    hosts = {n.rsplit(".", 1)[0] for n in delta.describe_targets()}
    linears = {n for n, m in llama.pristine.named_modules() if isinstance(m, torch.nn.Linear)}
    assert hosts == linears - {"lm_head"}
    assert len(hosts) == 2 * 7


@pytest.mark.parametrize(
    "options,message",
    [
        ({"target_modules": ["nope_proj"]}, "matches no module"),
        ({"target_modules": ["q_proj"], "layers": [2]}, "out of range"),
        ({"target_modules": "(unclosed"}, "not a valid regex"),
    ],
)
def test_lora_bad_targets_are_user_errors(llama, options, message):
    with pytest.raises(UserError, match=message):
        build("lora", **options).attach(llama.fresh())


# -- full fine-tuning ----------------------------------------------------------------------------


def test_full_state_is_the_whole_model_and_detach_keeps_training(llama):
    model, delta = llama.fresh(), build("full")
    delta.attach(model)
    assert set(delta.state_dict()) == {n for n, _ in llama.pristine.named_parameters()}
    train_step(model, delta, make_batch("llama"))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.detach()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad != q.requires_grad for p, q in zip(model.parameters(), llama.pristine.parameters()))


def test_full_with_head_lists_each_tensor_once(bert):
    model, delta = bert.fresh(), build("full")
    delta.attach(model, head=bert.head)
    assert len({id(p) for p in delta.trainable_parameters().values()}) == len(delta.trainable_parameters())
    assert not any(k.startswith("head.") for k in delta.state_dict())  # head tensors already under their names


# -- BitFit --------------------------------------------------------------------------------------


def test_bitfit_refuses_llama_with_a_clear_message(llama):
    with pytest.raises(UserError, match="no bias terms"):
        build("bitfit").attach(llama.fresh())


def test_bitfit_trains_every_bias(bert):
    model, delta = bert.fresh(), build("bitfit")
    delta.attach(model, head=bert.head)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(delta.delta_parameters()) == biases
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in biases


def test_bitfit_subset_is_query_and_middle_of_mlp_bias(bert):
    model, delta = bert.fresh(), build("bitfit", subset=True)
    delta.attach(model, head=bert.head)
    assert sorted(delta.delta_parameters()) == sorted(
        f"bert.encoder.layer.{i}.{m}.bias" for i in range(2) for m in ("attention.self.query", "intermediate.dense")
    )  # hidden 32, intermediate 64, 2 blocks
    assert numel(delta.delta_parameters().values()) == 2 * (32 + 64) == delta.expected_trainable_params(bert.pristine)


def test_bitfit_merge_keeps_trained_biases_detach_restores_them(bert):
    batch = make_batch("bert")
    for merge in (True, False):
        model, delta = bert.fresh(), build("bitfit")
        delta.attach(model, head=bert.head)
        train_step(model, delta, batch)
        trained = forward(model, delta, batch)
        delta.merge() if merge else delta.detach()
        after = model.bert.encoder.layer[0].attention.self.query.bias
        original = bert.pristine.bert.encoder.layer[0].attention.self.query.bias
        assert torch.equal(after, original) != merge
        assert torch.equal(forward(model, None, batch), trained) == merge


# -- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,per_block",
    [({"variant": "houlsby"}, 2), ({"variant": "pfeiffer"}, 1)],
)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adapter_param_count_is_2md_m_d_per_adapter(request, arch, options, per_block):
    spec = request.getfixturevalue(arch)
    model, delta = spec.fresh(), build("adapter", bottleneck=8, train_layernorms=False, **options)
    delta.attach(model, head=spec.head)
    d, m, blocks = 32, 8, 2
    assert numel(delta.delta_parameters().values()) == blocks * per_block * (2 * m * d + m + d)
    assert len(delta.describe_targets()) == blocks * per_block


def test_adapter_hosts_on_bert_are_exact(bert):
    model, delta = bert.fresh(), build("adapter", reduction_factor=4, train_layernorms=False)
    delta.attach(model, head=bert.head)
    assert sorted(delta.describe_targets()) == sorted(
        f"bert.encoder.layer.{i}.{h}.adapter" for i in range(2) for h in ("attention.output.dense", "output.dense")
    )
    assert model.bert.encoder.layer[0].output.dense.adapter.down.out_features == 32 // 4


def test_adapter_layernorms_train_and_are_restored(bert, llama):
    norms = {
        "bert": {f"bert.encoder.layer.{i}.{n}.LayerNorm.{w}" for i in range(2) for n in ("attention.output", "output")
                 for w in ("weight", "bias")},
        "llama": {f"model.layers.{i}.{n}.weight" for i in range(2)
                  for n in ("input_layernorm", "post_attention_layernorm")},
    }
    for spec in (bert, llama):
        model, delta = spec.fresh(), build("adapter", bottleneck=4)
        delta.attach(model, head=spec.head)
        trained = {n for n in delta.delta_parameters() if ".adapter." not in n}
        assert trained == norms[spec.name]
        perturb(delta)
        delta.detach()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), spec.pristine.state_dict().values()))


def test_adapter_size_options_are_exclusive():
    with pytest.raises(UserError, match="bottleneck or reduction_factor"):
        validate_delta({"method": "adapter", "bottleneck": 8, "reduction_factor": 16})


# -- prefix tuning -------------------------------------------------------------------------------


def test_prefix_cache_has_gqa_shape(llama):
    model, delta = llama.fresh(), build("prefix", num_virtual_tokens=5, hidden=16)
    delta.attach(model)
    cache = delta.prepare_inputs(make_batch("llama"))["past_key_values"]
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    assert kv_heads < config.num_attention_heads  # the tiny Llama uses GQA
    assert len(cache.layers) == config.num_hidden_layers
    assert tuple(cache.layers[0].keys.shape) == (3, kv_heads, 5, head_dim)


@pytest.mark.parametrize("reparameterize", [True, False])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prefix_padded_batch_matches_rows_alone(request, arch, reparameterize):
    """Left- and right-padded rows give the logits the same row gives unpadded (mask and positions right)."""
    spec = request.getfixturevalue(arch)
    model, delta = spec.fresh(), build("prefix", num_virtual_tokens=4, hidden=16, reparameterize=reparameterize)
    delta.attach(model, head=spec.head)
    batch = make_batch(arch)
    padded = forward(model, delta, batch)
    alone = rows_alone(model, delta, batch)
    if arch == "llama":  # token logits of the real positions, rows padded right (1) and left (2)
        for i in range(3):
            assert torch.allclose(padded[i][batch["attention_mask"][i].bool()], alone[i], atol=1e-5), f"row {i}"
    else:  # BERT pools position 0, so it is only ever right-padded (row 1); row 2 is left-padded
        for i in range(2):
            assert torch.allclose(padded[i], alone[i], atol=1e-5), f"row {i}"
    assert not torch.allclose(padded, forward(spec.pristine, None, batch))  # and the prefix is used


def test_prefix_takes_no_positions_on_bert(bert):
    """The prefix sits in the cache; BERT would otherwise number the tokens from p (wrong embeddings)."""
    model, delta = bert.fresh(), build("prefix", num_virtual_tokens=4, hidden=16)
    delta.attach(model, head=bert.head)
    seen = []
    hook = model.bert.embeddings.position_embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        batch = make_batch("bert")
        prepared = delta.prepare_inputs(batch)
        model(**prepared)
    finally:
        hook.remove()
    assert prepared["attention_mask"].shape == (3, 4 + 7) and (prepared["attention_mask"][:, :4] == 1).all()
    assert seen[0][0].tolist() == list(range(7))  # unpadded row: 0..T-1, exactly as the base numbers it
    assert seen[0][1].tolist()[:4] == [0, 1, 2, 3]  # right-padded row: real tokens from 0


def test_prefix_direct_count_and_checkpointing_refused(llama):
    model, delta = llama.fresh(), build("prefix", num_virtual_tokens=6, reparameterize=False)
    delta.attach(model)
    config = model.config
    d_kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert numel(delta.delta_parameters().values()) == 6 * 2 * config.num_hidden_layers * d_kv
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    with pytest.raises(UserError, match="gradient checkpointing"):
        delta.prepare_inputs(make_batch("llama"))


# -- prompt tuning -------------------------------------------------------------------------------


def test_prompt_masks_labels_and_extends_the_mask(llama):
    model, delta = llama.fresh(), build("prompt", num_virtual_tokens=3)
    delta.attach(model)
    batch = make_batch("llama")
    prepared = delta.prepare_inputs(batch)
    assert "input_ids" not in prepared and prepared["inputs_embeds"].shape[:2] == (3, 3 + 7)
    labels, mask = prepared["labels"], prepared["attention_mask"]
    assert (labels[:, :3] == -100).all() and (mask[:, :3] == 1).all()
    # Row 1 was right-padded by 3: now [prompt][3 pads][4 tokens], and the first token is never a target.
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    real = batch["labels"][1][batch["attention_mask"][1].bool()]
    assert labels[1, 6:].tolist() == [-100] + real[1:].tolist()
    assert torch.equal(prepared["inputs_embeds"][1, 6], model.get_input_embeddings()(batch["input_ids"][1, :1])[0])
    # Same set of loss terms as the base: the loss is finite and reaches the prompt.
    loss = model(**prepared).loss
    loss.backward()
    assert delta.delta_parameters()["delta_prompt.weight"].grad.abs().sum() > 0


def test_prompt_on_llama_classifier_pools_the_last_real_token(llama_cls):
    """Llama pools the last non-pad token, which it cannot see in inputs_embeds: right padding must not leak."""
    model, delta = llama_cls, build("prompt", num_virtual_tokens=4, init="random")
    delta.attach(model, head=["score"])
    try:
        batch = make_batch("llama")
        batch["labels"] = torch.tensor([0, 1, 1])
        padded = forward(model, delta, batch)
        for i, alone in enumerate(rows_alone(model, delta, batch)):
            assert torch.allclose(padded[i], alone, atol=1e-5), f"row {i}"
    finally:
        delta.detach()


@pytest.mark.parametrize("init", ["vocab", "text"])
def test_prompt_init_copies_token_embeddings(llama, tiny_llama, init):
    from transformers import AutoTokenizer

    model = llama.fresh()
    options = {"init_text": "the cat sat on the mat"} if init == "text" else {}
    delta = build("prompt", num_virtual_tokens=8, init=init, **options)
    if init == "text":
        delta.tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    delta.attach(model)
    table = model.get_input_embeddings().weight
    prompt = delta.delta_parameters()["delta_prompt.weight"]
    rows = [int(torch.where((table == row).all(1))[0][0]) for row in prompt]
    if init == "text":
        ids = delta.tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
        assert rows == (ids * 8)[:8]


def test_prompt_text_init_needs_text():
    with pytest.raises(UserError, match="init_text"):
        validate_delta({"method": "prompt", "init": "text"})
