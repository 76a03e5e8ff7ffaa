"""Hostile-input fuzzing through real `deltafit` processes.

Hypothesis mutates three kinds of input and runs each through `python -m deltafit`:

- recipes (`validate`): the valid recipes of tests/malformed/valid/, either with one to three keys
  set to plausible-but-edgy values found from the recipe's schema (or another delta method's), so
  the run gets into planning, or mangled as mappings (keys dropped, values replaced by odd ones:
  huge, negative, NaN/inf, empty, NUL, unicode, lists, unknown keys, shared/recursive objects that
  dump as anchors and aliases) and as YAML text (truncated, syntax characters, tags, merge keys,
  alias bombs, bad bytes, UTF-16), plus odd `--set` overrides;
- data files (`validate`): the valid alpaca/classification rows written as JSON, JSON lines, CSV or
  TSV after row/column/cell mutations (odd and very long cells, dropped/renamed columns, no rows),
  then byte damage (truncation, bad bytes, BOMs, UTF-16); and a few `train` runs of max_steps 1
  (which tokenize) on readable tables with odd cells and a 100k-500k character field;
- checkpoint metadata (`eval`): deltafit.json of a tiny trained checkpoint (causal LM and
  classifier): its own keys dropped, retyped or made odd; model/delta_config set to plausible
  values (another method, other targets); or any nested key mangled and the JSON text damaged.

The contract each run must keep: exit code 0 or 2; on 2, stderr (blank lines aside) is exactly one
line starting with `error: `; no "Traceback" in either stream; the process ends within its timeout;
every file that existed before the run (the inputs, the checkpoint, the valid data, the tiny
models) has the same bytes afterwards; nothing named in a recipe tag is executed. Processes run
offline (HF_*_OFFLINE=1), so a name that is no local path fails at once instead of reaching for
the hub, and with DELTAFIT_CACHE in the module's temp dir.

Examples never raise inside Hypothesis: every run is judged and recorded, and the test fails at the
end listing each distinct failure class once (its smallest input, the command, the mutations and
the stderr tail), so one run shows everything at once and nothing is spent on shrinking. The
fast variant runs a few examples per target (seeded: the same inputs every run); the slow one many
more. DELTAFIT_FUZZ_EXAMPLES overrides the counts ('40', or 'recipe=40,data-train=10');
DELTAFIT_FUZZ_REPORT=path writes every input tried and every failure (not only one per class) as
JSON. A tally is printed at the module's end.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from deltafit.cli import main
from tests.helpers import report_line

VALID = Path(__file__).parent / "malformed" / "valid"
TIMEOUT = {"validate": 90, "eval": 120, "train": 180}  # seconds; a run past it is a hang
FAST = {"recipe": 7, "data": 5, "data-train": 2, "checkpoint": 4}
# Sized so `make test-slow` (and so CI) spends about 2 minutes here on 2 cores; larger runs:
# DELTAFIT_FUZZ_EXAMPLES=60 (or recipe=60,data=60,...).
SLOW = {"recipe": 10, "data": 10, "data-train": 4, "checkpoint": 6}  # the seeded fast inputs come first


# ----------------------------------------------------------------------------------------------
# Outcomes, failure classes and the tally


@dataclass
class Run:
    target: str
    argv: list[str]
    ops: list[str]
    input_name: str
    input_bytes: bytes
    code: int | None = None
    out: str = ""
    err: str = ""
    hung: bool = False
    problems: list[str] = field(default_factory=list)


TALLY: dict[str, dict] = {}  # target -> {"inputs": set of input hashes, "exit0": n, "exit2": n, "bad": n}
FAILURES: dict[str, dict[str, Run]] = {}  # target -> failure class -> smallest failing run
ALL_FAILURES: list[Run] = []
ALL_RUNS: list[dict] = []  # every distinct input, briefly (for DELTAFIT_FUZZ_REPORT)


def _record(run: Run, tmp: Path) -> None:
    entry = TALLY.setdefault(run.target, {"inputs": set(), "exit0": 0, "exit2": 0, "bad": 0})
    normalized = [a.replace(str(tmp), "{tmp}") for a in run.argv]
    key = hashlib.sha256(json.dumps(normalized).encode() + run.input_bytes).hexdigest()
    if key in entry["inputs"]:
        return  # Hypothesis replayed an input: count it once
    entry["inputs"].add(key)
    ALL_RUNS.append({"target": run.target, "ops": run.ops, "code": run.code,
                     "stderr": (run.err.strip().splitlines() or [""])[-1][:200]})
    if run.problems:
        entry["bad"] += 1
        ALL_FAILURES.append(run)
        classes = FAILURES.setdefault(run.target, {})
        cls = _failure_class(run)
        if cls not in classes or len(run.input_bytes) < len(classes[cls].input_bytes):
            classes[cls] = run
    else:
        entry["exit0" if run.code == 0 else "exit2"] += 1


def _failure_class(run: Run) -> str:
    """What kind of failure: the first problem, sharpened by where a traceback ends or what the
    extra stderr lines say (digits and paths blanked, so the same failure on two inputs is one class)."""
    kind = run.problems[0].split(" (")[0]
    if "Traceback" in run.out + run.err:
        text = run.err if "Traceback" in run.err else run.out
        frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', text)
        own = [f for f in frames if "/deltafit/" in f[0]]
        where = f"{Path(own[-1][0]).name}:{own[-1][1]}" if own else (frames[-1][1] if frames else "?")
        last = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
        exc = last[-1].split(":")[0] if last else "?"
        return f"traceback {exc} in {where}"
    lines = [line for line in run.err.splitlines() if line.strip() and not line.startswith("error: ")]
    first = re.sub(r"\d+", "#", re.sub(r"(/[^\s'\"]+)+", "<path>", lines[0]))[:90] if lines else ""
    return f"{kind}: {first}" if first else kind


def _describe(run: Run, limit: int = 1200) -> str:
    shown = run.input_bytes[:limit].decode("utf-8", "backslashreplace")
    more = f"\n    ... ({len(run.input_bytes)} bytes in all)" if len(run.input_bytes) > limit else ""
    tail = "\n".join((run.err or run.out).strip().splitlines()[-8:])
    return (f"problems: {'; '.join(run.problems)}\n  command: deltafit {' '.join(run.argv)}\n"
            f"  mutations: {run.ops}\n  input {run.input_name}:\n    "
            + shown.replace("\n", "\n    ") + more + "\n  stderr tail:\n    " + tail.replace("\n", "\n    "))


@pytest.fixture(scope="module", autouse=True)
def report_tally(request):
    """Print how many inputs each target tried and how they ended (like the malformed corpus line)."""
    yield
    if not TALLY:
        return
    parts = [f"{t} {e['exit0'] + e['exit2'] + e['bad']} inputs ({e['exit0']} exit 0, {e['exit2']} clean exit 2, "
             f"{e['bad']} failing)" for t, e in TALLY.items()]
    classes = sum(len(c) for c in FAILURES.values())
    line = f"fuzz: {'; '.join(parts)}; {classes} distinct failure classes"
    if os.environ.get("DELTAFIT_FUZZ_REPORT"):
        Path(os.environ["DELTAFIT_FUZZ_REPORT"]).write_text(json.dumps({
            "tally": {t: {k: (len(v) if k == "inputs" else v) for k, v in e.items()} for t, e in TALLY.items()},
            "classes": {t: {c: _describe(r) for c, r in cs.items()} for t, cs in FAILURES.items()},
            "runs": ALL_RUNS,
            "failures": [{"class": _failure_class(r), "target": r.target, "text": _describe(r)} for r in ALL_FAILURES],
        }, indent=1))
    report_line(request, line)


# ----------------------------------------------------------------------------------------------
# Running one input and judging it


def _run(env: "FuzzEnv", run: Run, cwd: Path, timeout: int) -> None:
    """Run `python -m deltafit argv` as its own process group; a run past the timeout is killed."""
    proc = subprocess.Popen([sys.executable, "-m", "deltafit", *run.argv], cwd=cwd, env=env.process_env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace", start_new_session=True)
    try:
        run.out, run.err = proc.communicate(timeout=timeout)
        run.code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        run.out, run.err = proc.communicate()
        run.hung = True


def _judge(run: Run, before: dict[Path, str], after: dict[Path, str], cwd: Path) -> None:
    problems = run.problems
    if run.hung:
        problems.append("hang (no exit within the timeout)")
    elif run.code not in (0, 2):
        problems.append(f"exit code {run.code}, expected 0 or 2")
    if "Traceback" in run.out + run.err:
        problems.append("'Traceback' in the output")
    lines = [line for line in run.err.splitlines() if line.strip()]
    if run.code == 2:
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines with exit 2, expected exactly 1")
        elif not lines[0].startswith("error: "):
            problems.append("the stderr line does not start with 'error: '")
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    if changed:
        problems.append("pre-existing files changed or removed: " + ", ".join(str(p) for p in changed[:5]))
    if (cwd / "pwned").exists():
        problems.append("a command named in the input was executed")


def _snapshot(*roots: Path) -> dict[Path, str]:
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file() and not p.is_symlink():
                files[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


# Hypothesis explores an expensive test badly on its own: a few dozen examples cluster on one branch
# (its novel-prefix walk and its span-copying mutator both revisit the last example). So each
# target has plans (its top-level choices, e.g. base recipe x mode) taken in turns, and an input
# whose shape (plan + mutations without their values) was already run is rejected before any
# process starts. Both rejections are cheap `assume`s, outside the example count, made once every
# value is drawn (a rejection that cut the drawing short would depend on more than the draws, which
# Hypothesis reports as flaky data generation).
PLANS = {
    "recipe": [(b, m) for b in ("alpaca", "cls") for m in ("schema", "chaos")],
    "data": [(b, k) for b in ("alpaca", "cls") for k in ("json", "jsonl", "csv", "tsv")],
    "data-train": [(b, k) for b in ("alpaca", "cls") for k in ("json", "jsonl", "csv", "tsv")],
    "checkpoint": [(b, m) for b in ("alpaca", "cls") for m in ("top", "schema", "tree")],
}
SCHEDULE: dict[str, dict] = {}  # target -> {"plans": {plan: runs}, "shapes": set}; reset by each _fuzz


def _shape(ops: list[str]) -> frozenset:
    """The mutations without their values or offsets: 'set train.lr = nan' -> 'set train.lr'."""
    return frozenset(re.sub(r"\d+", "#", re.split(r" = | -> | with |=", op)[0]) for op in ops)


def _try(env: "FuzzEnv", target: str, command: str, build, plan: tuple = (), ops: list[str] = ()) -> None:
    """Make an example's input in a fresh directory (`build(tmp) -> (argv, ops, input path)`), run it,
    judge it, record it. Never raises for the product's behaviour: failures are collected."""
    state = SCHEDULE[target]
    shape = (plan, _shape(list(ops)))
    assume(state["plans"][plan] <= min(state["plans"].values()))  # round robin over the plans
    assume(shape not in state["shapes"])
    state["shapes"].add(shape)
    state["plans"][plan] += 1
    tmp = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=env.root / "examples"))
    try:
        argv, ops, input_path = build(tmp)
        run = Run(target, argv, ops, input_path.name if input_path else "-",
                  input_path.read_bytes() if input_path and input_path.is_file() else b"")
        watched = (tmp, env.valid, env.tiny_llama, env.tiny_bert, env.runs)
        before = _snapshot(*watched)
        _run(env, run, tmp, TIMEOUT[command])
        _judge(run, before, _snapshot(*watched), tmp)
        _record(run, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _examples_override() -> dict[str, int]:
    """DELTAFIT_FUZZ_EXAMPLES: one count for every target ('40') or per target ('recipe=40,data-train=10')."""
    text = os.environ.get("DELTAFIT_FUZZ_EXAMPLES", "").strip()
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(FAST, int(text))
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}


