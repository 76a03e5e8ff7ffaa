"""The tokenized-data cache (`data.cache`): `<DELTAFIT_CACHE>/data/<key>/`.

Entries are Arrow IPC files plus JSON (no pickle), written through `fsutil.atomic_dir`: a
temporary folder renamed into place, so no half-written entry is ever read. The key is a hash of
everything that changes the content: the bytes of the data files (a hub dataset's fingerprint),
the tokenizer (its full serialized state and behaviour) and chat template, every data option
(format, columns, max_length, packing, train_on_inputs...), and the source of every module of this
package. The cache is optional: an entry that cannot be read is rebuilt, one that cannot be
written is skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from deltafit.data.mixture import is_mixture, source_specs
from deltafit.data.sources import BUILTIN_PREFIX, _looks_local, hidden_in, load_rows
from deltafit.fsutil import atomic_dir, sha256_file
from deltafit.tasks import load_builtin


def data_cache_root() -> Path:
    from deltafit.model import cache_dir  # the same root as the dequantized-model cache

    return cache_dir() / "data"


def _cache_key(spec, tokenizer, task: str, seed: int, label_names, want_train: bool) -> Optional[str]:
    """Hash of everything that decides the prepared data; None when a source cannot be fingerprinted
    (a missing file: building then reports it properly)."""
    import tokenizers
    import transformers

    sources = _sources(spec, want_train)
    fingerprints = [_source_fingerprint(*source) for source in sources]
    if None in fingerprints:
        return None
    selects = spec.eval_fraction or spec.max_train_examples or is_mixture(spec)
    parts = {
        "code": _code_fingerprint(),
        "libraries": [transformers.__version__, tokenizers.__version__],
        # Files are known by their bytes, not their paths: a moved or copied file still hits.
        "sources": [[config, split, key, fingerprint]
                    for (_, config, split, key), fingerprint in zip(sources, fingerprints)],
        "spec": spec.model_dump(mode="json", exclude={"cache", "train", "eval"}),
        # A mixture: every entry's weight and own data keys (its source's bytes are in "sources").
        "mixture": [entry.model_dump(mode="json", exclude={"source"}) for entry in spec.train]
        if is_mixture(spec) else None,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "task": task, "label_names": label_names, "want_train": want_train,
        "seed": seed if selects else None,  # the seed only picks rows when rows are held out or capped
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


PACKAGE_DIR = Path(__file__).resolve().parent  # deltafit/data: the code that prepares data


def _code_fingerprint() -> str:
    """The source of every module of this package (relative names and bytes): any change to how data
    is prepared, in whichever module, invalidates what was cached before."""
    digest = hashlib.sha256()
    for name in sorted(path.relative_to(PACKAGE_DIR).as_posix() for path in PACKAGE_DIR.rglob("*.py")):
        digest.update(f"{name}\0{sha256_file(PACKAGE_DIR / name)}\n".encode())
    return digest.hexdigest()


def _sources(spec, want_train: bool) -> list[tuple[str, Optional[str], str, str]]:
    """(source, config, split, recipe key) of every dataset `_load_splits` reads for this spec."""
    sources = []
    if want_train or spec.eval_fraction:
        sources += [(s.train, s.config, s.split, key) for key, s, _ in source_specs(spec)]
    if spec.eval:
        config = spec.config if spec.eval == spec.train else None
        sources.append((spec.eval, config, spec.eval_split or "train", "data.eval"))
    elif spec.eval_split:
        sources.append((spec.train, spec.config, spec.eval_split, "data.eval_split"))
    return sources


def _source_fingerprint(source: str, config: Optional[str], split: str, key: str) -> Optional[str]:
    """Content hash of a local file or folder or builtin dataset; a hub dataset's own fingerprint."""
    if source.startswith(BUILTIN_PREFIX):
        rows = load_builtin(source[len(BUILTIN_PREFIX):])
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    path = Path(source).expanduser()
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(f for f in path.rglob("*") if f.is_file() and not hidden_in(f, path)):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            sha256_file(file, digest)
        return digest.hexdigest()
    if _looks_local(source, path):
        return None
    # Hub datasets: the datasets library fingerprints the prepared files of the revision it loaded.
    return f"hub:{source}:{load_rows(source, config, split, key)._fingerprint}"


def _tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's full serialized state (vocab, merges, added tokens, normalizer, templates),
    its chat template, special tokens, and how it encodes a probe (catches e.g. add_bos_token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    probe = "Hello world!\n  2 + 2 = 4"
    parts = [type(tokenizer).__name__, state, getattr(tokenizer, "chat_template", None),
             str(tokenizer.special_tokens_map), tokenizer.eos_token_id, tokenizer.bos_token_id,
             tokenizer(probe)["input_ids"], tokenizer(probe, add_special_tokens=False)["input_ids"]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


SPLITS = ("train", "eval")


def _read_cache(key: str) -> Optional[tuple]:
    """The cached (train, eval, label_names, stats) of a `Prepared`, or None when absent or unreadable
    (it is then rebuilt and replaced)."""
    import pyarrow

    directory = data_cache_root() / key
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        splits = {name: _read_table(directory / f"{name}.arrow") if meta["has"][name] else None for name in SPLITS}
    except (OSError, ValueError, KeyError, pyarrow.lib.ArrowException):
        return None
    return splits["train"], splits["eval"], meta["label_names"], meta["stats"]


def _read_table(path: Path) -> list[dict]:
    import pyarrow

    with pyarrow.memory_map(str(path)) as source:
        return pyarrow.ipc.open_file(source).read_all().to_pylist()


def _write_cache(key: str, prepared) -> None:
    """A `Prepared` as Arrow IPC files + JSON in a temporary folder renamed into place (`atomic_dir`):
    never a half-written entry."""
    import pyarrow

    try:
        # replace: an entry is only written after it could not be read, so one already there is damaged.
        with atomic_dir(data_cache_root() / key, replace=True) as tmp:
            for name in SPLITS:
                rows = getattr(prepared, name)
                if rows is not None:
                    table = pyarrow.Table.from_pylist(rows)
                    with pyarrow.OSFile(str(tmp / f"{name}.arrow"), "wb") as sink:
                        with pyarrow.ipc.new_file(sink, table.schema) as writer:
                            writer.write_table(table)
            meta = {"has": {name: getattr(prepared, name) is not None for name in SPLITS},
                    "label_names": prepared.label_names, "stats": prepared.stats}
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    except OSError:
        pass  # another process is replacing the same entry, or the cache is not writable: it is optional
