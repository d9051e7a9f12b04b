"""Every source: the global batch of a step is a pure function of (seed, step), and the slices of any
number of processes, joined, are exactly that batch (train and eval)."""

import numpy as np
import pytest

from mtt_jax import data
from mtt_jax.data import base, tfds_io


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


SOURCES = {
    "multidigits": lambda d: data.make_source("multidigits", ("left_digit", "right_digit"), seed=3, jitter=1,
                                              num_eval_pairs=37),
    "seqtasks": lambda d: data.make_source("seqtasks", data.AVAILABLE_TASKS["seqtasks"], seed=3,
                                           num_eval_examples=37),
    "mmoe_synthetic": lambda d: data.make_source("mmoe_synthetic", ("mmoe_a1", "mmoe_a2", "mmoe_b2"), seed=3,
                                                 num_pairs=2, correlation=(0.9, 0.2), num_eval_examples=37),
    "gradnorm_toy": lambda d: data.make_source("gradnorm_toy", ("toy_0", "toy_1"), seed=3,
                                               num_eval_examples=37),
    "glue": lambda d: data.make_source("glue", data.AVAILABLE_TASKS["glue"], seed=3, data_dir=d,
                                       max_length=24),
    "multimnist": lambda d: data.make_source("multimnist", ("mnist_left", "mnist_right"), seed=3, data_dir=d),
    "celeba": lambda d: data.make_source("celeba", data.AVAILABLE_TASKS["celeba"][:5], seed=3, data_dir=d,
                                         image_size=8),
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, mock_dir):
    with tfds_io.mock_data(num_examples=24):
        return SOURCES[request.param](mock_dir)


def join(parts: list, layout: str) -> dict:
    axis = 1 if layout == "multi" else 0
    return {"inputs": np.concatenate([p["inputs"] for p in parts], axis=axis),
            "labels": {t: np.concatenate([p["labels"][t] for p in parts]) for t in parts[0]["labels"]},
            "mask": {t: np.concatenate([p["mask"][t] for p in parts]) for t in parts[0]["mask"]}}


def assert_batches_equal(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert a["labels"].keys() == b["labels"].keys() == a["mask"].keys() == b["mask"].keys()
    for task in a["labels"]:
        np.testing.assert_array_equal(a["labels"][task], b["labels"][task])
        np.testing.assert_array_equal(a["mask"][task], b["mask"][task])


@pytest.mark.parametrize("batch_size, count", [(16, 2), (10, 3), (7, 7)])
def test_process_slices_join_to_the_global_train_batch(source, batch_size, count):
    for step in (0, 5):
        whole = source.train_batch(step, batch_size)
        assert_batches_equal(whole, source.train_batch(step, batch_size, shard=(0, 1)))
        parts = [source.train_batch(step, batch_size, shard=(i, count)) for i in range(count)]
        for i, part in enumerate(parts):
            rows = base.shard_rows(batch_size, (i, count))
            assert_batches_equal(part, base.slice_batch(whole, rows, source.layout))
        assert_batches_equal(join(parts, source.layout), whole)


def test_global_batch_is_a_pure_function_of_seed_and_step(source):
    first = source.train_batch(7, 12)
    source.train_batch(2, 12, shard=(1, 2))
    assert_batches_equal(first, source.train_batch(7, 12))
    assert not np.array_equal(first["inputs"], source.train_batch(8, 12)["inputs"])


def test_eval_slices_join_to_the_global_eval_batches(source):
    whole = list(source.eval_batches(16))
    parts = [list(source.eval_batches(16, shard=(i, 2))) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for batch, first, second in zip(whole, *parts):
        assert_batches_equal(join([first, second], source.layout), batch)


def test_bad_shards_raise_one_line():
    source = data.make_source("gradnorm_toy", ("toy_0",), seed=0, num_eval_examples=4)
    for shard in ((2, 2), (-1, 2), (0, 0), (0,), (0.5, 2)):
        with pytest.raises(ValueError, match="shard") as error:
            source.train_batch(0, 8, shard=shard)
        assert "\n" not in str(error.value)


def test_block_rows_of_any_slice_match_the_whole_table():
    draw = lambda rng, n: (rng.standard_normal((n, 3)), rng.integers(0, 9, n))
    rng_for_block = lambda block: np.random.default_rng([11, block])
    whole = base.block_rows(rng_for_block, slice(0, 100), draw, block=8)
    for rows in (slice(0, 1), slice(5, 37), slice(64, 100), slice(17, 17)):
        for got, expected in zip(base.block_rows(rng_for_block, rows, draw, block=8), whole):
            np.testing.assert_array_equal(got, expected[rows])
