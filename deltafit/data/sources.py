"""Loading rows: local files by extension, hub datasets (and dataset folders), builtin tasks.

`load_rows` gives a local file as `ArrowRows` (no `datasets` import: it costs about 0.5 s) and a hub
dataset or folder as a `datasets.Dataset`; both answer the few calls the rest of the package makes.
A problem with a file's content is a `UserError` naming the recipe key and the path. CSV files use
CSV quoting; TSV files are read literally (GLUE's are unquoted); `data.columns` names the columns
of a header-less CSV/TSV file. A .txt file is header-less delimited text: each non-blank line one row,
split on `data.delimiter` (an exact string, no quoting, e.g. '||' for E2E NLG) into `data.columns`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from deltafit.errors import UserError
from deltafit.tasks import load_builtin

LOCAL_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
BUILTIN_PREFIX = "builtin:"  # datasets deltafit generates itself (deltafit/tasks.py)


def load_rows(source: str, config: Optional[str] = None, split: str = "train", key: str = "data.train",
              columns: Optional[list[str]] = None, delimiter: Optional[str] = None):
    """Rows of a local file (by extension, as `ArrowRows`) or a hub dataset (`datasets.Dataset`); never empty.
    `columns` (data.columns) names the columns of a header-less CSV/TSV/TXT file; any other source refuses it.
    `delimiter` (data.delimiter) splits the lines of a .txt file, which needs both."""
    path = Path(source).expanduser()
    if columns is not None:
        _check_headerless(source, path, key)
    _check_text_file(source, path, key, columns, delimiter)
    if delimiter is not None:
        columns = (columns, delimiter)
    if source.startswith(BUILTIN_PREFIX):
        ds = _from_records(load_builtin(source[len(BUILTIN_PREFIX):], key))
    elif _looks_local(source, path):
        ds = _load_local(path, split, key, columns)
    else:
        ds = _load_hub(source, config, split, key)
    if len(ds) == 0:
        raise UserError(f"recipe key '{key}': '{source}' has no rows")
    return ds


HEADERLESS_EXTENSIONS = (".csv", ".tsv", ".txt")  # the files whose columns data.columns can name
TEXT_EXTENSION = ".txt"  # header-less lines split on data.delimiter


def _check_text_file(source: str, path: Path, key: str, columns, delimiter) -> None:
    is_text = path.suffix.lower() == TEXT_EXTENSION and not source.startswith(BUILTIN_PREFIX) and not path.is_dir()
    if delimiter is not None and not is_text:
        raise UserError(f"recipe key 'data.delimiter': it splits the lines of a header-less .txt file, but {key} "
                        f"'{source}' is not one; remove data.delimiter")
    if is_text and (delimiter is None or columns is None):
        missing = " and ".join(k for k, v in (("data.delimiter", delimiter), ("data.columns", columns)) if v is None)
        raise UserError(f"recipe key '{missing.split(' and ')[0]}': {key} '{source}' is a .txt file: its lines are "
                        f"split on data.delimiter into the columns data.columns names (e.g. delimiter: '||', "
                        f"columns: [meaning_representation, target]); set {missing}")


def _check_headerless(source: str, path: Path, key: str) -> None:
    # Only a delimited text file has lines that could be a header or data; every other source names
    # its own columns, so data.columns there is a mistake rather than something to ignore.
    if path.suffix.lower() not in HEADERLESS_EXTENSIONS or source.startswith(BUILTIN_PREFIX) or path.is_dir():
        raise UserError(f"recipe key 'data.columns': it names the columns of a header-less .csv/.tsv/.txt file, "
                        f"but {key} '{source}' is not one (its columns come with it); remove data.columns")


class _BadFile(Exception):
    """A problem with a local file's content; `_load_local` adds the recipe key and the path."""


def _looks_local(source: str, path: Path) -> bool:
    # Hub ids look like 'name' or 'org/name'; anything else with a path shape is meant as a file,
    # so a typo in it should say "does not exist" instead of trying (and failing on) the hub.
    return (path.exists() or path.suffix.lower() in LOCAL_EXTENSIONS or source.startswith((".", "/", "~"))
            or source.count("/") > 1 or "\\" in source)