def _fuzz(env: "FuzzEnv", target: str, examples: int, body) -> None:
    """Run `body(data)` for `examples` Hypothesis examples (seeded), then fail listing every new
    failure class this target showed."""
    examples = _examples_override().get(target, examples)
    seen = set(FAILURES.get(target, {}))
    SCHEDULE[target] = {"plans": dict.fromkeys(PLANS[target], 0), "shapes": set()}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        body(data)

    fuzz()
    new = {c: r for c, r in FAILURES.get(target, {}).items() if c not in seen}
    if new:
        pytest.fail(f"{len(new)} failure classes on {target} inputs:\n\n"
                    + "\n\n".join(f"[{c}]\n  {_describe(r)}" for c, r in new.items()), pytrace=False)


# ----------------------------------------------------------------------------------------------
# The environment: valid inputs, tiny models, two tiny trained checkpoints


@dataclass
class FuzzEnv:
    root: Path
    valid: Path
    tiny_llama: Path
    tiny_bert: Path
    runs: Path
    process_env: dict

    def recipe(self, name: str) -> dict:
        return yaml.safe_load((self.valid / f"{name}.yaml").read_text())

    def checkpoint(self, name: str) -> Path:
        return self.runs / name / "final"


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory, tiny_llama, tiny_bert) -> FuzzEnv:
    root = tmp_path_factory.mktemp("fuzz")
    valid = root / "valid"
    valid.mkdir()
    for f in VALID.iterdir():
        data = f.read_bytes()
        if f.suffix == ".yaml":
            for key, value in {"@TINY_LLAMA@": tiny_llama, "@TINY_BERT@": tiny_bert, "@VALID@": valid}.items():
                data = data.replace(key.encode(), str(value).encode())
        (valid / f.name).write_bytes(data)
    (root / "examples").mkdir()
    process_env = {**os.environ, "DELTAFIT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTAFIT_CACHE", str(root / "cache"))
        for name in ("alpaca", "cls"):  # 2-step runs whose recipes hold eval data (a quarter held out)
            try:
                main(["train", str(valid / f"{name}.yaml"), "--output", str(runs / name), "--set", "train.max_steps=2",
                      "--set", "data.eval_fraction=0.25"])
            except SystemExit as e:
                assert e.code in (0, None), f"training the {name} checkpoint failed"
    return FuzzEnv(root, valid, tiny_llama, tiny_bert, runs, process_env)


