"""Security: recipes are plain YAML data (no Python objects), checkpoints are never unpickled,
trust_remote_code is off unless a recipe turns it on (and then a warning says so), and nothing in
a checkpoint can make deltafit write outside the directory it was asked to write to.

Each "refused, not executed" test first proves its payload is live: the same bytes, loaded the
unsafe way, do create the marker file.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_one_clean_line, run_cli
from tests.test_malformed import CORPUS, _materialize, _reseal, trained_run  # noqa: F401 (fixture)

MARKER = "pwned"
PICKLE_NAMES = ("delta.bin", "pytorch_model.bin", "adapter_model.bin", "training_args.bin", "optimizer.pt")
# Accelerate's save_state names: what a resume that trusted them would unpickle.
TRAINER_PICKLE_NAMES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin")


class _Touch:
    """Unpickling this calls open(path, 'w'), creating the file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def live_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Touch(marker))


@pytest.fixture()
def recipe(tmp_path, tiny_llama) -> Path:
    """The corpus's valid tiny-Llama recipe (1 step), with its placeholders filled."""
    subs = {"@TINY_LLAMA@": str(tiny_llama), "@VALID@": str(CORPUS / "valid")}
    return _materialize(CORPUS / "valid" / "alpaca.yaml", tmp_path / "recipe.yaml", subs)


