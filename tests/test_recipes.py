"""Every shipped recipe validates, and recipe errors name the key and what would be valid."""

from pathlib import Path

import pytest

from deltafit.errors import UserError
from deltafit.recipe import apply_override, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
LORA_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lora.yaml"


def test_there_are_recipes_for_every_method():
    from deltafit.deltas import METHODS

    names = {p.stem for p in RECIPES}
    assert {"quickstart", "glue-sst2-minilm-lora"} <= names
    assert set(METHODS) <= names, f"missing recipes: {set(METHODS) - names}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    from deltafit.recipe import recipe_from_dict

    recipe = load_recipe(path)
    written = recipe.to_dict()
    assert recipe_from_dict(written).to_dict() == written  # what a checkpoint's recipe.yaml holds reads back
    sections = written["delta"] if isinstance(written["delta"], list) else [written["delta"]]
    assert all(section["method"] for section in sections)
    assert recipe.model.name


def test_override_changes_type_checked_values(tmp_path):
    recipe = load_recipe(LORA_RECIPE, ["train.lr=1e-4", "delta.method=lora", "delta.r=16", "data.max_length=64"])
    assert recipe.train.lr == 1e-4 and recipe.delta.r == 16 and recipe.data.max_length == 64


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr"),
    ("train.lrr=1", "did you mean 'lr'"),
    ("delta.rank=4", "did you mean 'r'"),
    ("delta.method=lorra", "did you mean 'lora'"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.task=translation", "model.task"),
    ("modl.name=x", "did you mean 'model'"),
])
def test_bad_override_is_a_one_line_user_error(override, message):
    with pytest.raises(UserError) as err:
        load_recipe(LORA_RECIPE, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_set_without_equals_is_rejected():
    with pytest.raises(UserError, match="section.key=value"):
        apply_override({}, "train.lr")


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(bad)


def test_yaml_cannot_name_python_objects(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("text", ["model: !!set [a]\n", "model: !!omap x\n", "!!set a\n"])
def test_a_yaml_tag_on_the_wrong_kind_of_node_is_a_user_error(tmp_path, text):
    """A set or ordered-map tag on a list or a scalar (found by the slow fuzz suite: a ValueError
    traceback from the duplicate-key check) is invalid YAML, said in one line."""
    bad = tmp_path / "tagged.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match="not valid YAML") as err:
        load_recipe(bad)
    assert "\n" not in str(err.value)