# ----------------------------------------------------------------------------------------------
# Odd values


ODD_SCALARS = [
    0, -1, 1, 3, 2**31, 2**63, -(2**63) - 1, 10**40, -(10**40), float("nan"), float("inf"), float("-inf"), -0.0,
    1e-320, 1e308, 0.5, True, False, None, "", " ", "\x00", "a\x00b", "\n", "\t", "..", "/", "~", ".",
    "/dev/null", "/dev/zero", "nonexistent/dir/x.json", "x.parquet", "pkg:nope", "pkg:", "builtin:nope", "org/name",
    "yes", "no", "null", "~/x", "1e-4", "0x1F", "1_000", ".inf", "${HOME}", "$(touch pwned)", "'; touch pwned",
    "💥💥💥", "\u202eevil", "\ud800", "ǅ" * 3, "a" * 300, "lora", "loar", "causal-lm", "seq-cls", "bfloat16",
    "classification", "chat", "completion", "alpaca", "auto", "label", "sentence", "instruction", "output",
]
SCALARS = st.one_of(
    st.sampled_from(ODD_SCALARS), st.integers(), st.floats(), st.text(max_size=12), st.booleans(),
)
_NESTED = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))
ODD_VALUES = st.one_of(SCALARS, SCALARS, st.lists(_NESTED, max_size=3),
                       st.dictionaries(st.text(max_size=6), _NESTED, max_size=3))