def _load_local(path: Path, split: str, key: str, columns: Optional[list[str]] = None):
    if not path.exists():
        raise UserError(f"recipe key '{key}': file '{path}' does not exist (expected a local "
                        f"{'/'.join(LOCAL_EXTENSIONS)} file or a hub dataset name)")
    if path.is_dir():
        return _load_folder(path, split, key)
    if path.suffix.lower() in COMPRESSED:
        return _load_compressed(path, key)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"recipe key '{key}': '{path}' has an unsupported extension "
                        f"(use one of {', '.join(LOCAL_EXTENSIONS)})")
    try:
        rows = reader(path, columns) if columns is not None else reader(path)
    except UnicodeDecodeError as e:
        raise UserError(f"recipe key '{key}': file '{path}' is not UTF-8 text "
                        f"(invalid byte at offset {e.start})") from None
    except _BadFile as e:
        raise UserError(f"recipe key '{key}': file '{path}' {e}") from None
    rows.source = str(path)  # so a bad value can be reported as "line 7 of '<path>'"
    return rows


DATA_SUFFIXES = (*LOCAL_EXTENSIONS, ".arrow")  # what a folder's data files may be (before .gz & co.)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Files of a dataset folder that describe it rather than hold rows.
DATASET_METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")


def _load_folder(path: Path, split: str, key: str):
    """A folder of data files (or a dataset repo clone, or a `save_to_disk` folder): the datasets
    library knows those layouts, but reads one format per folder, silently skipping the others."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_folder(lambda: _saved_split(datasets.load_from_disk(str(path)), split), path, split, key)
    kinds = sorted({_data_suffix(f) for f in path.rglob("*")
                    if f.is_file() and not hidden_in(f, path) and f.name not in DATASET_METADATA} - {None})
    if len(kinds) > 1:
        raise UserError(f"recipe key '{key}': folder '{path}' mixes {' and '.join(kinds)} files; only one format "
                        f"per folder is read (the others would be skipped): keep one, or list the files as a "
                        f"data.train mixture")
    if not kinds:
        raise UserError(f"recipe key '{key}': folder '{path}' holds no data files (expected "
                        f"{'/'.join(LOCAL_EXTENSIONS)} files, possibly gzip-compressed)")
    return _read_folder(lambda: datasets.load_dataset(str(path), split=split), path, split, key)


# A compressed file (train.jsonl.gz) by the format of what it holds: the datasets library's readers,
# which decompress as they read.
COMPRESSED_READERS = {".json": ("json", {}), ".jsonl": ("json", {}), ".csv": ("csv", {}),
                      ".tsv": ("csv", {"sep": "\t"})}


def _load_compressed(path: Path, key: str):
    import datasets

    inner = _data_suffix(path)
    if inner not in COMPRESSED_READERS:
        raise UserError(f"recipe key '{key}': '{path}' is compressed; compressed files can hold "
                        f"{'/'.join(COMPRESSED_READERS)} data (e.g. train.jsonl.gz), not {inner or 'this'}")
    builder, options = COMPRESSED_READERS[inner]
    return _read_folder(lambda: datasets.load_dataset(builder, data_files=str(path), split="train", **options),
                        path, "train", key)


def _saved_split(loaded, split: str):
    """A `save_to_disk` folder: a DatasetDict's split, or the one Dataset it holds."""
    return loaded[split] if hasattr(loaded, "keys") else loaded


def _read_folder(read, path: Path, split: str, key: str):
    try:
        return read()
    except Exception as e:  # a layout or split the library refuses, unreadable files: reported the same way
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        what = f"folder '{path}' could not be read as a dataset (split '{split}')" if path.is_dir() else \
            f"file '{path}' could not be read"
        raise UserError(f"recipe key '{key}': {what}: {type(e).__name__}: {reason}") from None


def _data_suffix(file: Path) -> Optional[str]:
    suffixes = [s.lower() for s in file.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_SUFFIXES else None


def hidden_in(file: Path, root: Path) -> bool:
    """A file of a data folder that is no part of the data (.git, .cache, ...); the cache's fingerprint
    of a folder skips the same ones."""
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _load_hub(source: str, config: Optional[str], split: str, key: str):
    import datasets

    from deltafit.hub import offline_if_unreachable

    offline_if_unreachable()  # no network: the local hub cache or a quick error, not half a minute of retries
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # network, auth, unknown name/config/split: all reported the same way
        what = f"'{source}'" + (f" (config '{config}')" if config else "") + f" split '{split}'"
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"recipe key '{key}': hub dataset {what} could not be loaded (offline? for a local file use a "
                        f"{'/'.join(LOCAL_EXTENSIONS)} path): {type(e).__name__}: {reason}") from None


