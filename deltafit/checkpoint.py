"""Delta-only, self-describing checkpoints, written atomically and loaded without unpickling.

A checkpoint is a directory:
    deltafit.json        what it is: method + config, base model, task, labels, step, versions
    delta.safetensors    the delta's tensors (and a new task head's), nothing of the frozen base
    recipe.yaml          the resolved recipe that produced it
    trainer/             (step checkpoints only) optimizer, scheduler and RNG state for --resume;
                         under train.fsdp also shards/: each process's slices of the optimizer state
                         (rank-NNNNN.safetensors + .json, see deltafit/sharding.py)

Everything is written into a temporary sibling directory that is renamed into place at the end,
so a run killed mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import deltafit
from deltafit.errors import UserError
from deltafit.fsutil import TMP_MARK, atomic_dir, sha256_file

FORMAT = "deltafit-checkpoint"
FORMAT_VERSION = 1
META = "deltafit.json"
TENSORS = "delta.safetensors"
RECIPE = "recipe.yaml"
TRAINER = "trainer"
STEP_PREFIX = "step-"


# Recipe values that may name local files or folders, relative to the directory training ran in. A
# checkpoint records them absolute, so eval, merge and --resume find the same ones from anywhere.
PATH_KEYS = {"model": ("name", "tokenizer"), "data": ("train", "eval")}


def absolute_paths(recipe_dict: dict) -> dict:
    """A copy of a recipe (or part of one) whose relative local paths are absolute; hub ids, pkg:
    and builtin: names, and paths that do not exist here are kept as written."""
    out = {**recipe_dict}
    for section, keys in PATH_KEYS.items():
        if isinstance(out.get(section), dict):
            part = out[section] = {**out[section]}
            part.update({key: _absolute(part[key]) for key in keys if key in part})
            if isinstance(part.get("train"), list):  # a mixture: each entry names its source
                part["train"] = [{**e, "source": _absolute(e.get("source"))} if isinstance(e, dict) else e
                                 for e in part["train"]]
    return out


def _absolute(value):
    if not isinstance(value, str) or not value or value.startswith(("pkg:", "builtin:")) or "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def metadata(recipe, delta, label_names: Optional[list[str]], step: int, epoch: float) -> dict:
    """Everything eval and merge need to rebuild the model from the checkpoint path alone."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltafit_version": deltafit.__version__,
        "method": delta.name,
        "delta_config": delta.config.model_dump(mode="json"),
        "model": absolute_paths({"model": recipe.model.model_dump(mode="json")})["model"],
        "task": recipe.model.task,
        "label_names": label_names,
        "step": step,
        "epoch": epoch,
    }