ODD_KEYS = st.one_of(st.sampled_from(["r", "lr", "name", "method", "x-anchor", "<<", "", " ", "nope", "epochs",
                                      "max_steps", "target_modules", "train", "delta", "0"]),
                     st.text(max_size=8))


# ----------------------------------------------------------------------------------------------
# Tree mutations (recipes, checkpoint metadata, data records)


def _paths(tree, prefix=(), seen=None) -> list[tuple]:
    """Every path into nested dicts/lists (each object visited once: mutations may make it recursive)."""
    seen = set() if seen is None else seen
    if id(tree) in seen:
        return []
    seen.add(id(tree))
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    out = []
    for key, value in items:
        out.append(prefix + (key,))
        out += _paths(value, prefix + (key,), seen)
    return out


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _show(path) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _retype(value):
    """The value as another type, keeping its content: str <-> number, scalar -> list/dict."""
    return [
        [value], {"value": value}, str(value), json.dumps(value, default=str),
        float(len(str(value))), -len(str(value)), None, not value,
    ]


def mutate_tree(data, tree, extra_values=(), allow_alias: bool = True) -> tuple[object, list[str]]:
    """Apply 1-4 mutations to a (copied) nested mapping; (tree, descriptions)."""
    tree = copy.deepcopy(tree)
    ops = []
    values = ODD_VALUES if not extra_values else st.one_of(ODD_VALUES, st.sampled_from(list(extra_values)))
    kinds = ["drop", "set", "set", "retype", "add"] + (["alias"] if allow_alias else [])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        paths = _paths(tree)
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if not paths:
            kind = "root"
        if kind == "root":
            tree = data.draw(ODD_VALUES, label="root")
            ops.append(f"replace everything with {tree!r:.80}")
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        parent, key = _get(tree, path[:-1]), path[-1]
        if kind == "drop":
            del parent[key]
            ops.append(f"drop {_show(path)}")
        elif kind == "set":
            parent[key] = data.draw(values, label="value")
            ops.append(f"set {_show(path)} = {parent[key]!r:.80}")
        elif kind == "retype":
            parent[key] = data.draw(st.sampled_from(_retype(parent[key])), label="retyped")
            ops.append(f"retype {_show(path)} -> {parent[key]!r:.80}")
        elif kind == "add":
            where = parent if isinstance(parent, dict) else tree if isinstance(tree, dict) else None
            if where is None:
                continue
            new_key = data.draw(ODD_KEYS, label="key")
            where[new_key] = data.draw(values, label="value")
            ops.append(f"add key {new_key!r} = {where[new_key]!r:.80} next to {_show(path)}")
        elif kind == "alias":  # two places hold one object: YAML writes &anchor / *alias (maybe recursive)
            source = data.draw(st.sampled_from([()] + paths), label="alias of")
            parent[key] = _get(tree, source)
            ops.append(f"alias {_show(path)} = *{_show(source)}")
    return tree, ops


# ----------------------------------------------------------------------------------------------
# Text and byte damage


YAML_SNIPPETS = [
    ":", ": ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "*nope ", "!!python/object/apply:os.system ['touch pwned'] ",
    "!!binary ", "!!set ", "!!timestamp ", "!!float ", "!nope ", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00",
    "\ufeff", "'", '"', "|\n", ">-\n", "? ", "<<: *a\n", "<<: 1\n", "#", "\r", "\u2028", "\x1b[31m", "@", "`",
    "x-base: &a {r: 8}\n", "\n  nested: [1, 2\n",
]
ALIAS_BOMB = "".join(["lol0: &l0 [lol]\n"]
                     + [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)])
BAD_BYTES = [
    b"\xff", b"\xfe\xff", b"\x00", b"\xc3", b"\xed\xa0\x80", b"\r", b"\n", b"\t", b",", b'"', b"\xef\xbb\xbf",
    b"{", b"]", b"\\", b"\x1a", b"\x85", b"'", b"\n\n\n",
]


