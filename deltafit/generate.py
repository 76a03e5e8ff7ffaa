"""Text generation from a checkpoint: `deltafit generate`.

The checkpoint is rebuilt the way `deltafit eval` rebuilds it (`loading.py`), and prompts are
rendered the way training rendered them (`data/formats.py`): the alpaca template, the chat
template, or raw text, tokenized piece by piece behind the same BOS.

How every method generates with the KV cache: `delta.prepare_inputs` runs once, on the prompt,
and its result goes to `model.generate` as is. Prefix methods hand it a cache pre-filled with the
prefix, a mask padded for it and the real tokens' positions; prompt methods hand it
`inputs_embeds` with the virtual tokens in front. `generate` then only appends: one new token per
step, the mask grown by one, each position one past the last. So the virtual tokens are put in
place exactly once, and every later step sees the masks and positions training saw. Low-rank
deltas need nothing (their hooks run on every forward).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from deltafit.errors import UserError
from deltafit.fsutil import beside_checkpoint

PROMPT_FORMATS = ("alpaca", "chat", "completion")


@dataclass(frozen=True)
class Settings:
    """How tokens are chosen: greedy at temperature 0, else sampled (top-p), seeded for repeatability."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: give at least 1")
        if not self.temperature >= 0:  # also refuses NaN
            raise UserError(f"--temperature {self.temperature}: give 0 (greedy) or a positive number (sampling)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: give a number in (0, 1], e.g. 0.9 (1 keeps every token)")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UserError(f"--seed {self.seed}: give a whole number from 0 to 2**32 - 1")


def check_request(prompts: list[str], data: Optional[str], chat: bool, output: Optional[str],
                  batch_size: Optional[int], prompt_format: Optional[str]) -> None:
    """Refuse contradictory or impossible options before anything loads."""
    modes = [name for name, given in (("--prompt", bool(prompts)), ("--data", data is not None), ("--chat", chat))
             if given]
    if len(modes) != 1:
        raise UserError(f"give exactly one of --prompt TEXT, --data FILE or --chat "
                        f"(got {' and '.join(modes) or 'none'})")
    if data is not None and not Path(data).expanduser().is_file():
        raise UserError(f"--data '{data}' does not exist (or is not a file)")
    if output is not None and data is None:
        raise UserError("--output is where --data writes its predictions; --prompt and --chat print to the terminal")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1")
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise UserError(f"--format '{prompt_format}' is not one of {', '.join(PROMPT_FORMATS)}")


# ----------------------------------------------------------------------------------------------
# What to generate with


@dataclass
class Source:
    """A checkpoint as generate sees it: where it is, its recipe, and its delta (None: a merged model)."""

    directory: Path
    recipe: Any
    meta: dict
    tensors: Optional[dict]


def open_source(path: str, base_model: Optional[str] = None) -> Source:
    """A deltafit checkpoint (or run directory), a PEFT adapter, or a merged model directory."""
    from deltafit.loading import load_source, source_recipe

    if not Path(path).exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    directory, meta, tensors = load_source(path, base_model, merged=True)
    source = Source(directory, source_recipe(directory, meta), meta, tensors)
    _require_causal(source)
    return source


def _require_causal(source: Source) -> None:
    if source.meta["task"] != "causal-lm":
        raise UserError(f"checkpoint '{source.directory}' is a {source.meta['task']} (classification) model; "
                        f"generate needs a causal-lm one (score classifiers with `deltafit eval`)")


