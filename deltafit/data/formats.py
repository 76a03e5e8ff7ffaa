"""Encoding: rows -> tokenized, masked, truncated examples, one encoder per `data.format`.

Causal-LM formats (alpaca, chat, completion) are built from segments: (text, trained) pairs
tokenized separately and joined, so the prompt/response boundary is exact in token space (no
offset mapping or re-tokenizing of prefixes). Prompt segments get label -100 unless
`data.train_on_inputs`; EOS ends every response (chat responses end with whatever the chat
template closes an assistant turn with). Chat rows are {role, content} messages or ShareGPT
{from, value} turns, mapped to the former (`_clean_messages`). Classification encodes text (and
text pairs) with the tokenizer's own special tokens and maps labels to ids (`_label_names_from`).
"""

from __future__ import annotations

import json
import math
from typing import Optional

from deltafit.errors import UserError, did_you_mean

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss ignore_index)
CAUSAL_FORMATS = ("alpaca", "chat", "completion")

# The Stanford Alpaca prompts, verbatim, so models tuned here match the usual Alpaca inference prompt.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _encode_split(ds, name: str, key: str, encode, stats: dict) -> Optional[list[dict]]:
    """Encode one split, then truncate and drop, recording the counts under `<name>_*` in stats."""
    for suffix in ("rows", "examples", "truncated", "dropped", "tokens"):
        stats[f"{name}_{suffix}"] = None
    if ds is None:
        return None
    examples, truncated, dropped = encode(ds, key)
    stats.update({f"{name}_rows": len(ds), f"{name}_examples": len(examples), f"{name}_truncated": truncated,
                  f"{name}_dropped": dropped, f"{name}_tokens": sum(len(ex["input_ids"]) for ex in examples)})
    return examples


def _encode_causal(ds, spec, tokenizer):
    """Rows -> (examples, truncated count, dropped count) for the alpaca, chat and completion formats."""
    rows = _segments(ds, spec, tokenizer)
    texts = [text for segments in rows for text, _ in segments]
    flat = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    bos, eos = _bos_prefix(tokenizer), tokenizer.eos_token_id
    examples, truncated, dropped, at = [], 0, 0, 0
    for segments in rows:
        # A row whose trained text is blank (an alpaca row with no output) would only teach the model
        # to stop at once: dropped and counted, like a row truncation left nothing to learn in.
        if not spec.train_on_inputs and not any(trained and text.strip() for text, trained in segments):
            at += len(segments)
            dropped += 1
            continue
        ids, labels = [], []
        for _, trained in segments:
            piece, at = flat[at], at + 1
            ids += piece
            labels += piece if (trained or spec.train_on_inputs) else [IGNORE_INDEX] * len(piece)
        if spec.format != "chat" and eos is not None:
            ids, labels = ids + [eos], labels + [eos]  # the response ends: teach the model to stop
        if bos and ids[: len(bos)] != bos:  # chat templates often write BOS themselves
            ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
        if len(ids) > spec.max_length:
            truncated += 1
            ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        # Position 0 is never a target (the model shifts labels by one), so it alone does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples, truncated, dropped


def _bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before text by default (usually [BOS] or nothing)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def _segments(ds, spec, tokenizer) -> list[list[tuple[str, bool]]]:
    """Per row, the (text, trained) pieces of the example in order."""
    if spec.format == "alpaca":
        return _alpaca_segments(ds, spec)
    if spec.format == "chat":
        _require_chat_template(tokenizer)
        return [_chat_segments(tokenizer, messages, spec) for messages in _conversations(ds, spec)]
    texts = _texts(ds, spec, "text_column")
    if not spec.prompt_column:
        return [[(text, True)] for text in texts]
    prompts = [render_completion_prompt(p, spec) for p in _texts(ds, spec, "prompt_column")]
    return [[(p, False), (text, True)] for p, text in zip(prompts, texts)]


def render_completion_prompt(prompt: str, spec) -> str:
    """A completion row's prompt as the model sees it: through data.prompt_template when set
    ('{prompt}' is replaced; other braces are plain text)."""
    template = getattr(spec, "prompt_template", None)
    return template.replace("{prompt}", prompt) if template else prompt


def _alpaca_segments(ds, spec) -> list[list[tuple[str, bool]]]:
    instructions = _texts(ds, spec, "instruction_column")
    outputs = _texts(ds, spec, "output_column")
    has_input = spec.input_column in ds.column_names
    inputs = _texts(ds, spec, "input_column") if has_input else [""] * len(ds)
    rows = []
    for instruction, inp, output in zip(instructions, inputs, outputs):
        if inp.strip():
            prompt = ALPACA_PROMPT.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        rows.append([(prompt, False), (output, True)])
    return rows


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model's tokenizer"
        raise UserError(f"recipe key 'data.format': 'chat' needs a tokenizer with a chat template and '{name}' has "
                        f"none (use data.format completion or alpaca, or set model.tokenizer to one with a template)")