def damage_text(data, text: bytes, snippets: list[str]) -> tuple[bytes, list[str]]:
    """0-2 text edits: truncate, insert a snippet or bad bytes, drop/duplicate/indent a line, re-encode."""
    ops = []
    for _ in range(data.draw(st.integers(0, 2), label="text edits")):
        kind = data.draw(st.sampled_from(["truncate", "insert", "bytes", "line", "encoding"]), label="edit")
        at = data.draw(st.integers(0, len(text)), label="offset")
        if kind == "truncate":
            text = text[:at]
            ops.append(f"truncate at byte {at}")
        elif kind == "insert":
            snippet = data.draw(st.sampled_from(snippets), label="snippet")
            text = text[:at] + snippet.encode("utf-8", "surrogatepass") + text[at:]
            ops.append(f"insert {snippet!r} at byte {at}")
        elif kind == "bytes":
            bad = data.draw(st.sampled_from(BAD_BYTES), label="bytes")
            text = text[:at] + bad + text[at:]
            ops.append(f"insert bytes {bad!r} at byte {at}")
        elif kind == "line":
            lines = text.split(b"\n")
            i = data.draw(st.integers(0, len(lines) - 1), label="line")
            how = data.draw(st.sampled_from(["drop", "duplicate", "indent", "dedent", "swap"]), label="how")
            if how == "drop":
                del lines[i]
            elif how == "duplicate":
                lines.insert(i, lines[i])
            elif how == "indent":
                lines[i] = b"   " + lines[i]
            elif how == "dedent":
                lines[i] = lines[i].lstrip()
            elif i + 1 < len(lines):
                lines[i], lines[i + 1] = lines[i + 1], lines[i]
            text = b"\n".join(lines)
            ops.append(f"{how} line {i + 1}")
        else:
            how = data.draw(st.sampled_from(["utf-16", "bom", "latin-1 bytes", "crlf"]), label="encoding")
            decoded = text.decode("utf-8", "surrogateescape")
            if how == "utf-16":
                text = decoded.encode("utf-16", "surrogatepass")
            elif how == "bom":
                text = b"\xef\xbb\xbf" + text
            elif how == "latin-1 bytes":
                text = text.replace(b"e", b"\xe9")
            else:
                text = text.replace(b"\n", b"\r\n")
            ops.append(f"encoding: {how}")
    return text, ops


def _dump_yaml(tree, allow_unicode: bool) -> bytes:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=allow_unicode).encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------------------------
# (a) Recipes through `validate`


SET_KEYS = ["train.lr", "train.max_steps", "delta.r", "delta.method", "model.name", "data.train", "data.format",
            "train", "delta", "x", "", "a..b", ".", "train.lr.x", "model.name.x", "data.max_length", "log.trackers",
            "train.epochs", "name", "output_dir", "data.eval_fraction", "model.task"]
SET_VALUES = ["", "nan", ".nan", "-1", "0", "1e999", "[1, 2]", "{a: 1}", "x: y", "!!python/none", "[unclosed",
              "'quoted", "*alias", "&a x", "~", "null", "💥", "a=b", "--set", "#x", "1 #c", "\"a\"", "10000000000000"]


MODULE_NAMES = ["q_proj", ["q_proj", "v_proj"], "all-linear", "nope", "", [], ".*", "lm_head", "embed_tokens", "[",
                "mlp", "query", ["query", "value", "dense"], "model.layers.0.self_attn.q_proj", ["q_proj", 3]]
FIELD_VALUES = {  # plausible-but-edgy values for particular keys, next to the per-type ones
    "target_modules": MODULE_NAMES, "layers": [[0], [1], [2], [-1], [0, 1], [0, 0], [], [10**9]],
    "ranks": [{}, {"q_proj": 0}, {"model.layers.0.self_attn.q_proj": 2}, {"nope": 1}, {"q_proj": -1}],
    "text_column": ["text", "sentence", "label", "instruction", "nope", ""], "label_column": ["label", "sentence"],
    "init_text": ["", "hello world", "\x00", "x" * 10_000],
}