@pytest.fixture()
def run(trained_run, tmp_path) -> Path:  # noqa: F811 (the imported fixture)
    """A private copy of the module's tiny trained run: final/ and checkpoints/step-00000001/."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture()
def unpickling(monkeypatch) -> list[str]:
    """Calls of torch.load / pickle.load(s) made while the test runs (none are allowed)."""
    import torch

    calls: list[str] = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
    monkeypatch.setattr(pickle, "load", spy("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", spy("pickle.loads", pickle.loads))
    return calls


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step-00000001"


def _resume_args(run: Path) -> list:
    return ["train", run / "final" / "recipe.yaml", "--output", run, "--resume", _step(run)]


# ----------------------------------------------------------------------------------------------
# Recipes: plain YAML data only


PYTHON_TAGS = [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
    '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    "!!python/name:os.system",
    "!!python/module:os",
]


def test_the_yaml_payload_is_live(tmp_path):
    marker = tmp_path / MARKER
    yaml.unsafe_load(PYTHON_TAGS[0].format(marker=marker))
    assert marker.exists()


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("tag", PYTHON_TAGS, ids=["apply-os.system", "apply-check_call", "new-Popen", "name", "module"])
def test_recipe_python_tags_are_refused_not_executed(recipe, tmp_path, capsys, command, tag):
    marker = tmp_path / MARKER
    recipe.write_text(recipe.read_text() + f"name: {tag.format(marker=marker)}\n")
    args = [command, recipe] + (["--output", tmp_path / "out"] if command == "train" else [])
    code, _, err = run_cli(capsys, *args)
    assert_one_clean_line(code, err, "recipe.yaml", "Python tags are refused")
    assert not marker.exists()


def test_a_python_tag_in_a_set_override_stays_a_string(recipe, tmp_path, capsys):
    marker = tmp_path / MARKER
    code, _, err = run_cli(capsys, "validate", recipe, "--set", f"train.lr={PYTHON_TAGS[0].format(marker=marker)}")
    assert_one_clean_line(code, err, "'train.lr'", "!!python/object/apply:os.system")
    assert not marker.exists()


def test_a_python_tag_in_a_checkpoint_recipe_is_refused(run, tmp_path, capsys):
    marker = tmp_path / MARKER
    path = run / "final" / "recipe.yaml"
    text = path.read_text()
    assert "output_dir: null" in text
    path.write_text(text.replace("output_dir: null", f"output_dir: {PYTHON_TAGS[0].format(marker=marker)}"))
    _reseal(path)  # a consistent checkpoint, so the YAML loader itself is what refuses it
    for args in (["eval", run / "final"], ["merge", run / "final", "--output", tmp_path / "merged"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_clean_line(code, err, "recipe.yaml", "Python tags are refused")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON only, never a pickle


def test_the_planted_pickle_is_live(tmp_path):
    marker = tmp_path / MARKER
    pickle.loads(live_pickle(marker))
    assert marker.exists()


def _plant(directory: Path, marker: Path, names=PICKLE_NAMES) -> None:
    for name in names:
        (directory / name).write_bytes(live_pickle(marker))


@pytest.mark.parametrize("command", ["eval", "merge", "resume"])
def test_pickles_beside_a_checkpoint_are_ignored(run, tmp_path, capsys, unpickling, command):
    marker = tmp_path / MARKER
    _plant(run / "final", marker)
    _plant(_step(run), marker)
    _plant(_step(run) / "trainer", marker, TRAINER_PICKLE_NAMES)
    args = {"eval": ["eval", run / "final"], "merge": ["merge", run / "final", "--output", tmp_path / "merged"],
            "resume": _resume_args(run)}[command]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert not marker.exists()
    assert unpickling == []


@pytest.mark.parametrize("command", ["eval", "merge", "resume"])
def test_a_pickle_in_place_of_the_safetensors_is_refused(run, tmp_path, capsys, unpickling, command):
    marker = tmp_path / MARKER
    targets = ([_step(run) / "trainer" / "state.safetensors"] if command == "resume"
               else [run / "final" / "delta.safetensors"])
    for target in targets:
        target.write_bytes(live_pickle(marker))
        _reseal(target)  # recorded as if written so: the safetensors reader itself must refuse it
    args = {"eval": ["eval", run / "final"], "merge": ["merge", run / "final", "--output", tmp_path / "merged"],
            "resume": _resume_args(run)}[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_clean_line(code, err, targets[0].parent.name)
    assert not marker.exists()
    assert unpickling == []


@pytest.mark.parametrize("command", ["eval", "merge", "resume"])
def test_a_directory_of_pickles_is_refused(run, tmp_path, capsys, unpickling, command):
    marker = tmp_path / MARKER
    (tmp_path / "ckpt").mkdir()
    _plant(tmp_path / "ckpt", marker)
    args = {"eval": ["eval", tmp_path / "ckpt"], "merge": ["merge", tmp_path / "ckpt", "--output", tmp_path / "m"],
            "resume": ["train", run / "final" / "recipe.yaml", "--output", run, "--resume", tmp_path / "ckpt"]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_clean_line(code, err, "ckpt", "never loaded")
    assert not marker.exists()
    assert unpickling == []


# ----------------------------------------------------------------------------------------------
# trust_remote_code


@pytest.fixture()
def hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """(name, kwargs) of every transformers from_pretrained / from_config call."""
    import transformers

    calls = []
    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, cls_name)
        for method in ("from_pretrained", "from_config"):
            real = getattr(cls, method, None)
            if real is None:
                continue

            def spy(*args, _real=real, _name=f"{cls_name}.{method}", **kwargs):
                calls.append((_name, kwargs))
                return _real(*args, **kwargs)

            monkeypatch.setattr(cls, method, spy)
    return calls


@pytest.mark.parametrize("command", ["validate", "train"])
def test_trust_remote_code_is_off_by_default(recipe, tmp_path, capsys, hub_calls, recwarn, command):
    args = [command, recipe] + (["--output", tmp_path / "out"] if command == "train" else [])
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    expected = {"validate": {"AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"},
                "train": {"AutoTokenizer.from_pretrained", "AutoModelForCausalLM.from_pretrained"}}[command]
    assert expected <= {name for name, _ in hub_calls}, hub_calls
    assert all(kwargs.get("trust_remote_code", False) is False for _, kwargs in hub_calls), hub_calls
    assert not [w for w in recwarn if "trust_remote_code" in str(w.message)]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_trust_remote_code_from_the_recipe_is_passed_on_with_a_warning(recipe, tmp_path, capsys, hub_calls, command):
    args = [command, recipe, "--set", "model.trust_remote_code=true"]
    args += ["--output", tmp_path / "out"] if command == "train" else []
    with pytest.warns(UserWarning, match="trust_remote_code is on: code shipped with .* will run"):
        code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert hub_calls and all(kwargs.get("trust_remote_code") is True for _, kwargs in hub_calls), hub_calls


def test_a_checkpoint_recipe_that_trusts_remote_code_warns_on_eval(run, capsys, hub_calls):
    path = run / "final" / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["trust_remote_code"] = True
    path.write_text(yaml.safe_dump(recipe))
    _reseal(path)
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        code, _, err = run_cli(capsys, "eval", run / "final")
    assert code == 0, err


@pytest.mark.slow
def test_the_trust_remote_code_warning_reaches_a_real_terminal(recipe):
    """Outside pytest's warning capture: the user running the CLI sees the warning on stderr."""
    result = subprocess.run([sys.executable, "-m", "deltafit", "validate", str(recipe),
                             "--set", "model.trust_remote_code=true"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "trust_remote_code is on" in result.stderr


# ----------------------------------------------------------------------------------------------
# Paths: a checkpoint cannot choose where deltafit writes


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_checkpoint_paths_cannot_steer_eval_merge_or_resume_outside(run, tmp_path, capsys, monkeypatch):
    """The checkpoint's recipe names '../../evil' as its output_dir (relative to the working
    directory, which sits two levels below tmp_path): eval, merge and resume with --output must
    write only the eval results beside the checkpoint, the merge --output and the resume --output."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for recipe_file in (run / "final" / "recipe.yaml", _step(run) / "recipe.yaml"):
        recipe = yaml.safe_load(recipe_file.read_text())
        recipe["output_dir"] = "../../evil"
        recipe_file.write_text(yaml.safe_dump(recipe))
        _reseal(recipe_file)
    before = _files(tmp_path)
    for args in (["eval", run / "final"], ["merge", run / "final", "--output", tmp_path / "merged"],
                 ["train", run / "final" / "recipe.yaml", "--output", run, "--resume", _step(run)]):
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    written = _files(tmp_path) - before
    allowed = (run, tmp_path / "merged")
    assert written and all(any(p == a or a in p.parents for a in allowed) for p in written), \
        sorted(str(p) for p in written if not any(p == a or a in p.parents for a in allowed))
    assert not (tmp_path / "evil").exists()


def test_a_checkpoint_recipe_naming_a_path_is_refused(run, tmp_path, capsys, monkeypatch):
    """The run name becomes runs/<name> (and tracker log dirs): a name that climbs out is an error."""
    path = run / "final" / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["name"] = "../../evil"
    path.write_text(yaml.safe_dump(recipe))
    _reseal(path)
    code, _, err = run_cli(capsys, "eval", run / "final")
    assert_one_clean_line(code, err, "'name'", "plain run name")
    assert not (run / "final-eval.json").exists()


def test_a_manifest_entry_outside_the_checkpoint_is_not_followed(run, tmp_path, capsys):
    """File names recorded in deltafit.json are checked, never used to reach outside the directory."""
    meta_path = run / "final" / "deltafit.json"
    meta = json.loads(meta_path.read_text())
    (tmp_path / "outside.txt").write_text("secret")
    meta.setdefault("files", {})["../../outside.txt"] = {"bytes": 6, "sha256": "0" * 64}
    meta_path.write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "eval", run / "final")
    assert_one_clean_line(code, err, "outside the checkpoint")
    assert (tmp_path / "outside.txt").read_text() == "secret"
