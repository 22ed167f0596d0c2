"""Tokenizers: the `tokenizers` library's, loaded from a checkpoint's `tokenizer.json`, or trained
here for text without a pretrained LM (byte-level BPE, as GPT-2 / SmolLM / Qwen2 use) and saved
the same way, so both kinds load with `load_tokenizer`.

Byte-level BPE has no unknown token: every string encodes, and decoding gives it back exactly.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"                # its name in a checkpoint or saved-model directory
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")   # ids 0, 1, 2 of a tokenizer trained here


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | None = None,
                    special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (special tokens first) learnt from `texts`; saved to
    `path` (a tokenizer.json) when given."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a tokenizer.json file (or of the directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- the library raises a bare Exception for a malformed file
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None


END_TOKENS = ("<eos>", "<|endoftext|>", "</s>", "<|im_end|>")   # ours, GPT-2 / SmolLM / Qwen2, Llama


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(pad id, end id) of `tokenizer`: ours ("<pad>", "<eos>"), or a public LM's end-of-text token
    (also used to pad, as those models do); ValueError when it has none of them."""
    end = next((tokenizer.token_to_id(t) for t in END_TOKENS if tokenizer.token_to_id(t) is not None), None)
    if end is None:
        raise ValueError(f"the tokenizer has no end-of-text token (looked for {list(END_TOKENS)})")
    pad = tokenizer.token_to_id("<pad>")
    return (end if pad is None else pad), end