def _chat_segments(tokenizer, messages, spec) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt pieces and assistant turns.

    Each assistant turn spans from the end of render(turns before it, add_generation_prompt) to
    the end of render(turns up to and including it): exactly the text the model must write,
    including the template's end-of-turn marker.
    """
    whole = _render(tokenizer, messages, False)
    if spec.train_on_inputs:
        return [(whole, True)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else _render_start(tokenizer, messages)
        reply = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and reply.startswith(prompt) and whole.startswith(reply)):
            raise UserError("recipe key 'data.format': the tokenizer's chat template does not render conversations "
                            "prefix by prefix, so assistant turns cannot be located; set data.train_on_inputs: true")
        segments += [(prompt[len(done):], False), (reply[len(prompt):], True)]
        done = reply
    return segments + [(whole[len(done):], False)]


def _render_start(tokenizer, messages) -> str:
    # A conversation opening with an assistant turn: some templates refuse an empty list.
    try:
        return _render(tokenizer, [], True)
    except UserError:
        return ""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate") for bad conversations
        raise UserError(f"recipe key 'data.messages_column': the chat template rejected a conversation "
                        f"({type(e).__name__}: {str(e)[:200]}): {str(messages)[:120]}") from None


SHAREGPT_COLUMN = "conversations"
# ShareGPT turns are {from, value}; their speakers as chat-template roles (user/assistant also occur in `from`).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def messages_column(columns, spec) -> str:
    """The column chat rows are read from: data.messages_column, except that when it is left at its
    default ('messages') and the data has no such column but has ShareGPT's 'conversations', that one.
    Compared with the default rather than "was it set": a checkpoint's recipe.yaml writes every key."""
    default = type(spec).model_fields["messages_column"].default
    if spec.messages_column == default and default not in columns and SHAREGPT_COLUMN in columns:
        return SHAREGPT_COLUMN
    return spec.messages_column


def _conversations(ds, spec) -> list[list[dict]]:
    """Each row's conversation as a list of {role, content, ...} messages."""
    column = messages_column(ds.column_names, spec)
    return [_clean_messages(messages, column, lambda i=i: _row(ds, i, spec, column))
            for i, messages in enumerate(_column(ds, column))]


def _clean_messages(messages, column: str, where) -> list[dict]:
    """One row's conversation as [{role, content, ...}], from OpenAI-style {role, content} messages or
    ShareGPT {from, value} turns (both may be JSON text in a CSV/TSV cell). `where()` names the row."""
    if isinstance(messages, str):  # CSV/TSV cells can only hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            pass
    # Arrow gives every message every key seen in the column, with None where it had none.
    if isinstance(messages, list):
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and _is_turn(m) for m in messages):
        raise UserError(f"recipe key 'data.messages_column': column '{column}' must hold lists of {{role, content}} "
                        f"messages or ShareGPT {{from, value}} turns, got {str(messages)[:120]} at {where()}")
    turns = [m if "role" in m else _sharegpt_turn(m, i, column, where) for i, m in enumerate(messages)]
    return [_text_content(m, i, column, where) for i, m in enumerate(turns)]


def _text_content(message: dict, i: int, column: str, where) -> dict:
    """OpenAI's content parts ([{type: text, text: ...}, ...]) as the one string a text model's chat
    template renders: the text parts joined as they are. Chat templates of text models would print
    the list's Python repr, which the model would then learn. Other parts (images, audio) are refused."""
    parts = message.get("content")
    if not isinstance(parts, list):
        return message
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = f"type {_shown(kind)}" if isinstance(part, dict) else _shown(part)
            raise UserError(f"recipe key 'data.messages_column': message {i + 1} of column '{column}' at {where()} "
                            f"has a content part of {shown}; a text model trains on text parts "
                            f"({{\"type\": \"text\", \"text\": ...}}) or a content string")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _is_turn(message: dict) -> bool:
    return "role" in message or ("from" in message and "value" in message)


def _sharegpt_turn(turn: dict, i: int, column: str, where) -> dict:
    """{from: human, value: ...} -> {role: user, content: ...}; other keys are kept as they are."""
    speaker = turn["from"]
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise UserError(f"recipe key 'data.messages_column': turn {i + 1} of column '{column}' at {where()} has "
                        f"from {_shown(speaker)}; valid roles: {', '.join(SHAREGPT_ROLES)}"
                        f"{did_you_mean(str(speaker), SHAREGPT_ROLES)}")
    rest = {k: v for k, v in turn.items() if k not in ("from", "value")}
    return {"role": SHAREGPT_ROLES[speaker], "content": turn["value"], **rest}


def _row(ds, i: int, spec, column: str) -> str:
    """Row i for a message; only built when a row is refused (it reads a column)."""
    return _where(ds, i, spec, column) or f"row {i + 1}"


def _column(ds, name: str) -> list:
    # Through Arrow: iterating a datasets Column formats row by row (seconds for SST-2's 67k rows).
    return ds.with_format("arrow")[name].to_pylist()


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _texts(ds, spec, option: str, key: str = "") -> list[str]:
    """The column that `data.<option>` names, as text (a missing value is ''). A value with no text
    form (a list, a mapping, bytes, NaN) is refused: its Python repr is not what the user meant."""
    column = getattr(spec, option)
    values = _column(ds, column)
    for i, value in enumerate(values):
        kind = _not_text(value)
        if kind:
            of = f" of {key}" if key else ""
            fix = ": join the parts into one string, or name another column" if kind in ("a list", "a mapping") else ""
            raise UserError(f"recipe key 'data.{option}': column '{column}'{of} holds {kind} ({_shown(value)})"
                            f"{_at(ds, i, spec, column)}; it must hold text{fix}")
    return [_text(v) for v in values]