def _plausible(annotation) -> list:
    """Values a key of this type might be given: its valid choices, edges, and near misses."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return [*args, str(args[0]).upper(), f"{args[0]}x", ""]
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return [v for a in args for v in _plausible(a)]
    if origin is list:
        inner = _plausible(args[0]) if args else [1]
        return [[], [inner[0]], inner[:3], [inner[0]] * 2]
    if origin is dict:
        return [{}, {"a": 1}]
    return {type(None): [None], bool: [True, False, "yes", 1], int: [0, 1, 2, 3, 8, -1, 2**31, 10**12],
            float: [0.0, 1e-9, 0.25, 0.999, 1.0, 2.5, -0.5, 1e30], str: ["", "x", "train", "validation", "a/b"],
            }.get(annotation, [None])


def _schema_edit(data, tree: dict, env: FuzzEnv,
                 sections=("model", "data", "train", "log", "delta", "delta", "top")) -> list[str]:
    """One key set to a plausible value, found from the recipe's own schema (or the delta method's);
    sometimes the delta section is rebuilt for another method first. Keeps the rest valid, so the run
    gets past the shape checks into planning (model, delta attach, data)."""
    from deltafit.deltas import METHODS, config_class
    from deltafit.recipe import Recipe

    ops = []
    section = data.draw(st.sampled_from(sections), label="section")
    if section == "delta":
        if not isinstance(tree.get("delta"), dict) or data.draw(st.booleans(), label="switch method"):
            tree["delta"] = {"method": data.draw(st.sampled_from(list(METHODS)), label="method")}
            ops.append(f"switch delta to method {tree['delta']['method']}")
        try:
            fields = config_class(str(tree["delta"].get("method", "lora"))).model_fields
        except Exception:
            return ops
        where = tree["delta"]
    elif section == "top":
        fields, where = {k: f for k, f in Recipe.model_fields.items() if k in ("name", "output_dir")}, tree
    else:
        fields = Recipe.model_fields[section].annotation.model_fields
        where = tree.setdefault(section, {}) if isinstance(tree.get(section, {}), dict) else tree
    key = data.draw(st.sampled_from(sorted(fields)), label="field")
    pool = FIELD_VALUES.get(key, []) + _plausible(fields[key].annotation)
    if key == "name" and section == "model":
        pool += [str(env.tiny_llama), str(env.tiny_bert), str(env.valid), str(env.checkpoint("alpaca"))]
    if key in ("train", "eval"):
        pool += [str(env.valid / n) for n in ("alpaca.json", "cls.tsv", "alpaca.yaml", "missing.json")]
    where[key] = data.draw(st.sampled_from(pool), label="value")
    ops.append(f"set {section}.{key} = {where[key]!r:.80}")
    return ops


def _recipe_example(env: FuzzEnv, data) -> None:
    plan = base, mode = data.draw(st.sampled_from(PLANS["recipe"]), label="plan")
    if mode == "schema":
        tree = env.recipe(base)
        ops = [op for _ in range(data.draw(st.integers(1, 3), label="edits")) for op in _schema_edit(data, tree, env)]
        _run_recipe(env, plan, _dump_yaml(tree, True), [], ops)
        return
    tree, ops = mutate_tree(data, env.recipe(base), extra_values=[str(env.tiny_bert), str(env.tiny_llama)])
    text = _dump_yaml(tree, data.draw(st.booleans(), label="unicode"))
    if data.draw(st.booleans(), label="anchors"):  # merge keys from an x- anchor, or an alias bomb
        how = data.draw(st.sampled_from(["merge", "merge-bad", "bomb"]), label="anchor kind")
        prefix = {"merge": "x-common: &common {r: 8, alpha: 16}\n", "merge-bad": "x-common: &common [1, 2]\n",
                  "bomb": ALIAS_BOMB}[how]
        text = prefix.encode() + (text if how == "bomb" else
                                  text.replace(b"\ndelta:\n", b"\ndelta:\n  <<: *common\n", 1))
        ops.append(f"anchors: {how}")
    text, text_ops = damage_text(data, text, YAML_SNIPPETS)
    sets = data.draw(st.lists(st.tuples(st.sampled_from(SET_KEYS), st.sampled_from(SET_VALUES)), max_size=2),
                     label="--set")
    ops += text_ops + [f"--set {k}={v}" for k, v in sets]
    _run_recipe(env, plan, text, sets, ops)


def _run_recipe(env: FuzzEnv, plan: tuple, text: bytes, sets: list, ops: list[str]) -> None:
    base = plan[0]

    def build(tmp: Path):
        path = tmp / f"{base}.yaml"
        path.write_bytes(text)
        return ["validate", str(path), *[a for k, v in sets for a in ("--set", f"{k}={v}")]], ops, path

    _try(env, "recipe", "validate", build, plan, ops)


# ----------------------------------------------------------------------------------------------
# (b) Data files through `validate` (and a few `train` runs, which tokenize)


def _valid_rows(env: FuzzEnv, base: str) -> list[dict]:
    if base == "alpaca":
        return json.loads((env.valid / "alpaca.json").read_text())
    with open(env.valid / "cls.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


LONG_TEXT = st.builds(lambda n, c: c * n, st.sampled_from([5_000, 100_000, 1_000_000]),
                      st.sampled_from(["x", "é", "word ", "\u4e00", "\x00", "\n", "\t", "\"", "{"]))


def mutate_rows(data, rows: list[dict], long: bool, cells_only: bool = False) -> tuple[object, list[str]]:
    """Row/column/cell mutations: drop or rename a column, retype a cell, odd or very long cells,
    fewer or repeated rows, or tree mutations of the whole list (which may leave no list at all).
    `cells_only`: content mutations that keep a readable table (for runs that get to tokenizing)."""
    rows = copy.deepcopy(rows)
    ops = []
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = st.one_of(ODD_VALUES, LONG_TEXT) if long else ODD_VALUES
    for _ in range(data.draw(st.integers(1, 3), label="row mutations")):
        kinds = ["cell", "cell", "column type", "rows", "new column"] if cells_only else [
            "drop column", "rename column", "cell", "cell", "column type", "rows", "new column", "tree"]
        kind = data.draw(st.sampled_from(kinds), label="kind")
        column = data.draw(st.sampled_from(columns), label="column")
        records = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        i = data.draw(st.integers(0, max(len(records) - 1, 0)), label="row")
        if kind == "drop column":
            every = data.draw(st.booleans(), label="every row")
            for r in records if every else records[i:i + 1]:
                r.pop(column, None)
            ops.append(f"drop column {column!r} from {'every row' if every else f'row {i}'}")
        elif kind == "rename column":
            new = data.draw(ODD_KEYS, label="new name")
            for r in records:
                if column in r:
                    r[new] = r.pop(column)
            ops.append(f"rename column {column!r} -> {new!r}")
        elif kind == "cell" and records:
            records[i][column] = data.draw(cells, label="cell")
            ops.append(f"row {i} {column!r} = {records[i][column]!r:.60} ({len(str(records[i][column]))} chars)")
        elif kind == "column type":
            value = data.draw(st.sampled_from([0, 1.5, None, True, [], {}, ["a"], {"a": 1}, "", float("nan")]),
                              label="column value")
            for r in records:
                r[column] = copy.deepcopy(value)
            ops.append(f"every {column!r} = {value!r}")
        elif kind == "rows" and isinstance(rows, list):
            keep = data.draw(st.sampled_from([0, 1, 2, 3, len(rows) * 4]), label="rows")
            rows = copy.deepcopy((rows * 4)[:keep])
            ops.append(f"keep {keep} rows")
        elif kind == "new column":
            key = data.draw(ODD_KEYS, label="column")
            for r in records:
                r[key] = data.draw(ODD_VALUES, label="value")
            ops.append(f"new column {key!r}")
        elif kind == "tree":
            rows, more = mutate_tree(data, rows, allow_alias=False)
            ops += more
    return rows, ops


def _cell(value) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def serialize_rows(rows, kind: str) -> bytes:
    if kind == "json":
        return json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if kind == "jsonl":
        items = rows if isinstance(rows, list) else [rows]
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode("utf-8", "surrogatepass")
    records = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    header = list(dict.fromkeys(str(k) for r in records for k in r))
    if kind == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[_cell(r.get(h)) for h in header] for r in records])
        text = buffer.getvalue()
    else:  # GLUE-style TSV: no quoting at all, a tab or newline inside a cell breaks the row
        text = "".join("\t".join(line) + "\n" for line in
                       [header] + [[_cell(r.get(h)) for h in header] for r in records])
    return text.encode("utf-8", "surrogatepass")


def _data_example(env: FuzzEnv, data, command: str) -> None:
    target = "data" if command == "validate" else "data-train"
    plan = base, kind = data.draw(st.sampled_from(PLANS[target]), label="plan")
    train = command == "train"  # train runs tokenize: readable tables with odd content, no byte damage
    rows, ops = mutate_rows(data, _valid_rows(env, base), long=not train, cells_only=train)
    if train and data.draw(st.booleans(), label="long field"):
        rows = copy.deepcopy(rows) if isinstance(rows, list) else rows
        text = data.draw(st.sampled_from(["x", "word ", "\u4e00"])) * 100_000
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and rows[0]:
            rows[0][next(iter(rows[0]))] = text
            ops.append(f"row 0 first column = {text[:10]!r}... ({len(text)} chars)")
    content, text_ops = serialize_rows(rows, kind), []
    if not train:
        content, text_ops = damage_text(data, content, ["\n", "\t", ",", '"', "{", "}", "[", "\\"])
    ops = [f"{base} rows as {kind}"] + ops + text_ops
    key = data.draw(st.sampled_from(["data.train", "data.train", "data.eval"]), label="key")
    ops.append(f"--set {key}=<file>")

    def build(tmp: Path):
        path = tmp / f"data.{kind}"
        path.write_bytes(content)
        argv = [command, str(env.valid / f"{base}.yaml"), "--set", f"{key}={json.dumps(str(path))}"]
        if command == "train":
            argv += ["--set", "train.max_steps=1", "--output", str(tmp / "out")]
        return argv, ops, path

    _try(env, target, command, build, plan, ops)


# ----------------------------------------------------------------------------------------------
# (c) Checkpoint metadata through `eval`


def _checkpoint_example(env: FuzzEnv, data) -> None:
    plan = base, mode = data.draw(st.sampled_from(PLANS["checkpoint"]), label="plan")
    meta = json.loads((env.checkpoint(base) / "deltafit.json").read_text())
    label_names = [["neg"], ["neg", "pos", "extra"], [1, 0], [], [None, None], "neg", {"0": "neg"}, ["pos", "neg"],
                   ["neg"] * 1000]
    extra = [str(env.tiny_bert), str(env.tiny_llama), str(env.runs), *map(json.dumps, label_names)]
    if mode == "schema":  # plausible model / delta_config values: deeper runs
        view = {"model": meta["model"], "delta": meta["delta_config"]}
        ops = [op for _ in range(data.draw(st.integers(1, 2), label="edits"))
               for op in _schema_edit(data, view, env, sections=("model", "delta", "delta"))]
        meta["delta_config"] = view["delta"]
        if data.draw(st.booleans(), label="method follows"):
            meta["method"] = view["delta"].get("method")
            ops.append(f"method = {meta['method']!r}")
    elif mode == "top":  # one or two of the metadata's own keys dropped, retyped or made odd
        ops = []
        for _ in range(data.draw(st.integers(1, 2), label="edits")):
            key = data.draw(st.sampled_from(sorted(meta)), label="key")
            how = data.draw(st.sampled_from(["drop", "odd", "retype"]), label="how")
            if how == "drop":
                meta.pop(key, None)
                ops.append(f"drop {key}")
            else:
                values = _retype(meta.get(key)) if how == "retype" else ODD_VALUES
                meta[key] = data.draw(st.sampled_from(values) if how == "retype" else values, label="value")
                ops.append(f"{how} {key} = {meta[key]!r:.80}")
    else:
        meta, ops = mutate_tree(data, meta, extra_values=extra, allow_alias=False)
    if data.draw(st.integers(0, 3), label="label_names?") == 0 and isinstance(meta, dict):
        meta["label_names"] = data.draw(st.sampled_from(label_names), label="label_names")
        ops.append(f"label_names = {meta['label_names']!r:.60}")
    content = json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if data.draw(st.integers(0, 3), label="damage json?") == 0:
        content, more = damage_text(data, content, ["{", "}", "[", ",", '"', ":", "NaN", "-Infinity", "\x00"])
        ops += more

    def build(tmp: Path):
        ckpt = tmp / "ckpt"
        shutil.copytree(env.checkpoint(base), ckpt)
        (ckpt / "deltafit.json").write_bytes(content)
        return ["eval", str(ckpt)], ops, ckpt / "deltafit.json"

    _try(env, "checkpoint", "eval", build, plan, ops)


# ----------------------------------------------------------------------------------------------
# The tests: fast (a few seeded examples per target) and slow (many more)


def _counts(name: str) -> list:
    return [pytest.param(FAST[name], id="fast"), pytest.param(SLOW[name], id="slow", marks=pytest.mark.slow)]


@pytest.mark.parametrize("examples", _counts("recipe"))
def test_fuzzed_recipes_validate_cleanly(fuzz_env, examples):
    _fuzz(fuzz_env, "recipe", examples, lambda data: _recipe_example(fuzz_env, data))


@pytest.mark.parametrize("examples", _counts("data"))
def test_fuzzed_data_files_validate_cleanly(fuzz_env, examples):
    _fuzz(fuzz_env, "data", examples, lambda data: _data_example(fuzz_env, data, "validate"))


@pytest.mark.parametrize("examples", _counts("data-train"))
def test_fuzzed_data_files_train_one_step_cleanly(fuzz_env, examples):
    _fuzz(fuzz_env, "data-train", examples, lambda data: _data_example(fuzz_env, data, "train"))


@pytest.mark.parametrize("examples", _counts("checkpoint"))
def test_fuzzed_checkpoint_metadata_evaluates_cleanly(fuzz_env, examples):
    _fuzz(fuzz_env, "checkpoint", examples, lambda data: _checkpoint_example(fuzz_env, data))


def test_the_unmutated_inputs_pass(fuzz_env):
    """The fuzz's starting points are valid (validate the recipe, evaluate the checkpoint: exit 0), so
    an input that fails does so because of its mutations."""
    for argv in (["validate", str(fuzz_env.valid / "alpaca.yaml")], ["eval", str(fuzz_env.checkpoint("cls"))]):
        run = Run("baseline", argv, [], "-", b"")
        with tempfile.TemporaryDirectory(dir=fuzz_env.root / "examples") as tmp:
            _run(fuzz_env, run, Path(tmp), TIMEOUT[argv[0]])
        assert run.code == 0 and "Traceback" not in run.err, _describe(run)


def test_the_judge_catches_each_broken_promise(tmp_path):
    """The checks themselves (no process): each way a run can break the contract is flagged, a clean
    error and a clean success are not."""
    def judged(code, err="", out="", hung=False, changed=False) -> list[str]:
        run = Run("self-test", ["validate", "x.yaml"], [], "x.yaml", b"", code, out, err, hung)
        _judge(run, {tmp_path / "x": "a"}, {tmp_path / "x": "b" if changed else "a"}, tmp_path)
        return run.problems

    assert judged(0, out="plan\nrecipe is valid\n") == []
    assert judged(2, err="error: recipe key 'train.lr': bad\n\n") == []
    assert judged(1, err="Traceback (most recent call last):\nTypeError: x\n")
    assert judged(2, err="warning: something\nerror: bad\n")
    assert judged(2, err="bad\n")
    assert judged(None, hung=True)
    assert judged(2, err="error: bad\n", changed=True)
    assert judged(0, out="Traceback (most recent call last):")
