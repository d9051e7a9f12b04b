"""Text to token ids: byte-level by default (no vocabulary file), a SentencePiece model, or the WordPiece
vocabulary of a pretrained checkpoint.

The byte and SentencePiece tokenizers share the same reserved ids, so the model and the pair layout do
not depend on the choice:

- 0 ``PAD_ID``: padding (the model's key mask and the tagging token mask read ``id != 0``);
- 1 ``CLS_ID``: first token of every sequence;
- 2 ``SEP_ID``: closes each segment; a sentence pair is ``[CLS] a [SEP] b [SEP]`` (BERT's layout,
  Devlin et al. 2019, §3), a single sentence ``[CLS] a [SEP]``.

``ByteTokenizer``: id = UTF-8 byte + 3, vocabulary 259. ``SentencePieceTokenizer``: id = SentencePiece id
+ 3 (the model's own unk/bos/eos ids are shifted like the rest and never emitted as pads).

``WordPieceTokenizer`` (Wu et al. 2016; BERT, Devlin et al. 2019) emits the ids of the checkpoint whose
vocabulary it reads, its own ``[CLS]`` and ``[SEP]`` (101 and 102 in bert-base) included: the embedding
rows of a pretrained model are indexed by them. Its ``[PAD]`` must be id 0, as the pad mask reads
``id != 0`` (BERT's vocabularies have it there). Every tokenizer names its ``cls_id`` and ``sep_id``;
`pack` lays pairs out with them.

Truncation to ``max_length`` is longest-first: tokens are removed from the end of the longer segment
(the second on ties) until the pair fits, the rule of BERT's GLUE scripts, so a long premise never
crowds out a short hypothesis entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence

import numpy as np

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
NUM_RESERVED = 3
TOKENIZERS = ("bytes", "sentencepiece", "wordpiece")
WORDPIECE_FILES = ("tokenizer.json", "vocab.txt")  # in a checkpoint folder, the first found is read


class Tokenizer(Protocol):
    vocab_size: int
    cache_key: str  # names the tokenizer in cache file names; changes when its vocabulary does
    cls_id: int     # opens every sequence
    sep_id: int     # closes each segment

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the reserved ids: no vocabulary file, nothing out of vocabulary."""

    vocab_size = 256 + NUM_RESERVED
    cache_key = "bytes"
    cls_id, sep_id = CLS_ID, SEP_ID

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_RESERVED).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        content = bytes(int(i) - NUM_RESERVED for i in ids if int(i) >= NUM_RESERVED)
        return content.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model (Kudo & Richardson 2018) read from ``model_path``."""

    cls_id, sep_id = CLS_ID, SEP_ID

    def __init__(self, model_path: str):
        import sentencepiece  # pylint: disable=import-outside-toplevel

        with open(model_path, "rb") as f:
            proto = f.read()
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._processor.get_piece_size() + NUM_RESERVED
        self.cache_key = "spm-" + hashlib.sha1(proto).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        return [i + NUM_RESERVED for i in self._processor.encode(text, out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) - NUM_RESERVED for i in ids if int(i) >= NUM_RESERVED])


class WordPieceTokenizer:
    """The WordPiece tokenizer (Wu et al. 2016) of a BERT-family checkpoint, with the checkpoint's ids.

    ``path``: a ``tokenizer.json`` (its normalizer and pre-tokenizer are the checkpoint's own), a
    ``vocab.txt`` (BERT's basic tokenizer; lower-cased unless the folder's ``tokenizer_config.json`` says
    ``do_lower_case: false``), or a checkpoint folder holding either (`WORDPIECE_FILES`). Runs on the
    ``tokenizers`` package (Rust; no TensorFlow, which TFDS reads GLUE without here).
    """

    def __init__(self, path: str):
        import tokenizers  # pylint: disable=import-outside-toplevel

        path = wordpiece_file(path)
        if os.path.basename(path) == "tokenizer.json":
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
            lowercase = None
        else:
            lowercase = _lowercase_of(os.path.dirname(path))
            self._tokenizer = tokenizers.BertWordPieceTokenizer(path, lowercase=lowercase)
        # A saved tokenizer.json may pad or truncate every encoding; `pack` does both, for pairs.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        with open(path, "rb") as f:
            digest = hashlib.sha1(f.read() + repr(lowercase).encode()).hexdigest()[:12]
        self.cache_key = "wordpiece-" + digest
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.cls_id, self.sep_id = (self._special_id(path, token) for token in ("[CLS]", "[SEP]"))
        if self._special_id(path, "[PAD]") != PAD_ID:
            raise ValueError(f"{path}: [PAD] is id {self._special_id(path, '[PAD]')}, and the pad mask reads "
                             f"id != {PAD_ID}; only vocabularies with [PAD] at {PAD_ID} (BERT's) are supported")

    def _special_id(self, path: str, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{path}: the vocabulary has no {token} token")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def wordpiece_file(path: str) -> str:
    """``path`` itself, or the first of `WORDPIECE_FILES` in folder ``path``; a one-line ValueError
    where there is none."""
    if os.path.isdir(path):
        for name in WORDPIECE_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ValueError(f"{path} holds neither {' nor '.join(WORDPIECE_FILES)}")
    if not os.path.isfile(path):
        raise ValueError(f"wordpiece_vocab={path!r}: no such file or folder")
    return path


def _lowercase_of(folder: str) -> bool:
    """``do_lower_case`` of the folder's ``tokenizer_config.json`` (True, BERT-uncased's, without one)."""
    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        return True
    with open(config) as f:
        return bool(json.load(f).get("do_lower_case", True))


def make_tokenizer(name: str = "bytes", sentencepiece_model: str = "", wordpiece_vocab: str = "") -> Tokenizer:
    """``"bytes"``, ``"sentencepiece"`` with the path of a ``.model`` file, or ``"wordpiece"`` with a
    checkpoint's ``vocab.txt`` / ``tokenizer.json`` or its folder.

    Raises:
        ValueError: one line, for an unknown name or a missing or unusable vocabulary file.
    """
    if name == "bytes":
        return ByteTokenizer()
    if name == "wordpiece":
        if not wordpiece_vocab:
            raise ValueError("tokenizer='wordpiece' needs data.options.wordpiece_vocab=PATH (a checkpoint "
                             "folder, or its vocab.txt or tokenizer.json)")
        try:
            return WordPieceTokenizer(wordpiece_vocab)
        except Exception as e:  # the tokenizers package raises its own errors for an unreadable file
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot read wordpiece_vocab={wordpiece_vocab!r}: {first_line}") from None
    if name == "sentencepiece":
        if not sentencepiece_model:
            raise ValueError("tokenizer='sentencepiece' needs data.options.sentencepiece_model=PATH "
                             "(a SentencePiece .model file)")
        try:
            return SentencePieceTokenizer(sentencepiece_model)
        except OSError as e:
            raise ValueError(f"cannot read sentencepiece_model={sentencepiece_model!r}: {e}") from None
    raise ValueError(f"unknown tokenizer {name!r}; valid choices: {', '.join(TOKENIZERS)}")


def truncate_longest_first(first: list[int], second: list[int], budget: int) -> tuple[list, list]:
    """Keeps ``budget`` tokens in all: removing one token at a time from the end of the longer segment
    (the second one on ties, as BERT's ``_truncate_seq_pair``) ends at these lengths, computed without
    the loop."""
    second_length = min(len(second), max(budget - len(first), budget // 2))
    first_length = min(len(first), budget - second_length)
    return first[:first_length], second[:second_length]


def pack(first: list[int], second: list[int] | None, max_length: int, cls_id: int = CLS_ID,
         sep_id: int = SEP_ID) -> np.ndarray:
    """``int32[max_length]``: ``[CLS] first [SEP] (second [SEP])`` truncated longest-first, then padded."""
    if second is None:
        ids = [cls_id] + first[:max(max_length - 2, 0)] + [sep_id]
    else:
        first, second = truncate_longest_first(first, second, max(max_length - 3, 0))
        ids = [cls_id] + first + [sep_id] + second + [sep_id]
    out = np.zeros(max_length, np.int32)
    ids = ids[:max_length]
    out[:len(ids)] = ids
    return out


def encode_texts(tokenizer: Tokenizer, first: Sequence[str], second: Sequence[str] | None,
                 max_length: int) -> np.ndarray:
    """``int32[N, max_length]`` packed sequences of single texts or of text pairs."""
    if max_length < 4:
        raise ValueError(f"max_length must be >= 4 ([CLS] a [SEP] b [SEP] needs room), got {max_length}")
    out = np.zeros((len(first), max_length), np.int32)
    for i, text in enumerate(first):
        pair = None if second is None else tokenizer.encode(second[i])
        out[i] = pack(tokenizer.encode(text), pair, max_length, tokenizer.cls_id, tokenizer.sep_id)
    return out
