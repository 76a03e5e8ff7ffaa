"""The malformed-input corpus (tests/malformed/): every broken recipe, data file and checkpoint
gives exit code 2 and exactly one stderr line, `error: <message>`, naming the key, file or value
and what would be valid, with no traceback.

Cases run through the real CLI entry point in this process. Warnings raised during a run count as
stderr lines (a real process prints them), so a case that warns is not a clean error. The tally
(inputs, runs, clean runs) is printed at the end of the module's tests.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from deltafit.cli import main
from tests.helpers import report_line

CORPUS = Path(__file__).parent / "malformed"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
MIN_INPUTS = 40
ABSENT = "missing.json"  # the one data case whose point is that the file is not there


@dataclass
class Case:
    id: str
    kind: str  # recipe | data | checkpoint
    input: str  # the broken input: a corpus file, or a checkpoint damage
    args: list[str]
    expect: list[str]
    damage: str | None = None


@dataclass
class Outcome:
    code: int | None
    out: str
    err_lines: list[str]
    crash: str | None = None
    problems: list[str] = field(default_factory=list)


def _recipe_cases() -> list[Case]:
    cases = []
    for name, expect in MANIFEST["recipes"].items():
        for command in ("validate", "train"):
            args = [command, "{file}"] + (["--output", "{tmp}/out"] if command == "train" else [])
            cases.append(Case(f"recipe/{name}[{command}]", "recipe", f"recipes/{name}", args, expect))
    return cases


def _data_cases() -> list[Case]:
    cases = []
    for name, spec in MANIFEST["data"].items():
        sets = [a for s in spec.get("set", ["data.train={file}"]) for a in ("--set", s)]
        for command in spec.get("commands", ["validate", "train"]):
            args = [command, f"{{valid}}/{spec.get('recipe', 'alpaca')}.yaml", *sets]
            args += ["--output", "{tmp}/out"] if command == "train" else []
            cases.append(Case(f"data/{name}[{command}]", "data", f"data/{name}", args, spec["expect"]))
    return cases


def _checkpoint_cases() -> list[Case]:
    cases = []
    for c in MANIFEST["checkpoints"]:
        name = c.get("input", c["damage"])
        cases.append(Case(f"checkpoint/{name}[{c['args'][0]}]", "checkpoint", f"checkpoint:{name}", c["args"],
                          c["expect"], c["damage"]))
    return cases


CASES = _recipe_cases() + _data_cases() + _checkpoint_cases()
TALLY: dict[str, tuple[str, bool, bool]] = {}  # case id -> (input, clean exit?, message names it?)


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny trained run (with a step checkpoint) to damage, and a second, wider base model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama) -> Path:
    """A 2-step LoRA run of the tiny Llama: final/ plus checkpoints/step-00000001 (with trainer/)."""
    root = tmp_path_factory.mktemp("malformed-run")
    recipe = _materialize(CORPUS / "valid" / "alpaca.yaml", root / "recipe.yaml", {"@TINY_LLAMA@": str(tiny_llama),
                          "@VALID@": str(CORPUS / "valid")})
    code = _run_main(["train", str(recipe), "--output", str(root / "run"), "--set", "train.max_steps=2",
                      "--set", "train.save_every=1", "--set", "data.eval_fraction=0.25"])
    assert code == 0
    return root / "run"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_llama) -> Path:
    """Same tokenizer and architecture as tiny_llama, hidden size 48 instead of 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("wide-llama")
    for f in tiny_llama.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, directory / f.name)
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.hidden_size, config.intermediate_size = 48, 96
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def report_tally(request):
    """Print how many corpus runs were tried and how many gave a clean error."""
    yield
    if not TALLY:
        return
    inputs = {i for i, _, _ in TALLY.values()}
    clean = inputs - {i for i, ok, _ in TALLY.values() if not ok}
    named = inputs - {i for i, ok, says in TALLY.values() if not (ok and says)}
    line = (f"malformed corpus: {len(inputs)} inputs tried, {len(clean)} give a clean one-line exit-2 error, "
            f"{len(named)} of them also say what the case expects ({len(TALLY)} runs: "
            f"{sum(ok for _, ok, _ in TALLY.values())} clean, "
            f"{sum(ok and says for _, ok, says in TALLY.values())} fully)")
    report_line(request, line)


