"""Write a small local Hugging Face tokenizer directory, so load generators need no hub access.

guidellm and inference-perf size their synthetic prompts with a Hugging Face tokenizer. The mock
engine counts tokens its own way, so any local tokenizer will do: this one is a word-level
vocabulary trained on Faker text (what guidellm's synthetic data is made of). Run it with the
load generator's Python (it needs ``tokenizers``; ``faker`` when available):

    /tmp/gvenv/bin/python bench/mockengine/make_tokenizer.py /tmp/mock-tokenizer
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def corpus() -> list[str]:
    try:
        from faker import Faker
    except ImportError:
        words = [
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "a",
            "lazy",
            "dog",
            "while",
            "models",
            "stream",
            "tokens",
        ]
        return [" ".join(words[(i + j) % len(words)] for j in range(50)) for i in range(2000)]
    fake = Faker()
    fake.seed_instance(0)
    return [fake.text(max_nb_chars=2000) for _ in range(4000)]


def main(out: str) -> int:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(vocab_size=30000, special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train_from_iterator(corpus(), trainer)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": 131072}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {path} ({tok.get_vocab_size()} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mock-tokenizer"))