def _read_json(path: Path):
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise _BadFile("is empty (expected [{...}, ...] or one {...} per line)")
    try:
        data = json.loads(text)
    except RecursionError:
        raise _BadFile(TOO_DEEP) from None
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise _BadFile(f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        data, lines = _json_lines(text)  # more than one value: JSON lines
        return _from_records(data, lines, "line")
    if isinstance(data, dict) and path.suffix.lower() == ".jsonl":  # a JSON-lines file with a single record
        return _from_records([data], [text[: len(text) - len(text.lstrip())].count("\n") + 1], "line")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        got = type(data).__name__ if not isinstance(data, list) else "a list with non-object items"
        raise _BadFile(f"is not a list of records (got {got}; expected [{{...}}, ...] or one {{...}} per line)")
    return _from_records(data, unit="record")


TOO_DEEP = "nests arrays or objects too deeply to read (over Python's recursion limit)"


def _json_lines(text: str) -> tuple[list, list[int]]:
    """(records, the line number of each)."""
    records, lines = [], []
    # Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+0085 and the like, which
    # json.dumps(ensure_ascii=False) leaves raw inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise _BadFile(f"line {lineno} {TOO_DEEP}") from None
        except json.JSONDecodeError as e:
            raise _BadFile(f"line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise _BadFile(f"line {lineno} is not a record (a JSON object)")
        records.append(record)
        lines.append(lineno)
    return records, lines


class ArrowRows:
    """A local file's rows as an Arrow table, answering the few `datasets.Dataset` calls deltafit makes.

    Importing `datasets` (and the pandas it pulls in) costs about 0.5 s, a tenth of `deltafit
    validate`; local files need none of it. Arrow types the columns as `Dataset.from_dict` does.
    It also remembers where each row is in its file (`row_origin`), through shuffles and caps, so
    a bad value can be reported by its line.
    """

    def __init__(self, table, numbers: Optional[list[int]] = None, unit: str = "row", source: Optional[str] = None):
        self.table = table
        self.numbers = numbers  # per row, its number in the file (1-based); None: row i is number i + 1
        self.unit = unit  # what the numbers count: "line" (text files, JSON lines), "record", "row"
        self.source = source  # the file, when the rows come from one

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, column: str) -> list:
        return self.table[column].to_pylist()

    def select(self, indices) -> "ArrowRows":
        indices = list(indices)
        return ArrowRows(self.table.take(indices), [self._number(i) for i in indices], self.unit, self.source)

    def row_origin(self, i: int) -> str:
        """Where row i is in the file, e.g. "line 7 of 'data/train.tsv'"."""
        return f"{self.unit} {self._number(i)}" + (f" of '{self.source}'" if self.source else "")

    def _number(self, i: int) -> int:
        return self.numbers[i] if self.numbers is not None else i + 1

    def with_format(self, kind: str):
        if kind != "arrow":
            raise ValueError(f"ArrowRows has only the arrow format, not {kind!r}")
        return self.table


def _from_records(records: list[dict], numbers: Optional[list[int]] = None, unit: str = "row"):
    import pyarrow

    # Columns are the union of every record's keys (Dataset.from_list looks at the first only).
    columns = dict.fromkeys(k for r in records for k in r)
    records = _numbers_as_text_where_mixed(records, columns)
    try:
        return ArrowRows(pyarrow.Table.from_pydict({c: [r.get(c) for r in records] for c in columns}), numbers, unit)
    except OverflowError:  # Arrow's integers are 64-bit
        raise _BadFile(f"has a whole number outside the 64-bit range in {_huge_number_column(records, columns)} "
                       f"(write such ids as strings)") from None
    except pyarrow.lib.ArrowException as e:
        raise _BadFile(f"has a column whose values mix types: {_mixed_column(records, columns) or e} "
                       f"(every row must give a column the same kind of value)") from None


def _numbers_as_text_where_mixed(records: list[dict], columns) -> list[dict]:
    """A column holding both text and numbers (labels 1 and "1", ids 7 and "7a") as text throughout,
    as a CSV file would give it: Arrow types a column as a whole and would refuse the mix."""
    mixed = [c for c in columns if {type(r.get(c)) for r in records} - {type(None)} in ({str, int}, {str, float},
                                                                                        {str, int, float})]
    if not mixed:
        return records
    return [{**r, **{c: str(r[c]) for c in mixed if type(r.get(c)) in (int, float)}} for r in records]


def _huge_number_column(records: list[dict], columns) -> str:
    for c in columns:
        for i, r in enumerate(records):
            if type(r.get(c)) is int and not -(2**63) <= r[c] < 2**63:
                return f"column '{c}' (row {i + 1})"
    return "a nested value"


def _mixed_column(records: list[dict], columns) -> str:
    """Which column Arrow could not type, e.g. "column 'output' (str and dict)"."""
    import pyarrow

    for c in columns:
        try:
            pyarrow.array([r.get(c) for r in records])
        except pyarrow.lib.ArrowException:
            kinds = dict.fromkeys(type(r[c]).__name__ for r in records if r.get(c) is not None)
            return f"column '{c}' ({' and '.join(kinds)})"
    return ""


def _read_delimited(path: Path, delimiter: str, quoting: int, names: Optional[list[str]] = None):
    """A CSV/TSV file's rows; its first line is the header, unless `names` (data.columns) names the columns."""
    import pyarrow

    # The csv module refuses fields over 128 KiB by default (a long document in one cell); no field
    # can be longer than the file, so that bound loses nothing. Rows longer than data.max_length
    # are truncated later, like any other. The limit is the module's global: put it back after.
    limit = csv.field_size_limit(max(csv.field_size_limit(), min(path.stat().st_size + 1, 2**31 - 1)))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            try:
                header, columns, lines = _delimited_rows(reader, names)
            except csv.Error as e:  # anything else the csv module refuses
                raise _BadFile(f"line {reader.line_num} cannot be read as {path.suffix[1:].upper()} ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return ArrowRows(pyarrow.Table.from_pydict(dict(zip(header, columns))), lines, "line")


def _delimited_rows(reader, names: Optional[list[str]] = None) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, one list of values per column, the line each row starts on)."""
    header = list(names) if names is not None else _header(reader)
    # With data.columns every line is data, and a row of another width means the file is not the layout named.
    width = (f"data.columns names {len(header)} ({', '.join(header)})" if names is not None
             else f"the header has {len(header)}")
    columns, lines = [[] for _ in header], []
    start = reader.line_num + 1
    for row in reader:
        if row:  # else a blank line
            if len(row) != len(header):
                raise _BadFile(f"line {reader.line_num} has {len(row)} fields but {width}")
            for column, value in zip(columns, row):
                column.append(value)
            lines.append(start)
        start = reader.line_num + 1
    return header, columns, lines


def _header(reader) -> list[str]:
    header = next(reader, None) or []
    if not header:
        raise _BadFile("is empty: it has no rows and no header (expected a header line naming the columns, "
                       "then one row per line)")
    if len(set(header)) != len(header):
        raise _BadFile(f"has a repeated column name in its header ({', '.join(header)}); a file without a header "
                       f"line needs data.columns to name its columns")
    return header


def _read_parquet(path: Path):
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.lib.ArrowException as e:
        raise _BadFile(f"is not a readable Parquet file ({e})") from None
    return ArrowRows(table)


def _read_text(path: Path, layout: tuple[list[str], str]):
    """A header-less .txt file: each non-blank line split on the delimiter into the named columns."""
    import pyarrow

    names, delimiter = layout
    columns, lines = [[] for _ in names], []
    with open(path, encoding="utf-8-sig", newline=None) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            values = line.split(delimiter)
            if len(values) != len(names):
                raise _BadFile(f"line {lineno} has {len(values)} fields split on {delimiter!r} but data.columns names "
                               f"{len(names)} ({', '.join(names)})")
            for column, value in zip(columns, values):
                column.append(value.strip())
            lines.append(lineno)
    return ArrowRows(pyarrow.Table.from_pydict(dict(zip(names, columns))), lines, "line")


_READERS = {
    ".txt": _read_text,
    ".json": _read_json,
    ".jsonl": _read_json,
    ".csv": lambda p, names=None: _read_delimited(p, ",", csv.QUOTE_MINIMAL, names),
    # GLUE-style TSVs are unquoted and contain stray double quotes: quotes are plain characters.
    ".tsv": lambda p, names=None: _read_delimited(p, "\t", csv.QUOTE_NONE, names),
    ".parquet": _read_parquet,
}
