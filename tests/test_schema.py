"""`deltafit schema`: the recipe JSON Schema, with every method's options, that real recipes satisfy.

jsonschema is no dependency of deltafit, so `schema_problems` below checks what an editor's YAML
language server checks (keys, required keys, types, enums and constants, bounds, list sizes, the delta
union); when jsonschema happens to be installed, recipes are validated with it as well.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltafit.deltas import METHODS, config_class
from tests.helpers import assert_one_clean_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema():
    from deltafit.recipe import recipe_schema

    return recipe_schema()


# ----------------------------------------------------------------------------------------------
# A small JSON Schema checker (the keywords pydantic's schemas use)

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float))
    return isinstance(value, TYPES[kind])


def schema_problems(value, node: dict, root: dict, at: str = "recipe") -> list[str]:
    """What is wrong with `value` against `node`; [] when it is valid."""
    node = _resolve(node, root)
    if "oneOf" in node:
        fits = [i for i, branch in enumerate(node["oneOf"]) if not schema_problems(value, branch, root, at)]
        return [] if len(fits) == 1 else [f"{at}: fits {len(fits)} of the oneOf branches, not exactly one"]
    if "anyOf" in node and all(schema_problems(value, branch, root, at) for branch in node["anyOf"]):
        return [f"{at}: fits none of the anyOf branches ({value!r})"]
    if "type" in node and not _is(value, node["type"]):
        return [f"{at}: {value!r} is not of type {node['type']}"]
    if "const" in node and value != node["const"]:
        return [f"{at}: {value!r} is not {node['const']!r}"]
    if "enum" in node and value not in node["enum"]:
        return [f"{at}: {value!r} is not one of {node['enum']}"]
    problems = _bound_problems(value, node, at)
    if isinstance(value, list) and len(value) < node.get("minItems", 0):
        problems.append(f"{at}: fewer than {node['minItems']} items")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            problems += schema_problems(item, node["items"], root, f"{at}[{i}]")
    if isinstance(value, dict):
        problems += _object_problems(value, node, root, at)
    return problems


def _bound_problems(value, node: dict, at: str) -> list[str]:
    if not _is(value, "number"):
        return []
    checks = {"minimum": value >= node.get("minimum", value), "maximum": value <= node.get("maximum", value),
              "exclusiveMinimum": "exclusiveMinimum" not in node or value > node["exclusiveMinimum"],
              "exclusiveMaximum": "exclusiveMaximum" not in node or value < node["exclusiveMaximum"]}
    return [f"{at}: {value!r} breaks {name}" for name, ok in checks.items() if not ok]


def _object_problems(value: dict, node: dict, root: dict, at: str) -> list[str]:
    problems = [f"{at}: required key '{key}' is missing" for key in node.get("required", []) if key not in value]
    properties = node.get("properties", {})
    for key, item in value.items():
        if key in properties:
            problems += schema_problems(item, properties[key], root, f"{at}.{key}")
        elif not any(re.search(pattern, key) for pattern in node.get("patternProperties", {})) and \
                node.get("additionalProperties", True) is False:
            problems.append(f"{at}: unknown key '{key}'")
    return problems


# ----------------------------------------------------------------------------------------------
# The command


def test_schema_prints_json_and_output_writes_the_same(tmp_path, capsys, schema):
    code, out, err = run_cli(capsys, "schema")
    assert code == 0, err
    assert json.loads(out) == schema and schema["title"] == "Recipe"
    target = tmp_path / "sub" / "recipe.schema.json"
    code, printed, err = run_cli(capsys, "schema", "--output", target)
    assert code == 0 and printed == "" and str(target) in err
    assert target.read_text() == out


def test_schema_output_must_be_a_file(tmp_path, capsys):
    code, out, err = run_cli(capsys, "schema", "--output", tmp_path)
    assert_one_clean_line(code, err, "--output", "is a directory", out=out)


def test_schema_help_imports_no_torch():
    code = ("import contextlib, io, sys\nfrom deltafit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['schema', '--help'])\n    except SystemExit:\n        pass\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), 'heavy import'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------------------
# Content


def test_delta_is_a_union_of_every_registered_method_with_all_its_options(schema):
    one, many = schema["properties"]["delta"]["anyOf"]  # one method's section, or a list of them
    assert many["type"] == "array" and many["items"] == one and many["minItems"] == 1
    delta = _resolve(one, schema)
    mapping = delta["discriminator"]["mapping"]
    assert delta["discriminator"]["propertyName"] == "method" and set(mapping) == set(METHODS)
    assert len(delta["oneOf"]) == len(METHODS)
    for name, ref in mapping.items():
        branch = _resolve({"$ref": ref}, schema)
        assert branch["properties"]["method"]["const"] == name
        assert set(branch["properties"]) == set(config_class(name).model_fields), name
    lora = _resolve({"$ref": mapping["lora"]}, schema)
    assert lora["properties"]["r"]["type"] == "integer" and lora["properties"]["r"]["minimum"] == 1


def test_data_section_documents_the_new_keys(schema):
    data = schema["$defs"]["DataSpec"]["properties"]
    assert "conversations" in data["messages_column"]["description"]
    assert data["columns"]["anyOf"][0] == {"items": {"type": "string"}, "minItems": 1, "type": "array"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_in_recipes_satisfies_the_schema(recipe, schema):
    raw = yaml.safe_load(recipe.read_text())
    assert schema_problems(raw, schema, schema) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(raw, schema)


@pytest.mark.parametrize("change, problem", [
    ({"delta": {"method": "lora", "rank": 8}}, "recipe.delta: fits none"),  # PEFT's name for r
    ({"delta": {"method": "prefix", "r": 8}}, "recipe.delta: fits none"),  # an option of another method
    ({"delta": {"method": "no-such-method"}}, "recipe.delta: fits none"),
    ({"train": {"lr": -1.0}}, "recipe.train.lr: -1.0 breaks exclusiveMinimum"),
    ({"data": {"train": "x.json", "format": "sharegpt"}}, "recipe.data.format: 'sharegpt' is not one of"),
    ({"data": {"format": "chat"}}, "recipe.data: required key 'train' is missing"),
    ({"trainer": {}}, "recipe: unknown key 'trainer'"),
])
def test_the_schema_refuses_what_deltafit_refuses(schema, change, problem):
    raw = {"model": {"name": "m"}, "data": {"train": "x.json"}, **change}
    problems = schema_problems(raw, schema, schema)
    assert any(problem in p for p in problems), problems


def test_method_may_be_left_out_only_for_lora(schema):
    """Without `method` the section is LoRA's (as for deltafit); no other branch may claim it."""
    base = {"model": {"name": "m"}, "data": {"train": "x.json"}, "x-anchors": {"lr": 1}}
    assert schema_problems({**base, "delta": {"r": 4, "alpha": 8}}, schema, schema) == []
    assert schema_problems({**base, "delta": {}}, schema, schema) == []
    assert schema_problems({**base, "delta": {"method": "dora", "r": 4}}, schema, schema) == []
    assert schema_problems({**base, "delta": {"num_virtual_tokens": 8}}, schema, schema) != []  # prefix's key


def test_a_list_of_sections_is_a_composition(schema):
    base = {"model": {"name": "m"}, "data": {"train": "x.json"}}
    good = [{"method": "lora", "r": 4, "name": "a", "lr": 1e-3}, {"method": "bitfit", "weight_decay": 0.0}]
    assert schema_problems({**base, "delta": good}, schema, schema) == []
    assert schema_problems({**base, "delta": []}, schema, schema) != []  # an empty list combines nothing
    bad = [{"method": "lora", "rank": 4}, {"method": "bitfit"}]
    assert any("recipe.delta" in p for p in schema_problems({**base, "delta": bad}, schema, schema))
