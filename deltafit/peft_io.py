"""PEFT interoperability: export a deltafit checkpoint as a PEFT adapter, import a PEFT adapter.

A PEFT adapter is a directory with `adapter_config.json` (the PEFT config: `peft_type`,
`task_type`, `base_model_name_or_path` and the method's own fields) and `adapter_model.safetensors`.
The per-method mapping lives with each method (`Delta.peft_type`, `to_peft`, `from_peft`); this
module does the generic part: the common config fields, the task head (PEFT's `modules_to_save`),
the key prefixes, the atomic write, and reading an adapter back as a checkpoint for eval/merge.

Key prefixes (as PEFT writes them): methods that change the model's modules ("tuners": LoRA...)
key their tensors `base_model.model.<module>.<tensor>`; prompt-learning methods key their one
tensor `prompt_embeddings`, and their saved head modules `base_model.<module>.<tensor>`. A tuner
tensor that hangs on PEFT's tuner itself rather than on a module of the model (VeRA's shared
`base_model.vera_A` / `vera_B`) is returned by `to_peft` with its full `base_model.` key and kept
as is; on import it reaches `from_peft` under that full key.

What PEFT's config has no field for travels in the safetensors metadata of the weights file
(`deltafit.label_names`: a classifier's labels by id, as JSON), which PEFT and transformers read
past without a word; the import reads it back so the eval data's labels map to the trained ids.
A classifier pooled by deltafit's `mean` hook is refused: PEFT and transformers pool the first
token, so the adapter would not reproduce the checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from deltafit import checkpoint, deltas
from deltafit.deltas.base import HEAD_PREFIX
from deltafit.errors import UserError
from deltafit.fsutil import atomic_dir, new_output_dir

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CARTRIDGE"}
ROOT = "base_model."  # keys from `to_peft` that already start with it are PEFT's full keys
# Config fields that describe the training run rather than the method: a method that leaves one
# None in `to_peft` gets it from the checkpoint (PEFT's AdaLoRA config must name its run's length).
RUN_FIELDS = {"total_step": lambda meta: max(1, int(meta.get("step") or 1))}
LABELS_KEY = "deltafit.label_names"  # safetensors metadata: a classifier's label names by id (JSON list)


def export_checkpoint(path: str, output: str, fmt: str = "peft") -> dict:
    """Write the checkpoint at `path` as a PEFT adapter directory `output`."""
    if fmt != "peft":
        raise UserError(f"--format '{fmt}' is not supported; valid: peft")
    from deltafit.loading import load_checkpoint

    directory, meta, tensors = load_checkpoint(path)
    skeleton = _meta_model(meta)
    _refuse_mean_pooling(directory, skeleton)
    out = new_output_dir(Path(output), directory)
    method = deltas.get(meta["method"])
    config = method.Config.model_validate(meta["delta_config"])
    own = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    fields, peft_tensors = method.to_peft(config, own, lambda: _model_config(meta))
    fields = {**fields, **{k: fill(meta) for k, fill in RUN_FIELDS.items() if k in fields and fields[k] is None}}
    if "fan_in_fan_out" in fields:
        fields["fan_in_fan_out"] = _fan_in_fan_out(skeleton, fields.get("target_modules"))
    prefix = _tensor_prefix(method.peft_type)
    adapter = {k if method.peft_type in PROMPT_LEARNING or k.startswith(ROOT) else prefix + k: v
               for k, v in peft_tensors.items()}
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    adapter.update({prefix + k: v for k, v in head.items()})
    adapter_config = {**_common_fields(meta, method.peft_type, head), **fields}
    _write_adapter(out, adapter_config, adapter, _extra_metadata(meta))
    return {"output": str(out), "method": meta["method"], "peft_type": method.peft_type,
            "tensors": len(adapter), "modules_to_save": adapter_config["modules_to_save"]}


def _common_fields(meta: dict, peft_type: str, head: dict) -> dict:
    model = meta["model"]
    return {
        "peft_type": peft_type,
        "task_type": TASK_TYPES[meta["task"]],
        "base_model_name_or_path": _base_reference(model),
        "revision": model.get("revision"),
        "inference_mode": True,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in head}) or None,
    }


def _base_reference(model: dict) -> str:
    """What PEFT users pass to from_pretrained: the hub id, or the local directory it resolved to
    (pkg: models are installed directories; GGUF files go through deltafit's dequantized copy)."""
    from deltafit.model import plain_ref
    from deltafit.recipe import ModelSpec

    ref = plain_ref(ModelSpec.model_validate(model))
    return str(Path(ref.path).resolve()) if ref.is_local else ref.path


def _model_config(meta: dict):
    """The base model's transformers config (no weights), for methods whose PEFT fields need it."""
    from deltafit.model import load_config
    from deltafit.recipe import ModelSpec

    return load_config(ModelSpec.model_validate(meta["model"]))


def _meta_model(meta: dict):
    """The checkpoint's model on the meta device (no weights): its module types and pooling."""
    from deltafit.model import meta_model
    from deltafit.recipe import ModelSpec

    return meta_model(ModelSpec.model_validate(meta["model"]), num_labels=2)


def _refuse_mean_pooling(directory: Path, skeleton) -> None:
    """PEFT and transformers classifiers pool the first ([CLS]) token; deltafit's mean pooling is a
    hook of its own, so an adapter of a mean-pooled classifier would give other logits under PEFT."""
    from deltafit.model import POOLING_CONFIG_KEY

    if getattr(skeleton.config, POOLING_CONFIG_KEY, None) == "mean":
        raise UserError(f"checkpoint '{directory}' was trained with model.pooling: mean (the default for "
                        f"sentence-transformers bases), which PEFT and transformers cannot reproduce: their "
                        f"classifiers pool the [CLS] token. Train with model.pooling: cls to export; this "
                        f"checkpoint itself works with `deltafit eval` and `deltafit merge`")


def _fan_in_fan_out(skeleton, targets) -> bool:
    """PEFT's fan_in_fan_out says its target stores the weight (in, out), as transformers' Conv1D
    (GPT-2) does; PEFT overrides it per layer with a warning when it does not fit. The first target
    decides, so a model of one layer kind loads silently; mixed kinds warn at each change whatever
    the value (PEFT carries the corrected value on to the next layer)."""
    from transformers.pytorch_utils import Conv1D

    names = set(targets) if isinstance(targets, (list, tuple, set)) else set()
    for name, module in skeleton.named_modules():
        if name in names:
            return isinstance(module, Conv1D)
    return False


def _extra_metadata(meta: dict) -> dict[str, str]:
    """What deltafit reads back on import beyond PEFT's config (safetensors metadata is str -> str)."""
    names = meta.get("label_names")
    return {LABELS_KEY: json.dumps([str(n) for n in names])} if meta["task"] == "seq-cls" and names else {}


def _tensor_prefix(peft_type: str) -> str:
    return "base_model." if peft_type in PROMPT_LEARNING else "base_model.model."


def _write_adapter(out: Path, config: dict, tensors: dict[str, torch.Tensor], extra: dict[str, str]) -> None:
    """Both files into a temp sibling, renamed into place: never a half-written adapter."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", **extra})  # PEFT writes (and transformers expects) "format"
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Import


def is_peft_adapter(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_peft_adapter(path: Path, base_model: Optional[str] = None) -> tuple[dict, dict]:
    """(metadata, tensors) of a PEFT adapter directory, shaped like a deltafit checkpoint's; the
    metadata also holds the recipe it stands for (`recipe`: model, delta, a data section for --data)."""
    path = Path(path)
    fields = _read_config(path)
    peft_type, task = fields.get("peft_type"), _task(fields, path)
    method = _method_for(peft_type, path)
    tensors = _read_tensors(path)
    prefix = _tensor_prefix(peft_type)
    head_modules = fields.get("modules_to_save") or []
    head, own = _split_head(tensors, prefix, head_modules)
    name = base_model or fields.get("base_model_name_or_path")
    if not name:
        raise UserError(f"PEFT adapter '{path}': {CONFIG} names no base_model_name_or_path; pass --base-model")
    model = {"name": name, "task": task, **({"revision": fields["revision"]} if fields.get("revision") else {})}
    delta_config, state = method.from_peft(fields, own, lambda: _model_config({"model": model}))
    state.update({HEAD_PREFIX + k: v for k, v in head.items()})
    label_names = None
    if task == "seq-cls":
        model["num_labels"] = _num_labels(head, path)
        model.update(_cls_pooling(model))
        label_names = _adapter_label_names(path, model)
    # An adapter carries no data: eval needs --data, read as classification rows or alpaca rows.
    recipe = {"model": model, "data": {"train": "", "format": "classification" if task == "seq-cls" else "alpaca"},
              "delta": delta_config}
    # The method is the one `from_peft` chose: a LORA adapter with use_dora imports as "dora".
    meta = {"format": checkpoint.FORMAT, "method": delta_config["method"], "delta_config": delta_config,
            "model": model, "task": task, "label_names": label_names, "step": None, "epoch": None,
            "source": f"peft:{path}", "recipe": recipe}
    return meta, state


def _read_config(path: Path) -> dict:
    try:
        fields = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"PEFT adapter '{path}': {CONFIG} is not readable JSON ({e})") from None
    if not isinstance(fields, dict) or "peft_type" not in fields:
        raise UserError(f"PEFT adapter '{path}': {CONFIG} has no peft_type")
    _check_fields(fields, path)
    return fields


def _check_fields(fields: dict, path: Path) -> None:
    """The config fields the import reads (`PEFT_FIELDS`) have the kind of value it needs: checked
    before any is used, so a null or a string where a number belongs names its key."""
    peft_type = fields["peft_type"] if isinstance(fields["peft_type"], str) else ""
    wanted = {**PEFT_FIELDS["*"], **PEFT_FIELDS.get(peft_type, {})}
    for key, (ok, expected) in wanted.items():
        if key not in fields and key in PEFT_REQUIRED.get(peft_type, ()):
            raise UserError(f"PEFT adapter '{path}': {CONFIG} lacks '{key}' ({expected}), which {peft_type} "
                            f"adapters need")
        if key in fields and not ok(fields[key]):
            shown = json.dumps(fields[key])
            raise UserError(f"PEFT adapter '{path}': {CONFIG} key '{key}' must be {expected}, got "
                            f"{shown if len(shown) <= 80 else shown[:77] + '...'}")


def _whole(value) -> bool:
    return type(value) is int or (type(value) is float and value.is_integer())  # JSON 8.0 is 8; a bool is not


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _or_null(check):
    return lambda value: value is None or check(value)


_NAMES = (_or_null(lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
          "null or a list of module names")
_RANK = (lambda v: _whole(v) and v >= 1, "a whole number >= 1")
_NUMBER = (_number, "a number")
_WHOLE_OR_NULL = (_or_null(_whole), "a whole number or null")
_NUMBER_OR_NULL = (_or_null(_number), "a number or null")
# adapter_config.json fields the import reads ("*": every adapter; else by peft_type, for its
# method's `from_peft`), each with a check and what it must be. Null is accepted where the reader
# has a default for it (PEFT's own), and refused where the value is needed.
PEFT_FIELDS = {
    "*": {"peft_type": (lambda v: isinstance(v, str), "a PEFT type name (a string)"),
          "base_model_name_or_path": (_or_null(lambda v: isinstance(v, str)), "a model name or path (a string)"),
          "revision": (_or_null(lambda v: isinstance(v, str)), "a revision name (a string) or null"),
          "modules_to_save": _NAMES},
    "LORA": {"r": _RANK, "lora_alpha": _NUMBER, "lora_dropout": _NUMBER_OR_NULL,
             "use_rslora": (_or_null(lambda v: isinstance(v, bool)), "true, false or null")},
    "VERA": {"r": _RANK, "projection_prng_key": _WHOLE_OR_NULL, "d_initial": _NUMBER, "vera_dropout": _NUMBER_OR_NULL},
    "ADALORA": {"init_r": (_or_null(_RANK[0]), "a whole number >= 1 or null"), "lora_alpha": _NUMBER_OR_NULL,
                "lora_dropout": _NUMBER_OR_NULL,
                **dict.fromkeys(("target_r", "tinit", "tfinal", "deltaT"), _WHOLE_OR_NULL),
                **dict.fromkeys(("beta1", "beta2", "orth_reg_weight"), _NUMBER_OR_NULL)},
    "PREFIX_TUNING": {"num_transformer_submodules": _WHOLE_OR_NULL},
    "PROMPT_TUNING": {"num_transformer_submodules": _WHOLE_OR_NULL},
    "P_TUNING": {"num_transformer_submodules": _WHOLE_OR_NULL},
    "IA3": {"feedforward_modules": (_or_null(lambda v: isinstance(v, str) or _NAMES[0](v)),
                                    "null, a regex (a string) or a list of module names")},
}
PEFT_REQUIRED = {"LORA": ("r", "lora_alpha"), "VERA": ("r",)}  # read without a default


def _task(fields: dict, path: Path) -> str:
    tasks = {v: k for k, v in TASK_TYPES.items()}
    task_type = fields.get("task_type")
    if not isinstance(task_type, str) or task_type not in tasks:
        shown = "null" if task_type is None else repr(task_type)
        raise UserError(f"PEFT adapter '{path}': {CONFIG} task_type {shown} is not supported; "
                        f"deltafit reads {', '.join(tasks)} adapters")
    return tasks[task_type]


def _method_for(peft_type: str, path: Path):
    """The first registered method that maps to this PEFT type (so LORA imports as 'lora')."""
    for cls in deltas.all_methods().values():
        if cls.peft_type == peft_type:
            return cls
    readable = sorted({cls.peft_type for cls in deltas.all_methods().values() if cls.peft_type})
    raise UserError(f"PEFT adapter '{path}': peft_type {peft_type!r} cannot be imported: deltafit has no method "
                    f"for it; deltafit reads {', '.join(readable)} adapters")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (path / WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise UserError(f"PEFT adapter '{path}' has no {WEIGHTS} (found: {found}); pickle files (.bin) are never "
                        f"loaded: re-save it with safe_serialization=True")
    try:
        return load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"PEFT adapter '{path}': {WEIGHTS} is damaged ({e})") from None


def _split_head(tensors: dict, prefix: str, head_modules: list[str]) -> tuple[dict, dict]:
    """(task head tensors, method tensors), both keyed by model names without PEFT's prefix."""
    head, own = {}, {}
    for key, value in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        module = name.rsplit(".", 1)[0]
        if any(module == m or module.endswith("." + m) or module.startswith(m + ".") for m in head_modules):
            head[name] = value
        else:
            own[name] = value
    return head, own


def _num_labels(head: dict, path: Path) -> int:
    sizes = [v.shape[0] for k, v in head.items()
             if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
    if not sizes:
        raise UserError(f"PEFT adapter '{path}' is a classifier but holds no classifier head (modules_to_save)")
    return int(sizes[0])


def _cls_pooling(model: dict) -> dict:
    """PEFT pools a classifier's first token: {"pooling": "cls"} where the architecture has a pooler
    (else deltafit's default, mean for a sentence-transformers base, would change the logits)."""
    from deltafit.model import POOLING_CONFIG_KEY

    return {"pooling": "cls"} if hasattr(_meta_model({"model": model}).config, POOLING_CONFIG_KEY) else {}


def _adapter_label_names(path: Path, model: dict) -> Optional[list[str]]:
    """The label names deltafit's export stored in the weights' metadata, else the base config's
    own id2label when it names real labels for every output; None when neither does (eval then
    checks that the data's labels are as many as the head's outputs)."""
    stored = _stored_label_names(path)
    if stored is not None:
        if len(stored) != model["num_labels"]:
            raise UserError(f"PEFT adapter '{path}': {WEIGHTS} names {len(stored)} labels ({LABELS_KEY}) but its "
                            f"classifier head has {model['num_labels']} outputs")
        return stored
    id2label = getattr(_model_config({"model": model}), "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i)))) for i in range(len(id2label))]
    # transformers' placeholders (LABEL_0, ...) name no label; another head's names do not fit this one.
    if names == [f"LABEL_{i}" for i in range(len(names))] or len(names) != model["num_labels"]:
        return None
    return names


def _stored_label_names(path: Path) -> Optional[list[str]]:
    from safetensors import safe_open

    raw = (safe_open(str(path / WEIGHTS), framework="pt").metadata() or {}).get(LABELS_KEY)
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise UserError(f"PEFT adapter '{path}': {WEIGHTS} metadata '{LABELS_KEY}' must be a JSON list of distinct "
                        f"label names, got {raw[:80]!r}")
    return names
