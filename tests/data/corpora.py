"""Test corpora for the data tests: small multilingual documents and a locally trained BPE
tokenizer (nothing downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

TEXT = (
    "the data loader serves packed sequences der Zug fährt über die Brücke la niña "
    "mange une crème brûlée à Zürich łódź żółw Ελληνικά γλώσσα суперкомпьютер "
    "eurohpc marenostrum lumi leonardo jupiter tokens shards résumé naïve café 😀"
)
WORDS = TEXT.split()


def make_documents(num: int, seed: int = 0, alphabet: str | None = None) -> list[str]:
    """Random documents of 5-80 words (or of letters from ``alphabet``), with newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num):
        if alphabet:
            words = ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(40)]
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 80))]
        docs.append(" ".join(words).replace(" the ", "\nthe "))
    return docs


def write_text_files(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc-{i:04d}.txt").write_text(d, encoding="utf-8")
    return folder


def train_bpe(path: Path, docs: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE trained on ``docs`` and saved like any HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(path)
    )
    return path