@dataclass
class Generator:
    """A model (with its delta attached, or none), its tokenizer, the data section whose format
    renders prompts, and the sampling settings."""

    model: Any
    tokenizer: Any
    delta: Any
    data: Any
    settings: Settings

    def prompt_ids(self, pieces: list[str]) -> list[int]:
        """A prompt's token ids: its pieces tokenized one by one (the token boundaries training saw),
        behind the BOS the tokenizer puts first, unless the text wrote it already (chat templates)."""
        from deltafit.data.formats import _bos_prefix

        ids = [i for piece in pieces for i in self.tokenizer(piece, add_special_tokens=False)["input_ids"]]
        bos = _bos_prefix(self.tokenizer)
        return ids if ids[: len(bos)] == bos else bos + ids

    def generate(self, prompts: list[list[int]], streamer=None) -> list[list[int]]:
        """The new tokens for each prompt (batched, left-padded), up to and without the first EOS."""
        import torch

        if not all(prompts):
            raise UserError("a prompt encodes to no tokens (empty text, and the tokenizer adds no BOS): give some text")
        batch = _left_padded(prompts, self.tokenizer.pad_token_id, self.model.device)
        with torch.no_grad():
            inputs = self.delta.prepare_inputs(batch) if self.delta is not None else batch
            inputs = _cache_argument(self.model, inputs)
            # With inputs_embeds (prompt methods) generate returns the new tokens only.
            start = inputs["input_ids"].shape[1] if inputs.get("input_ids") is not None else 0
            out = self.model.generate(**inputs, **self._options(), streamer=streamer)
        stops = set(_eos_ids(self.model, self.tokenizer))
        return [_until(row[start:].tolist(), stops) for row in out]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _options(self) -> dict:
        s = self.settings
        options = {"max_new_tokens": s.max_new_tokens, "do_sample": s.temperature > 0,
                   "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": _eos_ids(self.model, self.tokenizer)}
        if s.temperature > 0:  # pure top-p: top_k 0 turns off transformers' default top-50 cut
            options.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        return options


def load_generator(source: Source, settings: Settings, base: bool = False, prompt_format: Optional[str] = None,
                   tokenizer=None) -> Generator:
    """Build the base model, attach the checkpoint's delta (unless `base`), ready to generate."""
    from deltafit.loading import about_checkpoint, attach_from_checkpoint
    from deltafit.model import build_model

    if base and source.tensors is None:
        raise UserError(f"--base: '{source.directory}' is a merged model, with no separate base to compare with")
    with about_checkpoint(source.directory):
        model, tokenizer, _ = build_model(source.recipe.model, tokenizer=tokenizer or load_tokenizer(source))
        delta = None if base or source.tensors is None else attach_from_checkpoint(model, source.meta, source.tensors)
    return ready_generator(model, tokenizer, delta, prompt_spec(source, prompt_format), settings)


def ready_generator(model, tokenizer, delta, data, settings: Settings) -> Generator:
    """A Generator around a model already built (and its delta attached): eval mode, deltafit's own
    generation options, on the GPU when there is one."""
    import torch

    _own_generation_config(model, tokenizer)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return Generator(model, tokenizer, delta, data, settings)


def load_tokenizer(source: Source):
    from deltafit.loading import about_checkpoint
    from deltafit.model import load_tokenizer as tokenizer_of

    with about_checkpoint(source.directory):
        return tokenizer_of(source.recipe.model)


def prompt_spec(source: Source, prompt_format: Optional[str] = None):
    """The data section whose format renders prompts: the checkpoint's, or --format's."""
    data = source.recipe.data
    return data.model_copy(update={"format": prompt_format}) if prompt_format else data


def _own_generation_config(model, tokenizer) -> None:
    """Decode by deltafit's options only: a model's shipped generation_config.json (temperature,
    top_k, repetition penalty...) would otherwise fill every option left unset, so 'greedy' would
    not be greedy. Its stop tokens are kept (chat models end a turn with their own)."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id,
                                               eos_token_id=_eos_ids(model, tokenizer),
                                               pad_token_id=tokenizer.pad_token_id)


def _eos_ids(model, tokenizer) -> list[int]:
    shipped = model.generation_config.eos_token_id
    ids = shipped if isinstance(shipped, list) else [] if shipped is None else [shipped]
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> dict:
    """Left padding: every row's last real token sits at the end, where generate appends."""
    import torch

    width = max(len(ids) for ids in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def _cache_argument(model, inputs: dict) -> dict:
    """Prefix methods name their cache `past_key_values`; transformers >= 5.2x calls it `cache` (and
    warns at the old name). Pass it under the name this model's forward takes."""
    import inspect

    if "past_key_values" in inputs and "cache" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "cache": inputs["past_key_values"]}
        del inputs["past_key_values"]
    return inputs