# ----------------------------------------------------------------------------------------------
# The corpus


def test_corpus_has_at_least_40_distinct_inputs():
    inputs = {c.input for c in CASES}
    assert len(inputs) >= MIN_INPUTS, len(inputs)
    assert {c.kind for c in CASES} == {"recipe", "data", "checkpoint"}


def test_every_corpus_file_is_a_case_and_every_case_file_exists():
    on_disk = {f"{d}/{p.name}" for d in ("recipes", "data") for p in (CORPUS / d).iterdir()}
    listed = {c.input for c in CASES if c.kind != "checkpoint"}
    assert on_disk == listed - {f"data/{ABSENT}"}
    assert not (CORPUS / "data" / ABSENT).exists()
    damages = {c.damage for c in CASES if c.damage}
    assert damages <= set(DAMAGES), damages - set(DAMAGES)


def test_corpus_holds_genuinely_bad_bytes():
    """The encoding cases must stay broken (an editor 'fixing' them would make them pass vacuously)."""
    for name in ("recipes/yaml_not_utf8.yaml", "data/latin1.json", "data/latin1.tsv", "data/utf16.json"):
        with pytest.raises(UnicodeDecodeError):
            (CORPUS / name).read_bytes().decode("utf-8")
    assert (CORPUS / "data" / "empty.json").stat().st_size == 0
    assert (CORPUS / "recipes" / "yaml_empty.yaml").stat().st_size == 0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_gives_one_clean_line(case, tmp_path, capsys, request):
    argv, expect = _prepare(case, tmp_path, request)
    capsys.readouterr()  # drop what the fixtures printed (progress bars of save_pretrained)
    outcome = _run_case(argv, capsys)
    clean = _judge(outcome, expect)
    if (tmp_path / "pwned").exists():
        outcome.problems.append("a command named in the input was executed")
        clean = False
    TALLY[case.id] = (case.input, clean, not outcome.problems)
    assert not outcome.problems, _explain(argv, outcome)


