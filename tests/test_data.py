"""Tests of mtt_jax.data: layouts, determinism, labels recomputed independently, eval padding."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mtt_jax import data
from mtt_jax.data import multidigits, seqtasks

DIGIT_TASKS = ("left_digit", "right_digit")
SEQ_TASKS = ("majority", "majority_parity", "mean_value", "repeat_tag",
             "first_group", "max_value", "distinct_count", "last_group_tag")


def assert_batches_equal(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert a["labels"].keys() == b["labels"].keys() == a["mask"].keys()
    for task in a["labels"]:
        np.testing.assert_array_equal(a["labels"][task], b["labels"][task])
        np.testing.assert_array_equal(a["mask"][task], b["mask"][task])


# --- Registry ------------------------------------------------------------------------------------------

def test_registry_lists_sources_and_tasks():
    assert set(data.SOURCES) >= {"multidigits", "seqtasks", "mmoe_synthetic", "gradnorm_toy", "glue",
                                 "multimnist", "celeba", "retrieval", "multiview"}  # (+ plugins' sources)
    assert data.AVAILABLE_TASKS["multidigits"] == DIGIT_TASKS
    assert data.AVAILABLE_TASKS["seqtasks"] == SEQ_TASKS
    assert data.AVAILABLE_TASKS["glue"] == ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte",
                                            "wnli")
    assert data.AVAILABLE_TASKS["multimnist"] == ("mnist_left", "mnist_right")
    assert len(data.AVAILABLE_TASKS["celeba"]) == 40 and "celeba_smiling" in data.AVAILABLE_TASKS["celeba"]
    assert data.AVAILABLE_TASKS["mmoe_synthetic"][:4] == ("mmoe_a1", "mmoe_a2", "mmoe_b1", "mmoe_b2")
    assert data.AVAILABLE_TASKS["gradnorm_toy"][:2] == ("toy_0", "toy_1")


@pytest.mark.parametrize("name, tasks, options, bad, valid", [
    ("nosuch", DIGIT_TASKS, {}, "'nosuch'", "multidigits, seqtasks"),
    ("multidigits", ("left_digit", "middle_digit"), {}, "'middle_digit'", "left_digit, right_digit"),
    ("seqtasks", ("sorting",), {}, "'sorting'", ", ".join(SEQ_TASKS)),
    ("seqtasks", (), {}, "no tasks", ", ".join(SEQ_TASKS)),
    ("multidigits", DIGIT_TASKS, {"jiter": 1}, "'jiter'", "jitter, num_eval_pairs"),
])
def test_bad_names_raise_one_line_value_error(name, tasks, options, bad, valid):
    with pytest.raises(ValueError) as error:
        data.make_source(name, tasks, seed=0, **options)
    message = str(error.value)
    assert bad in message and valid in message and "\n" not in message


def test_bad_numbers_raise_value_error():
    with pytest.raises(ValueError, match="seed"):
        data.make_source("seqtasks", SEQ_TASKS, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_source("multidigits", DIGIT_TASKS, seed=0).train_batch(0, 0)


# --- multidigits -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_source():
    return data.make_source("multidigits", DIGIT_TASKS, seed=3, jitter=1, num_eval_pairs=300)


def test_multidigits_batch_shapes_dtypes_ranges(digits_source):
    assert digits_source.layout == "single" and digits_source.task_names == DIGIT_TASKS
    assert digits_source.input_spec == data.InputSpec(kind="image", shape=(12, 12))
    batch = digits_source.train_batch(step=0, batch_size=64)
    assert batch["inputs"].shape == (64, 12, 12) and batch["inputs"].dtype == np.float32
    assert batch["inputs"].min() == 0.0 and batch["inputs"].max() == 1.0
    for task in DIGIT_TASKS:
        assert batch["labels"][task].shape == (64,) and batch["labels"][task].dtype == np.int32
        assert batch["labels"][task].min() >= 0 and batch["labels"][task].max() <= 9
        assert batch["mask"][task].dtype == np.float32
        np.testing.assert_array_equal(batch["mask"][task], np.ones(64))


def test_multidigits_labels_match_digits_rebuilt_from_raw_images(digits_source):
    raw = load_digits()
    batch = digits_source.train_batch(step=7, batch_size=32)
    pairs = digits_source.train_pairs(step=7, batch_size=32)
    for i in range(32):
        canvas = np.zeros((12, 12))
        (lr, lc), (rr, rc) = pairs.left_corner[i], pairs.right_corner[i]
        canvas[lr:lr + 8, lc:lc + 8] = raw.images[pairs.left_index[i]] / 16
        canvas[rr:rr + 8, rc:rc + 8] = np.maximum(canvas[rr:rr + 8, rc:rc + 8],
                                                   raw.images[pairs.right_index[i]] / 16)
        np.testing.assert_allclose(batch["inputs"][i], canvas, atol=1e-6)
        assert batch["labels"]["left_digit"][i] == raw.target[pairs.left_index[i]]
        assert batch["labels"]["right_digit"][i] == raw.target[pairs.right_index[i]]
    # jitter=1 moves the left corner within [0, 1] (clipped at 0), the right one within [3, 4]
    # (clipped at 4, the last corner that keeps an 8x8 digit on the 12x12 canvas).
    assert pairs.left_corner.min() == 0 and pairs.left_corner.max() == 1
    assert pairs.right_corner.min() == 3 and pairs.right_corner.max() == 4


def test_multidigits_without_jitter_places_digits_at_fixed_corners():
    raw = load_digits()
    source = data.make_source("multidigits", DIGIT_TASKS, seed=0)
    pairs = source.train_pairs(step=0, batch_size=8)
    np.testing.assert_array_equal(pairs.left_corner, np.zeros((8, 2)))
    np.testing.assert_array_equal(pairs.right_corner, np.full((8, 2), 4))
    # Outside the 4x4 overlap each digit is copied unchanged.
    inputs = source.train_batch(step=0, batch_size=8)["inputs"]
    np.testing.assert_allclose(inputs[:, :4, :8], raw.images[pairs.left_index][:, :4] / 16, atol=1e-6)
    np.testing.assert_allclose(inputs[:, 8:, 4:], raw.images[pairs.right_index][:, 4:] / 16, atol=1e-6)


def test_multidigits_train_is_pure_function_of_seed_step_batch_size(digits_source):
    later_first = digits_source.train_batch(step=5, batch_size=16)
    digits_source.train_batch(step=0, batch_size=16)
    again = data.make_source("multidigits", DIGIT_TASKS, seed=3, jitter=1, num_eval_pairs=300)
    assert_batches_equal(later_first, again.train_batch(step=5, batch_size=16))
    other_step = digits_source.train_batch(step=6, batch_size=16)
    assert not np.array_equal(later_first["inputs"], other_step["inputs"])
    other_seed = data.make_source("multidigits", DIGIT_TASKS, seed=4, jitter=1).train_batch(5, 16)
    assert not np.array_equal(later_first["inputs"], other_seed["inputs"])


def test_multidigits_split_is_stratified_and_disjoint(digits_source):
    train, held_out = multidigits.split_indices()
    assert len(train) + len(held_out) == 1797 and not set(train) & set(held_out)
    labels = load_digits().target
    assert np.all(np.abs(np.bincount(labels[held_out]) / np.bincount(labels) - 0.2) < 0.01)
    eval_images = np.concatenate([digits_source.eval_pairs.left_index,
                                  digits_source.eval_pairs.right_index])
    assert set(eval_images) <= set(held_out)
    train_pairs = digits_source.train_pairs(step=0, batch_size=2000)
    assert set(train_pairs.left_index) | set(train_pairs.right_index) <= set(train)


def test_multidigits_eval_is_fixed_and_padded(digits_source):
    batches = list(digits_source.eval_batches(batch_size=128))
    assert len(batches) == 3  # 300 = 128 + 128 + 44
    for batch in batches:
        assert batch["inputs"].shape == (128, 12, 12)
        assert batch["labels"]["left_digit"].shape == (128,)
    assert sum(batch["mask"]["left_digit"].sum() for batch in batches) == 300
    np.testing.assert_array_equal(batches[-1]["mask"]["right_digit"][44:], np.zeros(84))
    np.testing.assert_array_equal(batches[-1]["mask"]["right_digit"][:44], np.ones(44))
    other_seed = data.make_source("multidigits", DIGIT_TASKS, seed=99, jitter=1, num_eval_pairs=300)
    for a, b in zip(batches, other_seed.eval_batches(batch_size=128)):
        assert_batches_equal(a, b)


def test_multidigits_serves_one_task():
    source = data.make_source("multidigits", ["right_digit"], seed=0)
    batch = source.train_batch(0, 4)
    assert list(batch["labels"]) == ["right_digit"] and list(batch["mask"]) == ["right_digit"]
    assert source.num_eval_examples == 2000


# --- seqtasks --------------------------------------------------------------------------------------

def reference_labels(tokens: np.ndarray) -> dict:
    """Labels of one sequence by plain loops, independent of the vectorized implementation."""
    content = [int(t) for t in tokens if t != 0]
    counts = [0, 0, 0, 0]
    for t in content:
        counts[(t - 1) % 4] += 1
    majority = counts.index(max(counts))
    mean_value = sum((t - 1) // 4 for t in content) / len(content)
    repeat = [0] * len(tokens)
    for i, t in enumerate(content):
        repeat[i] = int(t in content[:i])
    first_group = (content[0] - 1) % 4
    max_value = max((t - 1) // 4 for t in content)
    distinct = []
    for t in content:
        if t not in distinct:
            distinct.append(t)
    last_group = [0] * len(tokens)
    for i in range(1, len(content)):
        last_group[i] = (content[i - 1] - 1) % 4
    return {"majority": majority, "majority_parity": majority % 2, "mean_value": mean_value,
            "repeat_tag": repeat, "first_group": first_group, "max_value": max_value,
            "distinct_count": len(distinct), "last_group_tag": last_group}


@pytest.fixture(scope="module")
def seq_source():
    return data.make_source("seqtasks", SEQ_TASKS, seed=1, num_eval_examples=100)


def test_seqtasks_batch_shapes_and_dtypes(seq_source):
    assert seq_source.layout == "multi"
    assert seq_source.input_spec == data.InputSpec(kind="tokens", shape=(32,), vocab_size=32)
    batch = seq_source.train_batch(step=0, batch_size=16)
    assert batch["inputs"].shape == (8, 16, 32) and batch["inputs"].dtype == np.int32
    expected = {"majority": ((16,), np.int32), "majority_parity": ((16,), np.int32),
                "mean_value": ((16,), np.float32), "repeat_tag": ((16, 32), np.int32),
                "first_group": ((16,), np.int32), "max_value": ((16,), np.int32),
                "distinct_count": ((16,), np.float32), "last_group_tag": ((16, 32), np.int32)}
    for task, (shape, dtype) in expected.items():
        assert batch["labels"][task].shape == shape and batch["labels"][task].dtype == dtype
        assert batch["mask"][task].dtype == np.float32
        np.testing.assert_array_equal(batch["mask"][task], np.ones(16))


def test_seqtasks_tokens_lengths_and_padding(seq_source):
    inputs = seq_source.train_batch(step=2, batch_size=256)["inputs"]
    assert inputs.min() == 0 and inputs.max() <= 31
    lengths = (inputs != 0).sum(-1)
    assert lengths.min() >= 16 and lengths.max() <= 32
    assert lengths.min() == 16 and lengths.max() == 32  # both ends reached in 1024 sequences
    positions = np.arange(32)
    np.testing.assert_array_equal(inputs != 0, positions < lengths[..., None])  # pads only at the end


def test_seqtasks_labels_match_reference_loop(seq_source):
    batch = seq_source.train_batch(step=3, batch_size=64)
    value_mean, value_std = seqtasks.mean_value_moments(32)
    count_mean, count_std = seqtasks.distinct_count_moments(32)
    for t, task in enumerate(SEQ_TASKS):
        for i in range(64):
            expected = reference_labels(batch["inputs"][t, i])[task]
            got = batch["labels"][task][i]
            if task == "mean_value":
                assert got == pytest.approx((expected - value_mean) / value_std, abs=1e-5)
            elif task == "distinct_count":
                assert got == pytest.approx((expected - count_mean) / count_std, abs=1e-5)
            else:
                np.testing.assert_array_equal(got, expected)


def test_seqtasks_label_ranges_and_balance(seq_source):
    batch = seq_source.train_batch(step=4, batch_size=2048)
    majority = batch["labels"]["majority"]
    assert set(np.unique(majority)) == {0, 1, 2, 3}
    assert np.bincount(majority).min() > 0.18 * 2048  # every group is the majority about 1/4 of time
    assert set(np.unique(batch["labels"]["majority_parity"])) == {0, 1}
    tags = batch["labels"]["repeat_tag"]
    assert set(np.unique(tags)) == {0, 1}
    assert np.all(tags[batch["inputs"][3] == 0] == 0)
    assert 0.2 < tags[batch["inputs"][3] != 0].mean() < 0.8
    first_group = batch["labels"]["first_group"]
    assert set(np.unique(first_group)) == {0, 1, 2, 3}
    assert np.bincount(first_group).min() > 0.18 * 2048
    max_value = batch["labels"]["max_value"]
    assert max_value.min() >= 0 and max_value.max() == 6  # 7 classes; the maximum is usually 6
    assert 0.9 < (max_value == 6).mean() < 1.0
    last_group = batch["labels"]["last_group_tag"]
    assert set(np.unique(last_group)) == {0, 1, 2, 3}
    assert np.all(last_group[batch["inputs"][7] == 0] == 0) and np.all(last_group[:, 0] == 0)


def test_majority_parity_is_majority_mod_2_on_same_sequences():
    tokens = seqtasks.sample_sequences(np.random.default_rng(0), 500, 32)
    labels = seqtasks.label_sequences(tokens)
    np.testing.assert_array_equal(labels["majority_parity"], labels["majority"] % 2)


def test_new_labels_match_loops_on_edge_sequences():
    tokens = np.array([[5, 5, 2, 0, 0],     # groups 0, 0, 1; values 1, 1, 0
                       [28, 1, 12, 16, 8],  # groups 3, 0, 3, 3, 3; values 6, 0, 2, 3, 1
                       [3, 0, 0, 0, 0]])    # a single content token (group 2, value 0)
    labels = seqtasks.label_sequences(tokens)
    np.testing.assert_array_equal(labels["first_group"], [0, 3, 2])
    np.testing.assert_array_equal(labels["max_value"], [1, 6, 0])
    np.testing.assert_array_equal(labels["last_group_tag"],
                                  [[0, 0, 0, 0, 0], [0, 3, 0, 3, 3], [0, 0, 0, 0, 0]])
    count_mean, count_std = seqtasks.distinct_count_moments(5)
    np.testing.assert_allclose(labels["distinct_count"] * count_std + count_mean, [2, 5, 1], atol=1e-5)


def test_distinct_count_is_number_of_untagged_content_positions():
    tokens = seqtasks.sample_sequences(np.random.default_rng(1), 500, 32)
    labels = seqtasks.label_sequences(tokens)
    count_mean, count_std = seqtasks.distinct_count_moments(32)
    untagged = ((tokens != 0) & (labels["repeat_tag"] == 0)).sum(axis=1)
    np.testing.assert_allclose(labels["distinct_count"] * count_std + count_mean, untagged, atol=1e-4)


def test_distinct_count_constants_are_pinned_and_match_a_sample():
    # The documented constants (seqtasks docstrings); the exact formula must keep producing them.
    assert seqtasks.distinct_count_moments(32) == pytest.approx((15.643828, 2.574220), abs=1e-6)
    assert seqtasks.distinct_count_moments(8) == pytest.approx((5.402741, 1.319103), abs=1e-6)
    for length in (32, 8):
        tokens = seqtasks.sample_sequences(np.random.default_rng(2), 20000, length)
        counts = np.array([len(set(int(t) for t in row if t != 0)) for row in tokens])
        count_mean, count_std = seqtasks.distinct_count_moments(length)
        assert counts.mean() == pytest.approx(count_mean, abs=0.1)
        assert counts.std() == pytest.approx(count_std, rel=0.03)


def test_distinct_count_is_standardized(seq_source):
    values = seq_source.train_batch(step=5, batch_size=4096)["labels"]["distinct_count"]
    assert abs(values.mean()) < 0.15 and 0.7 < values.std() < 1.3
    short = data.make_source("seqtasks", ["distinct_count"], seed=0, length=8).train_batch(0, 4096)
    assert abs(short["labels"]["distinct_count"].mean()) < 0.15
    assert 0.7 < short["labels"]["distinct_count"].std() < 1.3


def test_original_tasks_keep_their_streams_when_new_tasks_are_added(seq_source):
    original = data.make_source("seqtasks", SEQ_TASKS[:4], seed=1, num_eval_examples=100)
    full, four = seq_source.train_batch(6, 16), original.train_batch(6, 16)
    np.testing.assert_array_equal(full["inputs"][:4], four["inputs"])
    for task in SEQ_TASKS[:4]:
        np.testing.assert_array_equal(full["labels"][task], four["labels"][task])


def test_mean_value_is_standardized(seq_source):
    values = seq_source.train_batch(step=5, batch_size=4096)["labels"]["mean_value"]
    assert abs(values.mean()) < 0.15 and 0.7 < values.std() < 1.3
    short = data.make_source("seqtasks", ["mean_value"], seed=0, length=8).train_batch(0, 4096)
    assert abs(short["labels"]["mean_value"].mean()) < 0.15
    assert 0.7 < short["labels"]["mean_value"].std() < 1.3


def test_seqtasks_train_is_pure_and_tasks_have_own_examples(seq_source):
    batch = seq_source.train_batch(step=9, batch_size=8)
    seq_source.train_batch(step=1, batch_size=8)
    assert_batches_equal(batch, seq_source.train_batch(step=9, batch_size=8))
    assert not np.array_equal(batch["inputs"], seq_source.train_batch(step=10, batch_size=8)["inputs"])
    assert not np.array_equal(batch["inputs"][0], batch["inputs"][1])
    # A task's stream does not depend on which other tasks are requested, nor on their order.
    alone = data.make_source("seqtasks", ["repeat_tag", "majority"], seed=1).train_batch(9, 8)
    np.testing.assert_array_equal(alone["inputs"][0], batch["inputs"][3])
    np.testing.assert_array_equal(alone["inputs"][1], batch["inputs"][0])


def test_seqtasks_eval_is_fixed_and_padded(seq_source):
    batches = list(seq_source.eval_batches(batch_size=32))
    assert len(batches) == 4  # 100 = 3 * 32 + 4
    for batch in batches:
        assert batch["inputs"].shape == (8, 32, 32)
        assert batch["labels"]["last_group_tag"].shape == (32, 32)
        assert batch["labels"]["repeat_tag"].shape == (32, 32)
    for task in SEQ_TASKS:
        assert sum(batch["mask"][task].sum() for batch in batches) == seq_source.num_eval_examples
    np.testing.assert_array_equal(batches[-1]["mask"]["majority"], np.arange(32) < 4)
    other_seed = data.make_source("seqtasks", SEQ_TASKS, seed=12345, num_eval_examples=100)
    for a, b in zip(batches, other_seed.eval_batches(batch_size=32)):
        assert_batches_equal(a, b)
    train_inputs = seq_source.train_batch(step=0, batch_size=32)["inputs"]
    assert not np.array_equal(batches[0]["inputs"], train_inputs)
