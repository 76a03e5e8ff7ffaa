#!/usr/bin/env python
"""Inputs for scripts/gpu_check.sh that need no download: a random-init Llama-shaped model of about
1.1B parameters (TinyLlama's shape: 22 layers, width 2048, MLP 5632, 32 heads, 4 KV heads) with a
byte-level BPE tokenizer, and an alpaca-format file of generated rows (~200 tokens each).

    python scripts/gpu_inputs.py OUT_DIR     # writes OUT_DIR/llama-1b/ and OUT_DIR/alpaca.json

Random weights train and time like trained ones (the same matmuls); they are not for quality.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = ("model delta rank adapter weight train token layer batch memory fast slow small large data "
         "recipe merge prefix prompt gradient loss step learn value key query matrix sum mean").split()


def rows(n: int = 512, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"instruction": text(20), "input": "", "output": text(150)} for _ in range(n)]


def tokenizer(directory: Path, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def llama_1b(directory: Path, corpus: list[str]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(directory, corpus)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster there
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    print(f"{directory}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)


def main(out: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = rows()
    (out / "alpaca.json").write_text(json.dumps(data))
    if not (out / "llama-1b" / "config.json").is_file():
        llama_1b(out / "llama-1b", [r["instruction"] + " " + r["output"] for r in data])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