def _until(ids: list[int], stops: set[int]) -> list[int]:
    """Up to the first stop token (generate pads a finished row after it)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


# ----------------------------------------------------------------------------------------------
# Prompts rendered as training rendered them


def render_prompt(gen: Generator, text: str) -> list[str]:
    """The prompt pieces for one --prompt: the instruction of an alpaca example, the user message of a
    one-turn chat, or a completion prompt (through data.prompt_template when the recipe has one)."""
    from deltafit.data.formats import ALPACA_PROMPT_NO_INPUT, render_completion_prompt

    if gen.data.format == "chat":
        return [_chat_prompt(gen.tokenizer, [{"role": "user", "content": text}])]
    if gen.data.format == "alpaca":
        return [ALPACA_PROMPT_NO_INPUT.format(instruction=text)]
    return [render_completion_prompt(text, gen.data)]


def _chat_prompt(tokenizer, messages: list[dict]) -> str:
    from deltafit.data.formats import _render, _require_chat_template

    _require_chat_template(tokenizer)
    return _render(tokenizer, messages, True)


@dataclass
class Row:
    pieces: list[str]  # the prompt, as the pieces training tokenized separately
    reference: Optional[str]  # what the data says the answer is; None where it has none


def data_rows(tokenizer, data_spec, path: str) -> list[Row]:
    """Every row of a data file as (prompt pieces, reference), in the format of `data_spec` (a recipe's
    data section)."""
    return table_rows(tokenizer, data_spec, _load_rows(path, data_spec), "--data", path)


def table_rows(tokenizer, data_spec, rows, key: str, source: str) -> list[Row]:
    """`data_rows` of rows already loaded (`deltafit eval --generate`: the eval split); `key` and
    `source` name them in errors."""
    from deltafit.data.formats import _conversations, _segments
    from deltafit.data.splits import _check_columns

    spec, has_reference = _reference_spec(data_spec, rows)
    _check_columns(rows, spec, key, source)
    if spec.format == "chat":
        return [_chat_row(tokenizer, messages, spec) for messages in _conversations(rows, spec)]
    return [_split(segments, has_reference) for segments in _segments(rows, spec, tokenizer)]


def _load_rows(path: str, spec):
    from deltafit.data.sources import HEADERLESS_EXTENSIONS, load_rows

    # data.columns (and data.delimiter) describe a header-less CSV/TSV/TXT file; other files name their columns.
    headerless = Path(path).suffix.lower() in HEADERLESS_EXTENSIONS
    return load_rows(path, key="data.eval", columns=spec.columns if headerless else None,
                     delimiter=spec.delimiter if headerless else None)


# The column holding the reference answer, per format, and the prompt column that stands in for it
# in a file without answers (so training's own rendering code reads the rows unchanged).
REFERENCE_COLUMNS = {"alpaca": ("output_column", "instruction_column"), "completion": ("text_column", "prompt_column")}


def _reference_spec(spec, rows):
    """(data section to render with, whether rows have references). Training only masks the prompt
    (train_on_inputs off) so that prompt and response are told apart."""
    spec = spec.model_copy(update={"train_on_inputs": False})
    reference, stand_in = REFERENCE_COLUMNS.get(spec.format, (None, None))
    if reference is None or getattr(spec, reference) in rows.column_names or not getattr(spec, stand_in):
        return spec, spec.format != "completion" or bool(spec.prompt_column)
    return spec.model_copy(update={reference: getattr(spec, stand_in)}), False


def _split(segments: list[tuple[str, bool]], has_reference: bool) -> Row:
    """Training's (text, trained) segments: the prompt is what precedes the response, the response the
    reference. Completion rows without a prompt column are all prompt: the model continues them."""
    if not has_reference:
        prompt = [text for text, trained in segments if not trained] or [segments[0][0]]
        return Row(prompt, None)
    return Row([text for text, trained in segments if not trained], "".join(t for t, trained in segments if trained))


def _chat_row(tokenizer, messages: list[dict], spec) -> Row:
    """A conversation ending with an assistant turn: the turns before it (rendered as training split
    them) are the prompt, its content the reference. Otherwise the whole conversation is the prompt."""
    from deltafit.data.formats import _chat_segments

    if not messages or messages[-1].get("role") != "assistant":
        return Row([_chat_prompt(tokenizer, messages)], None)
    segments = _chat_segments(tokenizer, messages, spec)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return Row([text for text, _ in segments[:last]], str(messages[-1].get("content", "")))


# ----------------------------------------------------------------------------------------------
# The three modes


def run(checkpoint: str, settings: Settings, prompts: Optional[list[str]] = None, data: Optional[str] = None,
        output: Optional[str] = None, chat: bool = False, base: bool = False, batch_size: Optional[int] = None,
        base_model: Optional[str] = None, prompt_format: Optional[str] = None) -> Optional[tuple[Path, int]]:
    """`deltafit generate`: every check first, then load, then one mode. Returns (file, rows) for --data."""
    import torch

    settings.check()
    check_request(prompts or [], data, chat, output, batch_size, prompt_format)
    source = open_source(checkpoint, base_model)
    out = beside_checkpoint(source.directory, output, "generate", ".jsonl", base, "JSON lines",
                            inputs=(data,)) if data else None
    tokenizer = load_tokenizer(source)
    # The file's rows are read and checked before any weights load: a bad row costs nothing.
    rows = data_rows(tokenizer, prompt_spec(source, prompt_format), data) if data else None
    gen = load_generator(source, settings, base, prompt_format, tokenizer)
    # Seeded once, after loading (attaching may draw numbers): the run's draws all follow from --seed.
    # Unseeded runs draw a fresh seed, since torch starts every process from the same default one.
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    else:
        torch.seed()
    if chat:
        chat_loop(gen, sys.stdin.readline, _ask if sys.stdin.isatty() else lambda: None)
        return None
    if prompts:
        generate_prompts(gen, prompts)
        return None
    generate_file(gen, rows, out, batch_size or source.recipe.train.batch_size, _progress)
    return out, len(rows)


def _ask() -> None:
    print("> ", end="", file=sys.stderr, flush=True)


def _progress(done: int, total: int) -> None:
    print(f"\rgenerated {done}/{total} rows", end="\n" if done == total else "", file=sys.stderr, flush=True)


def generate_prompts(gen: Generator, prompts: Iterable[str]) -> list[str]:
    """Each prompt in turn, its tokens printed (to stdout) as they come, a blank line between answers."""
    answers = []
    for i, text in enumerate(prompts):
        if i:
            print(flush=True)
        ids = gen.generate([gen.prompt_ids(render_prompt(gen, text))], _streamer(gen.tokenizer))[0]
        answers.append(gen.decode(ids))
    return answers


def _streamer(tokenizer):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_file(gen: Generator, rows: list[Row], out: Path, batch_size: int, progress=None) -> None:
    """{prompt, reference, prediction} per row (`data_rows`), one JSON line each, in row order."""
    write_jsonl(out, ({"prompt": "".join(row.pieces), "reference": row.reference, "prediction": prediction}
                      for row, prediction in predict(gen, rows, batch_size, progress)))


def predict(gen: Generator, rows: list[Row], batch_size: int, progress=None) -> Iterator[tuple[Row, str]]:
    """(row, decoded answer) for every row, in row order, generated `batch_size` rows at a time."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        yield from zip(chunk, map(gen.decode, gen.generate([gen.prompt_ids(row.pieces) for row in chunk])))
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))


def write_jsonl(out: Path, records: Iterable[dict]) -> None:
    """One JSON line per record, written to a temporary sibling renamed into place: an interrupted run
    leaves no partial file."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def chat_loop(gen: Generator, read_line: Callable[[], str], ask: Callable[[], Any] = lambda: None) -> list[dict]:
    """Read user lines, answer each with the whole conversation so far in the chat template; an
    empty line or end of input ends it. Returns the conversation."""
    _require_template(gen.tokenizer)
    messages: list[dict] = []
    while True:
        ask()
        line = read_line()
        if not line or not line.strip():
            return messages
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = gen.generate([gen.prompt_ids([_chat_prompt(gen.tokenizer, messages)])], _streamer(gen.tokenizer))[0]
        messages.append({"role": "assistant", "content": gen.decode(ids)})


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--chat needs a tokenizer with a chat template and "
                        f"'{getattr(tokenizer, 'name_or_path', '') or 'the model'}' has none; use --prompt")
