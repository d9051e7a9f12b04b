"""Tokenizers: reserved ids, the pair layout, longest-first truncation, and a trained SentencePiece model."""

import numpy as np
import pytest

from mtt_jax.data import tokenizer as tok


def test_byte_ids_are_bytes_past_the_reserved_ids():
    t = tok.ByteTokenizer()
    assert t.vocab_size == 259 and (tok.PAD_ID, tok.CLS_ID, tok.SEP_ID) == (0, 1, 2)
    assert t.encode("Ab") == [ord("A") + 3, ord("b") + 3]
    assert t.encode("é") == [0xC3 + 3, 0xA9 + 3]  # UTF-8 bytes, nothing out of vocabulary
    assert t.decode(t.encode("naïve café")) == "naïve café"
    assert min(t.encode("\x00 any text")) >= 3  # a 0 byte never looks like padding


def test_pack_single_and_pair_layouts():
    t = tok.ByteTokenizer()
    single = tok.pack(t.encode("hi"), None, 8)
    np.testing.assert_array_equal(single, [1, ord("h") + 3, ord("i") + 3, 2, 0, 0, 0, 0])
    pair = tok.pack(t.encode("ab"), t.encode("c"), 8)
    np.testing.assert_array_equal(pair, [1, ord("a") + 3, ord("b") + 3, 2, ord("c") + 3, 2, 0, 0])
    assert pair.dtype == np.int32


def reference_truncation(first, second, budget):
    """The rule as stated (BERT's): drop from the end of the longer segment (second on ties) one at a
    time."""
    first, second = list(first), list(second)
    while len(first) + len(second) > budget:
        if len(first) > len(second):
            first.pop()
        else:
            second.pop()
    return first, second


def test_longest_first_truncation_matches_the_one_at_a_time_rule():
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b = list(range(rng.integers(0, 40))), list(range(100, 100 + rng.integers(0, 40)))
        budget = int(rng.integers(1, 60))
        assert tok.truncate_longest_first(a, b, budget) == reference_truncation(a, b, budget)


def test_encode_texts_truncates_to_max_length_keeping_both_segments():
    t = tok.ByteTokenizer()
    tokens = tok.encode_texts(t, ["x" * 100, "short"], ["y" * 3, "also short"], max_length=16)
    assert tokens.shape == (2, 16)
    long_pair = t.decode(tokens[0])
    assert long_pair == "x" * 10 + "y" * 3  # 16 - 3 specials = 13 content bytes: 10 + 3
    assert list(tokens[0]).count(tok.SEP_ID) == 2 and tokens[0, -1] == tok.SEP_ID
    assert list(tokens[1]).count(tok.SEP_ID) == 2 and tokens[1, 0] == tok.CLS_ID
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_texts(t, ["a"], None, max_length=3)


SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the cat and the dog are friends",
             "is the cat on the mat", "no dog sat there", "friends ran to the park"] * 20


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tiny"), vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)
    return str(folder / "tiny.model")


def test_sentencepiece_ids_shift_past_reserved_and_round_trip(sentencepiece_model):
    import sentencepiece

    t = tok.make_tokenizer("sentencepiece", sentencepiece_model)
    raw = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    assert t.vocab_size == raw.get_piece_size() + 3
    text = "the cat sat on the mat"
    assert t.encode(text) == [i + 3 for i in raw.encode(text)]
    assert min(t.encode(text)) >= 3 and t.decode(t.encode(text)) == text
    assert t.cache_key.startswith("spm-") and t.cache_key != tok.ByteTokenizer.cache_key
    packed = tok.pack(t.encode("the cat"), t.encode("the dog"), 16)
    assert list(packed).count(tok.SEP_ID) == 2


def test_make_tokenizer_errors_are_one_line(tmp_path):
    for args, match in ((("words",), "unknown tokenizer 'words'"),
                        (("sentencepiece",), "sentencepiece_model"),
                        (("sentencepiece", str(tmp_path / "missing.model")), "cannot read")):
        with pytest.raises(ValueError, match=match) as error:
            tok.make_tokenizer(*args)
        assert "\n" not in str(error.value)