def _not_text(value) -> Optional[str]:
    """What a cell holds when it is no single text or number (a list, a mapping, bytes, NaN...), else None."""
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "NaN (not a number)" if math.isnan(value) else "an infinite number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return None  # dates, decimals...: their text form is what they mean


def _where(ds, i: int, spec, column: str) -> str:
    """Row i as the user can find it: its line in the file when known (`ArrowRows.row_origin`), and
    the text of its main text column (rows of a hub dataset may be shuffled by now, so its position
    means nothing there); '' when neither is known."""
    origin = ds.row_origin(i) if hasattr(ds, "row_origin") else ""
    named = spec.instruction_column if spec.format == "alpaca" else spec.text_column
    text = _column(ds, named)[i] if named != column and named in ds.column_names else None
    if not isinstance(text, str):
        return origin
    return f"{origin}, whose {named} is {text[:60]!r}" if origin else f"the row whose {named} is {text[:60]!r}"


def _at(ds, i: int, spec, column: str) -> str:
    where = _where(ds, i, spec, column)
    return f" at {where}" if where else ""


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# Classification


def _label_key(value) -> str:
    """A label as the string stored in label_names; numbers are normalized so 1, 1.0 and '1' agree."""
    if isinstance(value, bool):
        return str(value)
    text = value.strip() if isinstance(value, str) else str(value)
    number = _as_number(text)
    if number is not None and number.is_integer():
        return str(int(number))
    return text


def _as_number(text: str) -> Optional[float]:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _labels_of(ds, spec, key: str) -> list[str]:
    """Each row's label as a string. A label is one string, number or boolean; NaN (how pandas and
    JSON writers mark a missing number), lists (multi-label rows) and mappings are refused. The
    string "nan" (e.g. in a TSV) stays a label: text is taken as written, and 'nan' is a real class
    name in some data sets (ISO 639-3 code of Min Nan Chinese in language identification)."""
    column = spec.label_column
    values = _column(ds, column)
    empty = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if empty:
        where = _where(ds, empty[0], spec, column)
        example = f" (e.g. {where})" if where else ""
        raise UserError(f"recipe key 'data.label_column': {len(empty)} row(s) of {key} have no value in column "
                        f"'{column}'{example}; every row needs a label")
    for i, value in enumerate(values):
        kind = _not_text(value)
        if kind:
            fix = ("drop the row or give it a label" if isinstance(value, float)
                   else "classification takes one label per row: a string, a number or a boolean")
            raise UserError(f"recipe key 'data.label_column': column '{column}' of {key} holds {kind} "
                            f"({_shown(value)}){_at(ds, i, spec, column)}; {fix}")
    return [_label_key(v) for v in values]


def _label_names_from(ds, spec, key: str) -> list[str]:
    """The sorted, deterministic id -> label list: numerically when every label is a number."""
    distinct = set(_labels_of(ds, spec, key))
    if all(_as_number(label) is not None for label in distinct):
        names = sorted(distinct, key=float)
    else:
        names = sorted(distinct)
    if len(names) < 2:
        held_out = spec.eval_fraction and not (spec.eval or spec.eval_split)
        why = (f" once data.eval_fraction={spec.eval_fraction} held rows out for evaluation (lower it, or give "
               f"data.eval)") if held_out else ""
        raise UserError(f"recipe key 'data.label_column': column '{spec.label_column}' has only one distinct "
                        f"value in {key} ({', '.join(names)}){why}; classification needs at least two classes")
    return names


def _encode_classification(ds, spec, tokenizer, label_names: list[str], key: str):
    """Rows -> (examples, truncated count, dropped count); the tokenizer adds its own [CLS]/[SEP]."""
    index = {str(name): i for i, name in enumerate(label_names)}
    labels = []
    for label in _labels_of(ds, spec, key):
        if label not in index:
            raise UserError(f"recipe key 'data.label_column': label '{label}' in {key} is not one of the model's "
                            f"labels ({', '.join(index)}){did_you_mean(label, index)}")
        labels.append(index[label])
    texts = _texts(ds, spec, "text_column", key)
    pairs = _texts(ds, spec, "text_pair_column", key) if spec.text_pair_column else None
    encoded = tokenizer(texts, pairs, verbose=False)["input_ids"]
    # Long rows are re-encoded with the tokenizer's own truncation, which keeps the closing
    # special tokens and trims the longer text of a pair instead of cutting the pair's tail.
    long = [i for i, ids in enumerate(encoded) if len(ids) > spec.max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                        truncation=True, max_length=spec.max_length, verbose=False)["input_ids"]
        for i, ids in zip(long, cut):
            encoded[i] = ids
    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label}
                for ids, label in zip(encoded, labels)]
    return examples, len(long), 0
