"""Data: load rows, turn them into examples, tokenize, mask, truncate, pack, collate and cache.

The flow (`prepare.py`, which reads top to bottom) is `load_rows` (hub dataset ->
`datasets.Dataset`, local file -> `ArrowRows`) -> `_load_splits` (train / eval rows, held-out
fraction, caps) -> one encoder per `data.format` -> packing -> `Prepared`, or the same result read
from the cache. The modules, in the order the data goes through them:

- `sources.py`: `load_rows`: local JSON / JSON lines / CSV / TSV / Parquet files, header-less
  delimited .txt files (`data.delimiter`), hub datasets and dataset folders, `builtin:` tasks.
- `splits.py`: which rows train and which evaluate; the column checks and `check_task`.
- `mixture.py`: `data.train` as a list of weighted sources, each with its own data keys: how many
  examples each supplies and the seeded order they are mixed in.
- `formats.py`: the alpaca, chat, completion and classification encoders: segments, chat
  templates, label masking (`IGNORE_INDEX`), truncation, label ids.
- `packing.py`: `pack_examples` and the decision to pack (`resolve_packing`, `PACKING_MIN_SAVING`),
  padding figures, `use_packed_attention`.
- `collate.py`: `make_collator` / `Collator` (padded tensor batches) and `batch_tokens`.
- `cache.py`: the tokenized-data cache under `<DELTAFIT_CACHE>/data/<key>/`, keyed by everything
  that decides the content, including the source of every module here.
- `prepare.py`: `prepare_data` and `describe_data`, which tie the above together.

Every problem a user can fix (a missing file or column, bad bytes, an unknown label) is a
`UserError` naming the recipe key. torch, datasets, pyarrow and transformers are imported inside
functions so that importing this package (e.g. for `deltafit --help`) costs nothing.
"""

from deltafit.data.cache import SPLITS, data_cache_root
from deltafit.data.collate import Collator, batch_tokens, make_collator
from deltafit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CAUSAL_FORMATS, IGNORE_INDEX
from deltafit.data.packing import (
                                   PACKING_MIN_SAVING,
                                   example_lengths,
                                   pack_examples,
                                   padding_stats,
                                   resolve_packing,
                                   use_packed_attention,
)
from deltafit.data.prepare import Prepared, describe_data, prepare_data
from deltafit.data.sources import BUILTIN_PREFIX, LOCAL_EXTENSIONS, ArrowRows, load_rows

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "ArrowRows", "BUILTIN_PREFIX", "CAUSAL_FORMATS", "Collator",
    "IGNORE_INDEX", "LOCAL_EXTENSIONS", "PACKING_MIN_SAVING", "Prepared", "SPLITS", "batch_tokens",
    "data_cache_root", "describe_data", "example_lengths", "load_rows", "make_collator", "pack_examples",
    "padding_stats", "prepare_data", "resolve_packing", "use_packed_attention",
]
