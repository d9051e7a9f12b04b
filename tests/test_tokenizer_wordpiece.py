"""The WordPiece tokenizer of a BERT checkpoint: the checkpoint's own ids (its [CLS]/[SEP]), a round trip on
a tiny vocabulary, the same ids from ``vocab.txt`` and ``tokenizer.json``, the segments a model reads off a
packed pair, and one-line refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax.data import tokenizer as tok
from mtt_jax.models.trunk import token_type_ids

# BERT's layout: [PAD] at 0, and the other special tokens where bert-base keeps them relative to each
# other ([CLS] and [SEP] are not 1 and 2, our reserved ids, so a mix-up would show).
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[MASK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "dog",
         "a", "##s", "##ting", "ran", ".", ",", "is", "not"]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return str(path)


def test_wordpiece_emits_the_checkpoints_ids_and_round_trips(vocab_file):
    t = tok.make_tokenizer("wordpiece", wordpiece_vocab=vocab_file)
    assert (t.vocab_size, t.cls_id, t.sep_id) == (20, 4, 5)
    ids = t.encode("The cats sat, sitting? No: the dog ran.")
    assert ids == [6, 7, 13, 8, 17, 2, 2, 2, 2, 6, 11, 15, 16]  # lower-cased; cat ##s; unknowns [UNK]
    assert t.decode(t.encode("The cats sat on the mat.")) == "the cats sat on the mat."
    packed = tok.encode_texts(t, ["a cat"], ["the dog"], 8)
    np.testing.assert_array_equal(packed, [[4, 12, 7, 5, 6, 11, 5, 0]])


def test_tokenizer_json_and_vocab_txt_give_the_same_ids(vocab_file, tmp_path):
    import tokenizers

    saved = tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=True)
    saved.enable_padding(length=32)       # as some saved tokenizers do: our packing pads, not theirs
    saved.enable_truncation(max_length=4)
    saved.save(str(tmp_path / "tokenizer.json"))
    from_json = tok.WordPieceTokenizer(str(tmp_path))  # a folder: tokenizer.json is read first
    from_vocab = tok.WordPieceTokenizer(vocab_file)
    text = "The mats, the cat sat on a dog."
    assert from_json.encode(text) == from_vocab.encode(text) == [6, 10, 13, 17, 6, 7, 8, 9, 12, 11, 16]
    assert from_json.cache_key != from_vocab.cache_key  # cache file names tell the two files apart


def test_a_cased_checkpoint_keeps_case(vocab_file, tmp_path):
    uncased = tok.WordPieceTokenizer(vocab_file)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = tok.WordPieceTokenizer(vocab_file)
    assert cased.encode("The cat") == [2, 7] and uncased.encode("The cat") == [6, 7]  # "The" is unknown
    assert cased.cache_key != uncased.cache_key


def test_the_segments_of_a_packed_pair_are_read_off_its_separators(vocab_file):
    t = tok.WordPieceTokenizer(vocab_file)
    packed = tok.encode_texts(t, ["a cat sat", "the dog"], ["the mat", "a"], 10)
    types = np.asarray(token_type_ids(jnp.asarray(packed), t.sep_id, 2))
    np.testing.assert_array_equal(packed, [[4, 12, 7, 8, 5, 6, 10, 5, 0, 0], [4, 6, 11, 5, 12, 5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(types, [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]])


def test_unusable_vocabularies_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^tokenizer='wordpiece' needs data.options.wordpiece_vocab=PATH"):
        tok.make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match=r"no such file or folder$"):
        tok.make_tokenizer("wordpiece", wordpiece_vocab=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"holds neither tokenizer.json nor vocab.txt$"):
        tok.make_tokenizer("wordpiece", wordpiece_vocab=str(tmp_path))
    shifted = tmp_path / "vocab.txt"
    shifted.write_text("\n".join(["[UNK]"] + VOCAB) + "\n")
    with pytest.raises(ValueError, match=r"\[PAD\] is id 1, and the pad mask reads id != 0"):
        tok.make_tokenizer("wordpiece", wordpiece_vocab=str(shifted))
    assert "wordpiece" in tok.TOKENIZERS