def save(directory: Path, meta: dict, tensors: dict[str, torch.Tensor], recipe_dict: dict,
         trainer_state: Optional[dict] = None, before_metadata: Optional[Callable[[Path], None]] = None,
         shard_files: tuple[Path, ...] = ()) -> Path:
    """Write a checkpoint atomically (temp dir + rename); replaces an existing one of that name.

    `shard_files`: files the processes of a sharded run wrote beside it (their slices of the
    optimizer state); they are moved into trainer/shards/ before the metadata marks it complete.

    `before_metadata(tmp_dir)`, when given, is called once every other file is in the temporary
    directory, just before the manifest and metadata (the training loop's `during_save` hook)."""
    directory = Path(directory)
    try:
        with atomic_dir(directory, replace=True, durable=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
            (tmp / RECIPE).write_text(yaml.safe_dump(absolute_paths(recipe_dict), sort_keys=False), encoding="utf-8")
            if trainer_state is not None:
                _save_trainer_state(tmp / TRAINER, trainer_state, shard_files)
            if before_metadata is not None:
                before_metadata(tmp)
            meta = {**meta, "files": _manifest(tmp)}  # sizes and hashes: a damaged file is caught on load
            _write_json(tmp / META, meta)  # written last: its presence marks the content complete
    except OSError as e:  # disk full, quota, permissions: the partial copy is gone, the old one kept
        kept = f"; the existing '{directory.name}' is untouched" if directory.exists() else ""
        raise UserError(f"could not write checkpoint '{directory}': {e.strerror or e}{kept}. "
                        f"Free disk space or choose another --output") from None
    return directory


def estimated_bytes(tensors: dict[str, torch.Tensor], with_optimizer: bool) -> int:
    """Size of one checkpoint of these tensors; AdamW keeps two more tensors of each."""
    size = sum(t.numel() * 4 for t in tensors.values())  # stored as the params' dtype, fp32 at most
    return size * (3 if with_optimizer else 1)


def load(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint; anything that is not one is a clear user error."""
    directory = find_checkpoint(path)
    meta = read_meta(directory)
    problem = damage(directory, meta)
    if problem:
        raise UserError(f"checkpoint '{directory}' is damaged: {problem}")
    try:
        tensors = load_file(str(directory / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint '{directory}': {TENSORS} is damaged or truncated ({e})") from None
    return meta, tensors


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory (its final checkpoint, else the latest step)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if (path / META).is_file():
        return _require_tensors(path)
    if (path / "final" / META).is_file():
        return _require_tensors(path / "final")
    latest = latest_step_checkpoint(path / "checkpoints")
    if latest is not None:
        return latest
    found = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else []
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    hint = f"; pickle files ({', '.join(pickles)}) are never loaded, only safetensors + JSON" if pickles else ""
    if (path / "adapter_config.json").is_file():
        hint = "; it is a PEFT adapter: `deltafit eval` and `deltafit merge` read it directly"
    raise UserError(f"'{path}' is not a deltafit checkpoint (no {META}; found: {', '.join(found) or 'nothing'}){hint}")


def read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint '{directory}': {META} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint '{directory}': {META} is not deltafit checkpoint metadata")
    missing = [k for k in ("method", "delta_config", "model", "task") if k not in meta]
    if missing:
        raise UserError(f"checkpoint '{directory}': {META} lacks {', '.join(missing)}")
    _check_meta_types(directory, meta)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"checkpoint '{directory}' was written by a newer deltafit "
                        f"(format {meta['format_version']}); upgrade deltafit")
    _check_delta_config(directory, meta)
    return meta


def _check_delta_config(directory: Path, meta: dict) -> None:
    """The method and its options must be ones this deltafit can rebuild (checked before any weights load)."""
    from deltafit.recipe import validate_delta

    where = f"checkpoint '{directory}' {META}"
    if not isinstance(meta["delta_config"], dict):
        raise UserError(f"{where}: delta_config must be a mapping of the method's options")
    config = validate_delta(meta["delta_config"], source=where)
    if meta["method"] != config.method:
        raise UserError(f"{where}: method '{meta['method']}' does not match delta_config's method '{config.method}'")


def _check_meta_types(directory: Path, meta: dict) -> None:
    """Every metadata field a command reads has the type `metadata` writes (checked up front: a wrong
    one would otherwise fail deep inside eval, merge, export or resume). Optional fields may be absent."""
    from typing import get_args

    from pydantic import ValidationError

    from deltafit.recipe import ModelSpec

    tasks = get_args(ModelSpec.model_fields["task"].annotation)
    checks = {**_META_TYPES, "task": (lambda v: isinstance(v, str) and v in tasks, f"one of {', '.join(tasks)}")}
    for key, (ok, expected) in checks.items():
        if key in meta and not ok(meta[key]):
            raise UserError(f"checkpoint '{directory}': {META} key '{key}' must be {expected}, "
                            f"got {_json_shown(meta[key])}")
    # The model section's known fields as a recipe has them (unknown keys: older deltafits wrote others).
    try:
        ModelSpec.model_validate({k: v for k, v in meta["model"].items() if k in ModelSpec.model_fields})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(["model", *(str(p) for p in err["loc"])])
        if err["type"] == "missing":
            raise UserError(f"checkpoint '{directory}': {META} lacks key '{key}'") from None
        raise UserError(f"checkpoint '{directory}': {META} key '{key}': {err['msg']}, "
                        f"got {_json_shown(err.get('input'))}") from None


def _whole(value) -> bool:
    return type(value) is int and value >= 0  # not a bool, not 1.5


def _real(value) -> bool:
    import math

    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _manifest_ok(files) -> bool:
    return isinstance(files, dict) and all(
        isinstance(w, dict) and _whole(w.get("bytes")) and isinstance(w.get("sha256"), str) for w in files.values())


def _label_names_ok(names) -> bool:
    return names is None or (isinstance(names, list) and len(names) >= 2 and len(set(map(str, names))) == len(names)
                             and all(isinstance(n, str) for n in names))


def _json_shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# deltafit.json key -> (check, what it must be); "task" is added from the recipe's model.task choices.
_META_TYPES = {
    "format_version": (_whole, "a whole number >= 0"),
    "deltafit_version": (lambda v: isinstance(v, str), "a version string"),
    "method": (lambda v: isinstance(v, str), "a method name (a string)"),
    "delta_config": (lambda v: isinstance(v, dict), "a mapping of the method's options"),
    "model": (lambda v: isinstance(v, dict), "a mapping (the recipe's model section: name, task...)"),
    "label_names": (_label_names_ok, "null or a list of at least two distinct label strings"),
    "step": (lambda v: v is None or _whole(v), "a whole number >= 0"),
    "epoch": (lambda v: v is None or _real(v), "a number >= 0"),
    "files": (_manifest_ok, "a mapping of file names to {\"bytes\": whole number, \"sha256\": string}"),
}


def read_recipe_dict(directory: Path) -> dict:
    """The checkpoint's recipe.yaml, read like any recipe (plain YAML only)."""
    from deltafit.recipe import read_recipe_file

    path = Path(directory) / RECIPE
    if not path.is_file():
        raise UserError(f"checkpoint '{directory}': {RECIPE} is missing (every checkpoint is written with one, "
                        f"so this one is incomplete)")
    return read_recipe_file(path)


def _require_tensors(directory: Path) -> Path:
    if not (directory / TENSORS).is_file():
        raise UserError(f"checkpoint '{directory}' has no {TENSORS}")
    return directory


# ----------------------------------------------------------------------------------------------
# Step checkpoints for resume


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def latest_step_checkpoint(checkpoints: Path) -> Optional[Path]:
    """The newest complete, undamaged step checkpoint. Temp dirs of a killed save have no metadata
    and are ignored; one whose files do not match its manifest is passed over with a warning."""
    if not checkpoints.is_dir():
        return None
    candidates = sorted((p for p in checkpoints.iterdir() if p.name.startswith(STEP_PREFIX) and (p / META).is_file()),
                        key=lambda p: p.name, reverse=True)
    for candidate in candidates:
        try:
            problem = damage(candidate, read_meta(candidate))
        except UserError as e:
            problem = str(e)
        if not problem:
            return candidate
        _warn(f"skipping damaged checkpoint {candidate}: {problem}")
    return None


def damage(directory: Path, meta: dict) -> Optional[str]:
    """What is wrong with a checkpoint's files against the manifest in its metadata, or None."""
    files = meta.get("files") or {}
    if not isinstance(files, dict) or not all(
        isinstance(w, dict) and {"bytes", "sha256"} <= set(w) for w in files.values()
    ):
        return f"the file manifest in {META} is malformed"
    for name, want in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"the manifest names '{name}', outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match the hash recorded when it was written"
    return None


def _manifest(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)


def prune(output_dir: Path, keep_last: int) -> None:
    checkpoints = Path(output_dir) / "checkpoints"
    steps = sorted(p for p in checkpoints.iterdir() if p.name.startswith(STEP_PREFIX) and (p / META).is_file())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints.glob(f".{STEP_PREFIX}*{TMP_MARK}*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def _save_trainer_state(directory: Path, state: dict, shard_files: tuple[Path, ...] = ()) -> None:
    """Optimizer/scheduler/RNG state as safetensors + JSON (no pickle, like the delta itself)."""
    from deltafit.sharding import SHARDS

    directory.mkdir()
    if shard_files:
        (directory / SHARDS).mkdir()
        for path in shard_files:
            os.replace(path, directory / SHARDS / path.name)
    tensors, plain = _split_tensors(state["optimizer"], "optimizer")
    for part in ("method", "selection"):  # the method's schedule; early stopping and the best delta (train.py)
        part_tensors, part_plain = _split_tensors(state.get(part, {}), part)
        tensors.update(part_tensors)
        plain.update(part_plain)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(directory / "state.safetensors"))
    plain.update(scheduler=state["scheduler"], progress=state["progress"], python_rng=_py_rng())
    _write_json(directory / "state.json", plain)


def load_trainer_state(directory: Path) -> dict:
    """Inverse of _save_trainer_state (sharded optimizer state is put back together whole);
    restores the RNGs as a side effect."""
    from deltafit.sharding import SHARDS, join_shards

    try:
        tensors = load_file(str(directory / TRAINER / "state.safetensors"))
        tensors.update(join_shards(directory / TRAINER / SHARDS))
        plain = json.loads((directory / TRAINER / "state.json").read_text())
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint '{directory}' cannot be resumed: "
                        f"trainer state is missing or damaged ({e})") from None
    _check_trainer_state(directory, tensors, plain)
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda = [tensors.pop(k) for k in sorted(k for k in list(tensors) if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python_rng"]
    random.setstate((version, tuple(state), gauss))
    return {"optimizer": _join_tensors(plain["optimizer"], tensors), "scheduler": plain["scheduler"],
            "progress": plain["progress"], "method": _join_tensors(plain.get("method", {}), tensors),
            "selection": _join_tensors(plain.get("selection"), tensors)}


def _check_trainer_state(directory: Path, tensors: dict, plain: Any) -> None:
    """The shape resume relies on, checked before anything is restored."""
    where = f"checkpoint '{directory}' cannot be resumed: {TRAINER}/state.json"
    if not isinstance(plain, dict):
        raise UserError(f"{where} is not a JSON object")
    missing = [k for k in ("optimizer", "scheduler", "progress", "python_rng") if k not in plain]
    if missing or "rng.torch" not in tensors:
        raise UserError(f"{where} lacks {', '.join(missing or ['rng.torch (in state.safetensors)'])}")
    progress = plain["progress"]
    counts = progress.values() if isinstance(progress, dict) else [None]
    if not all(type(v) is int and v >= 0 for v in counts):
        raise UserError(f"{where}: 'progress' must map names to non-negative counts (got {str(progress)[:120]})")


def _split_tensors(obj: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Replace every tensor in a nested structure by a {'__tensor__': key} reference."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return tensors, {prefix: walk(obj, prefix)}


def _join_tensors(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            return tensors[node["__tensor__"]]
        return {(int(k) if k.isdigit() else k): _join_tensors(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_join_tensors(v, tensors) for v in node]
    return node


def _py_rng():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
