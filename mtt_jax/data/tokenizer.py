"""Text to token ids: byte-level by default (no vocabulary file), or a SentencePiece model.

Both tokenizers share the same reserved ids, so the model and the pair layout do not depend on the choice:

- 0 ``PAD_ID``: padding (the model's key mask and the tagging token mask read ``id != 0``);
- 1 ``CLS_ID``: first token of every sequence;
- 2 ``SEP_ID``: closes each segment; a sentence pair is ``[CLS] a [SEP] b [SEP]`` (BERT's layout,
  Devlin et al. 2019, §3), a single sentence ``[CLS] a [SEP]``.

``ByteTokenizer``: id = UTF-8 byte + 3, vocabulary 259. ``SentencePieceTokenizer``: id = SentencePiece id
+ 3 (the model's own unk/bos/eos ids are shifted like the rest and never emitted as pads).

Truncation to ``max_length`` is longest-first: tokens are removed from the end of the longer segment
(the second on ties) until the pair fits, the rule of BERT's GLUE scripts, so a long premise never
crowds out a short hypothesis entirely.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence

import numpy as np

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
NUM_RESERVED = 3
TOKENIZERS = ("bytes", "sentencepiece")


class Tokenizer(Protocol):
    vocab_size: int
    cache_key: str  # names the tokenizer in cache file names; changes when its vocabulary does

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the reserved ids: no vocabulary file, nothing out of vocabulary."""

    vocab_size = 256 + NUM_RESERVED
    cache_key = "bytes"

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_RESERVED).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        content = bytes(int(i) - NUM_RESERVED for i in ids if int(i) >= NUM_RESERVED)
        return content.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model (Kudo & Richardson 2018) read from ``model_path``."""

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


def make_tokenizer(name: str = "bytes", sentencepiece_model: str = "") -> Tokenizer:
    """``"bytes"``, or ``"sentencepiece"`` with the path of a ``.model`` file.

    Raises:
        ValueError: one line, for an unknown name or a missing model file.
    """
    if name == "bytes":
        return ByteTokenizer()
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


def pack(first: list[int], second: list[int] | None, max_length: int) -> np.ndarray:
    """``int32[max_length]``: ``[CLS] first [SEP] (second [SEP])`` truncated longest-first, then padded."""
    if second is None:
        ids = [CLS_ID] + first[:max(max_length - 2, 0)] + [SEP_ID]
    else:
        first, second = truncate_longest_first(first, second, max(max_length - 3, 0))
        ids = [CLS_ID] + first + [SEP_ID] + second + [SEP_ID]
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
        out[i] = pack(tokenizer.encode(text), pair, max_length)
    return out