REAL_PROCESS_CASES = ["recipe/targets_match_nothing.yaml[train]", "data/cls_unknown_label.tsv[train]",
                      "checkpoint/tensor_shape[merge]"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", REAL_PROCESS_CASES)
def test_a_real_process_prints_only_the_error_line(case_id, tmp_path, request):
    """In-process runs cannot see what libraries print straight to the terminal (log records,
    warnings): a few cases that load torch, a model and data run as real processes."""
    case = next(c for c in CASES if c.id == case_id)
    argv, expect = _prepare(case, tmp_path, request)
    result = subprocess.run([sys.executable, "-m", "deltafit", *argv], capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert all(e in lines[0] for e in expect), (expect, lines[0])


# ----------------------------------------------------------------------------------------------
# Running and judging


def _prepare(case: Case, tmp_path: Path, request) -> tuple[list[str], list[str]]:
    """Materialize the case's input under tmp_path; (CLI arguments, expected fragments)."""
    tiny_llama, tiny_bert = request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_bert")
    subs = {"@TINY_LLAMA@": str(tiny_llama), "@TINY_BERT@": str(tiny_bert), "@TMP@": str(tmp_path),
            "@VALID@": str(tmp_path / "valid")}
    for f in (CORPUS / "valid").iterdir():
        _materialize(f, tmp_path / "valid" / f.name, subs)
    env = {"{tmp}": str(tmp_path), "{valid}": str(tmp_path / "valid")}
    if case.kind == "checkpoint":
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("trained_run"), run)
        DAMAGES[case.damage](run, tmp_path, request)
        env["{ckpt}"] = str(run)
    else:
        env["{file}"] = str(_materialize(CORPUS / case.input, tmp_path / Path(case.input).name, subs))
    return [_fill(a, env) for a in case.args], [_fill(e, env) for e in case.expect]


def _run_main(argv: list[str]) -> int | None:
    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _run_case(argv: list[str], capsys) -> Outcome:
    crash = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = _run_main(argv)
        except Exception:  # an error that escaped the CLI: a real process would print its traceback
            code, crash = None, traceback.format_exc()
    captured = capsys.readouterr()
    # A real process prints warnings on stderr (deprecations only when raised in __main__).
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    err_lines = [line for line in captured.err.splitlines() if line.strip()] + shown
    return Outcome(code, captured.out, err_lines, crash)


def _judge(outcome: Outcome, expect: list[str]) -> bool:
    """Record every problem; True when the error itself is clean (exit 2, one line, no traceback)."""
    problems = outcome.problems
    if outcome.crash:
        problems.append("uncaught exception (traceback)")
    elif outcome.code != 2:
        problems.append(f"exit code {outcome.code}, expected 2")
    if len(outcome.err_lines) != 1:
        problems.append(f"{len(outcome.err_lines)} stderr lines, expected exactly 1")
    elif not outcome.err_lines[0].startswith("error: "):
        problems.append("the stderr line does not start with 'error: '")
    if "Traceback" in outcome.out + "\n".join(outcome.err_lines):
        problems.append("'Traceback' in the output")
    clean = not problems
    message = outcome.err_lines[0] if len(outcome.err_lines) == 1 else "\n".join(outcome.err_lines)
    problems += [f"message lacks {e!r}" for e in expect if e not in message]
    return clean


def _explain(argv, outcome: Outcome) -> str:
    lines = ["; ".join(outcome.problems) + " || " + " | ".join(outcome.err_lines)[-400:],
             f"deltafit {' '.join(argv)}", "stderr:", *outcome.err_lines]
    if outcome.crash:
        lines += ["traceback:", outcome.crash]
    return "\n".join(lines)


def _materialize(src: Path, dst: Path, subs: dict[str, str]) -> Path:
    """Copy a corpus file, filling placeholders in YAML (byte-wise, so bad bytes stay bad)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
        return dst
    if not src.exists():
        return dst  # the 'file does not exist' case
    data = src.read_bytes()
    if src.suffix == ".yaml":
        for key, value in subs.items():
            data = data.replace(key.encode(), value.encode())
    dst.write_bytes(data)
    return dst


def _fill(text: str, env: dict[str, str]) -> str:
    for key, value in env.items():
        text = text.replace(key, value)
    return text


# ----------------------------------------------------------------------------------------------
# Checkpoint damages: each takes the copied run directory (run/final, run/checkpoints/step-*)


def _edit_json(path: Path, edit, reseal: bool = False) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    if reseal:
        _reseal(path)


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _reseal(path)


def _edit_recipe(run: Path, edit) -> None:
    path = run / "final" / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe))
    _reseal(path)


def _reseal(edited: Path) -> None:
    """Re-record an edited file in its checkpoint's file manifest (sizes and hashes in
    deltafit.json), so the case reaches the deeper check it is about: a well-formed checkpoint
    whose content is wrong, not a damaged file."""
    import hashlib

    directory = next(p for p in edited.parents if (p / "deltafit.json").is_file())
    meta_path = directory / "deltafit.json"
    meta = json.loads(meta_path.read_text())
    name = edited.relative_to(directory).as_posix()
    if name in (meta.get("files") or {}):
        data = edited.read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta_path.write_text(json.dumps(meta))


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    _reseal(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step-00000001"


def _set_model(run: Path, name: str) -> None:
    """Point the checkpoint at another base model: both records of it, the metadata's (which eval
    and merge use) and the recipe copy's, as a checkpoint written for that base would have."""
    def edit(recipe):
        recipe["model"]["name"] = name
    _edit_recipe(run, edit)
    _edit_json(run / META, lambda m: m["model"].update(name=name))


