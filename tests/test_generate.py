"""`deltafit generate`: greedy decoding with the KV cache equals decoding without it, for every
kind of delta (low-rank hooks, a prefix cache, virtual tokens); prompts are the tokens training
saw; sampling repeats with a seed; --data writes one line per row; merged models and PEFT adapters
generate like the checkpoint they came from; bad input is one line and exit 2."""

from __future__ import annotations

import io
import json

import pytest
import torch

from deltafit.data.formats import ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, _encode_causal
from deltafit.data.sources import load_rows
from deltafit.errors import UserError
from deltafit.generate import (
    Generator,
    Settings,
    _cache_argument,
    chat_loop,
    data_rows,
    load_generator,
    open_source,
    render_prompt,
)
from deltafit.model import load_tokenizer
from deltafit.recipe import recipe_from_dict
from tests.deltas.delta_testkit import saved_checkpoint
from tests.helpers import assert_one_clean_line, run_cli

METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3, "hidden": 16},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
    "ptuning": {"method": "ptuning", "num_virtual_tokens": 3, "encoder": "mlp", "encoder_hidden_size": 16},
}
PROMPTS = ["Add 2 and 3.", "What is the capital of France? Tell me in a few words."]  # two lengths: left padding


def save_checkpoint(directory, model_dir, delta: dict, data_format: str = "alpaca", task: str = "causal-lm"):
    """A deltafit checkpoint of a freshly attached delta, perturbed so that it changes the output."""
    return saved_checkpoint(directory, model_dir, delta, task, data_format, scale=0.5, train={"batch_size": 2})[0]


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """tiny_llama with larger random weights: its greedy answers depend on the prompt and on the delta
    (at transformers' default init scale a 2-layer model says the same few tokens whatever it is given,
    and a decoder that ignored the prompt would pass every equality below)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    directory = tmp_path_factory.mktemp("sharp-llama")
    tok = make_tokenizer(directory, pad=False)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sharp_llama):
    root = tmp_path_factory.mktemp("generate")
    return {name: save_checkpoint(root / name, sharp_llama, delta) for name, delta in METHODS.items()}


def generator(path, **settings) -> Generator:
    return load_generator(open_source(str(path)), Settings(**settings))


def greedy_without_cache(gen: Generator, ids: list[int], steps: int) -> list[int]:
    """The reference: every step a full forward over the whole sequence through the delta, no cache."""
    stops, new = {gen.tokenizer.eos_token_id}, []
    for _ in range(steps):
        seq = torch.tensor([ids + new], device=gen.model.device)
        batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
        with torch.no_grad():
            inputs = _cache_argument(gen.model, gen.delta.prepare_inputs(batch) if gen.delta is not None else batch)
            token = int(gen.model(**inputs, use_cache=False).logits[0, -1].argmax())
        if token in stops:
            break
        new.append(token)
    return new


@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_with_the_cache_equals_decoding_without_it(checkpoints, method):
    gen = generator(checkpoints[method], max_new_tokens=12)
    prompts = [gen.prompt_ids(render_prompt(gen, text)) for text in PROMPTS]
    cached = gen.generate(prompts)  # one left-padded batch, KV cache
    assert cached == [greedy_without_cache(gen, ids, 12) for ids in prompts]
    assert cached[0] != cached[1] and all(len(set(answer)) > 3 for answer in cached)
    base = load_generator(open_source(str(checkpoints[method])), Settings(max_new_tokens=12), base=True)
    assert base.generate(prompts) != cached  # the delta is in place while generating


@pytest.mark.parametrize("data_format", ["alpaca", "chat", "completion"])
def test_data_prompts_are_the_tokens_training_saw(tmp_path, tiny_llama, data_format):
    rows = {
        "alpaca": [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                   {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}],
        "chat": [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
                 {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                               {"role": "assistant", "content": "the end"}]}],
        "completion": [{"prompt": "The cat", "text": " sat on the mat"}, {"prompt": "0 1 2", "text": " 3 4"}],
    }[data_format]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    data = {"train": str(path), "format": data_format}
    data.update({"prompt_column": "prompt"} if data_format == "completion" else {})
    recipe = recipe_from_dict({"model": {"name": str(tiny_llama)}, "data": data})
    spec, tokenizer = recipe.data, load_tokenizer(recipe.model)
    gen = Generator(None, tokenizer, None, spec, Settings())
    examples, _, _ = _encode_causal(load_rows(str(path)), spec, tokenizer)
    for row, example, raw in zip(data_rows(tokenizer, spec, str(path)), examples, rows):
        labels = example["labels"]
        last_response = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX
                            and (i == 0 or labels[i - 1] == IGNORE_INDEX))
        assert gen.prompt_ids(row.pieces) == example["input_ids"][:last_response]
        expected = {"alpaca": raw.get("output"), "completion": raw.get("text")}.get(data_format)
        assert row.reference == (expected or raw.get("messages", [{}])[-1].get("content"))


def test_prompt_streams_the_greedy_answer(checkpoints, capsys):
    gen = generator(checkpoints["prompt"], max_new_tokens=10)
    expected = [gen.decode(gen.generate([gen.prompt_ids(render_prompt(gen, text))])[0]) for text in PROMPTS]
    code, out, err = run_cli(capsys, "generate", checkpoints["prompt"], "--prompt", PROMPTS[0], "--prompt",
                             PROMPTS[1], "--max-new-tokens", 10)
    assert code == 0, err
    assert out == f"{expected[0]}\n\n{expected[1]}\n"
    assert render_prompt(gen, "x") == [ALPACA_PROMPT_NO_INPUT.format(instruction="x")]  # trained on alpaca


def test_seeded_sampling_repeats_and_other_seeds_differ(checkpoints, capsys):
    def sample(seed):
        code, out, err = run_cli(capsys, "generate", checkpoints["lora"], "--prompt", PROMPTS[0], "--temperature",
                                 "1.5", "--top-p", "0.95", "--seed", seed, "--max-new-tokens", 16)
        assert code == 0, err
        return out

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_data_writes_one_line_per_row_beside_the_checkpoint(checkpoints, tmp_path, capsys):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "generate", checkpoints["prefix"], "--data", path, "--max-new-tokens", 4,
                           "--batch-size", 2)
    assert code == 0, err
    written = checkpoints["prefix"].with_name("prefix-generate.jsonl")
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["reference"] for r in records] == [r["output"] for r in rows]
    assert records[0]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Add 0 and 1.")
    gen = generator(checkpoints["prefix"], max_new_tokens=4)  # batched, left-padded == one at a time
    assert records[3]["prediction"] == gen.decode(gen.generate([gen.prompt_ids([records[3]["prompt"]])])[0])
    assert not list(checkpoints["prefix"].glob("*generate*"))  # nothing written into the checkpoint


def test_data_without_references_still_generates(checkpoints, tmp_path, capsys):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"instruction": "Add 1 and 2."}) + "\n")
    code, _, err = run_cli(capsys, "generate", checkpoints["lora"], "--data", path, "--max-new-tokens", 2,
                           "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["reference"] is None and record["prompt"].endswith("Add 1 and 2.\n\n### Response:\n")


def test_merged_model_and_peft_adapter_generate_like_the_checkpoint(checkpoints, tmp_path, capsys):
    from deltafit.merge import merge_checkpoint
    from deltafit.peft_io import export_checkpoint

    merge_checkpoint(str(checkpoints["lora"]), str(tmp_path / "merged"))
    export_checkpoint(str(checkpoints["lora"]), str(tmp_path / "adapter"), "peft")
    outputs = []
    for source, extra in ((checkpoints["lora"], []), (tmp_path / "merged", ["--format", "alpaca"]),
                          (tmp_path / "adapter", [])):
        code, out, err = run_cli(capsys, "generate", source, "--prompt", PROMPTS[1], "--max-new-tokens", 12, *extra)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0].strip() and outputs[0] == outputs[1] == outputs[2]
    code, _, err = run_cli(capsys, "generate", tmp_path / "merged", "--prompt", "x", "--base")
    assert_one_clean_line(code, err, "merged model")


def test_chat_keeps_the_conversation_until_an_empty_line(sharp_llama, tmp_path, capsys, monkeypatch):
    chat_ckpt = save_checkpoint(tmp_path / "chat", sharp_llama, METHODS["prompt"], data_format="chat")
    gen = generator(chat_ckpt, max_new_tokens=6)
    lines = iter(["hello\n", "and again\n", "\n", "never read\n"])
    messages = chat_loop(gen, lambda: next(lines))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "and again" and next(lines) == "never read\n"
    # The second answer saw the first turn: it is the answer to the whole conversation.
    prompt = gen.tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert messages[3]["content"] == gen.decode(gen.generate([gen.prompt_ids([prompt])])[0])
    capsys.readouterr()  # what the loop above streamed
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # end of input ends it too
    code, out, err = run_cli(capsys, "generate", chat_ckpt, "--chat", "--max-new-tokens", 6)
    assert code == 0, err
    assert out == messages[1]["content"] + "\n"


def test_a_classification_checkpoint_is_refused(tmp_path, tiny_llama, capsys):
    ckpt = save_checkpoint(tmp_path / "cls", tiny_llama, METHODS["lora"], task="seq-cls")
    code, _, err = run_cli(capsys, "generate", ckpt, "--prompt", "x")
    assert_one_clean_line(code, err, "seq-cls", "causal-lm")


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x", "--data", "{rows}"], "exactly one"),
    ([], "exactly one"),
    (["--data", "{missing}"], "does not exist"),
    (["--prompt", "x", "--output", "{tmp}/out.jsonl"], "--output"),
    (["--data", "{rows}", "--output", "{ckpt}/out.jsonl"], "inside the checkpoint"),
    (["--prompt", "x", "--format", "yaml"], "--format"),
    (["--prompt", "x", "--seed", "-1"], "--seed"),
    (["--chat", "--batch-size", "0"], "--batch-size"),
    (["--data", "{bad}"], "column 'instruction' is not in --data"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys, args, needle):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "a"}]))
    places = {"rows": rows, "missing": tmp_path / "missing.json", "tmp": tmp_path, "ckpt": checkpoints["lora"],
              "bad": bad}
    code, _, err = run_cli(capsys, "generate", checkpoints["lora"], *[a.format(**places) for a in args])
    assert_one_clean_line(code, err, needle)


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", tmp_path / "nothing", "--prompt", "x")
    assert_one_clean_line(code, err, "does not exist")


def test_chat_needs_a_chat_template(checkpoints, monkeypatch):
    gen = generator(checkpoints["lora"])
    monkeypatch.setattr(gen.tokenizer, "chat_template", None)
    with pytest.raises(UserError, match="chat template"):
        chat_loop(gen, lambda: "hello")
