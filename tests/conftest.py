"""Shared fixtures: tiny random-init models saved as real local model directories.

They are built from config in milliseconds with no network, then written with save_pretrained, so
every test loads them exactly the way a user's local model directory is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core (pytest -n): one thread each, and the same for the processes
    # the tests start, so no worker's OpenMP threads wait on another worker's core.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked `first` lead (a stable sort keeps the rest in order): under `pytest -n` the slow
    suite's longest test (the quickstart, 500-750 s) then starts at once and the other worker runs the
    remaining tests beside it, instead of the quickstart starting late and running on alone."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_CORPUS = [
    "the cat sat on the mat", "a great movie with a fine cast", "terrible , boring and far too long",
    "What is the capital of France? Paris.", "Instruction: add the numbers 2 and 3. Response: 5",
    "hello world", "deltafit trains small deltas of big models", "0 1 2 3 4 5 6 7 8 9",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(directory: Path, pad: bool = True):
    """A byte-level BPE tokenizer trained on a few lines: any text encodes, vocab ~300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "[CLS]", "[SEP]"]
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad else None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def _tiny_llama(directory: Path, task: str = "causal-lm"):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(directory, pad=False)  # Llama tokenizers usually ship without a pad token
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _tiny_bert(directory: Path):
    from transformers import BertConfig, BertForMaskedLM

    tok = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def _tiny_gpt2(directory: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(directory, pad=False)  # GPT-2's tokenizer has no pad token either
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # embeddings tied to the LM head, as in GPT-2
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Directory of a 2-layer random-init Llama (causal LM) with its tokenizer."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """Directory of a 2-layer random-init BERT with its tokenizer (seq-cls gets a new head)."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """Directory of a 2-layer random-init GPT-2 (causal LM, Conv1D projections, tied embeddings)."""
    return _tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(24)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture()
def cls_file(tmp_path) -> Path:
    """A tiny sentiment TSV with string labels."""
    lines = ["sentence\tlabel"] + [
        f"{'a great fine movie' if i % 2 else 'terrible boring film'} {i}\t{'pos' if i % 2 else 'neg'}"
        for i in range(32)
    ]
    path = tmp_path / "cls.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path