def _pickle_only(run: Path, tmp: Path, request) -> None:
    for name in ("deltafit.json", "delta.safetensors", "recipe.yaml"):
        (run / "final" / name).unlink()
    (run / "final" / "delta.bin").write_bytes(pickle.dumps({"lora_A": [[0.0]]}))
    shutil.rmtree(run / "checkpoints")


def _reshape_a_tensor(tensors: dict) -> None:
    import torch

    tensors[sorted(k for k in tensors if k.endswith(".lora.A"))[0]] = torch.zeros(8, 32)  # saved: (4, 32)


def _drop_a_tensor(tensors: dict) -> None:
    del tensors[sorted(k for k in tensors if k.endswith(".lora.B"))[0]]


def _add_a_tensor(tensors: dict) -> None:
    import torch

    tensors["surprise.weight"] = torch.zeros(2)


META, TENSORS = "final/deltafit.json", "final/delta.safetensors"
STATE_JSON = "checkpoints/step-00000001/trainer/state.json"
# damage name -> function(run directory, test tmp dir, pytest request)
DAMAGES = {
    "none": lambda run, tmp, request: None,
    "no_meta": lambda run, tmp, request: (run / META).unlink(),
    "meta_not_json": lambda run, tmp, request: (run / META).write_text("{not json"),
    "meta_not_object": lambda run, tmp, request: (run / META).write_text("[1, 2]"),
    "meta_missing_keys": lambda run, tmp, request: _edit_json(run / META, lambda m: [m.pop("model"), m.pop("task")]),
    "meta_newer_format": lambda run, tmp, request: _edit_json(run / META, lambda m: m.update(format_version=99)),
    "meta_unknown_method": lambda run, tmp, request: _edit_json(
        run / META, lambda m: [m.update(method="loar"), m["delta_config"].update(method="loar")]),
    "meta_bad_delta_config": lambda run, tmp, request: _edit_json(
        run / META, lambda m: m["delta_config"].update(r="big")),
    "no_tensors": lambda run, tmp, request: (run / TENSORS).unlink(),
    "truncated_tensors": lambda run, tmp, request: _truncate(run / TENSORS),
    "empty_tensors": lambda run, tmp, request: (run / TENSORS).write_bytes(b""),
    "tensor_shape": lambda run, tmp, request: _edit_tensors(run / TENSORS, _reshape_a_tensor),
    "tensor_missing": lambda run, tmp, request: _edit_tensors(run / TENSORS, _drop_a_tensor),
    "tensor_extra": lambda run, tmp, request: _edit_tensors(run / TENSORS, _add_a_tensor),
    "wrong_base_size": lambda run, tmp, request: _set_model(run, str(request.getfixturevalue("wide_llama"))),
    "wrong_base_arch": lambda run, tmp, request: _set_model(run, str(request.getfixturevalue("tiny_bert"))),
    "base_gone": lambda run, tmp, request: _set_model(run, str(tmp / "gone-model")),
    "no_recipe": lambda run, tmp, request: (run / "final" / "recipe.yaml").unlink(),
    "recipe_bad_yaml": lambda run, tmp, request: _rewrite(run / "final" / "recipe.yaml", "model: [unclosed\n"),
    "recipe_not_mapping": lambda run, tmp, request: _rewrite(run / "final" / "recipe.yaml", "- model\n- data\n"),
    "pickle_only": _pickle_only,
    "trainer_state_truncated": lambda run, tmp, request: _truncate(_step(run) / "trainer" / "state.safetensors"),
    "trainer_json_bad": lambda run, tmp, request: (run / STATE_JSON).write_text("{oops"),
    "trainer_json_missing_keys": lambda run, tmp, request: _edit_json(
        run / STATE_JSON, lambda s: s.pop("progress"), reseal=True),
    "trainer_bad_progress": lambda run, tmp, request: _edit_json(
        run / STATE_JSON, lambda s: s["progress"].update(step="../../x"), reseal=True),
}
