"""The two held-out splits of every source (``base.SPLITS``): test is exactly the eval set as it was,
validation is fixed, disjoint from test (and, for finite datasets, never served by the train stream),
independent of the run seed and sliced like every batch; `seed_runs.train_seeds` scores both."""

import numpy as np
import pytest

from configs import default as default_config
from mtt_jax import data, evaluation, seed_runs, train
from mtt_jax.data import base, gradnorm_toy, mixtures, mmoe_synthetic, multidigits, multimnist_tfds, seqtasks
from mtt_jax.data import tfds_io
from mtt_jax.run import config_check

NUM = 40  # held-out examples of the generators: two batches of 32, the second padded
SEQ_TASKS = ("majority", "repeat_tag", "mean_value")
GENERATORS = {
    "seqtasks": (SEQ_TASKS, {"length": 12, "num_eval_examples": NUM}),
    "multidigits": (("left_digit", "right_digit"), {"jitter": 1, "num_eval_pairs": NUM}),
    "mmoe_synthetic": (("mmoe_a1", "mmoe_b2"), {"num_pairs": 2, "num_eval_examples": NUM}),
    "gradnorm_toy": (("toy_0", "toy_1"), {"num_eval_examples": NUM}),
}


def make(name: str, seed: int = 0, **extra):
    tasks, options = GENERATORS[name]
    return data.make_source(name, tasks, seed=seed, **{**options, **extra})


def concat(batches: list, layout: str) -> dict:
    """The batches joined on their example axis (the multi-input layout's axis 1)."""
    axis = 1 if layout == "multi" else 0
    return {"inputs": np.concatenate([b["inputs"] for b in batches], axis=axis),
            "labels": {t: np.concatenate([b["labels"][t] for b in batches]) for t in batches[0]["labels"]},
            "mask": {t: np.concatenate([b["mask"][t] for b in batches]) for t in batches[0]["mask"]}}


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for leaf_x, leaf_y in zip(*(sorted(_leaves(t)) for t in (x, y))):
            assert leaf_x[0] == leaf_y[0]
            np.testing.assert_array_equal(leaf_x[1], leaf_y[1])


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def inputs_per_task(source, split: str) -> dict[str, np.ndarray]:
    """Each task's mask-1 input rows of held-out set ``split``, flattened to one row per example."""
    whole = concat(list(source.eval_batches(32, split=split)), source.layout)
    rows = {}
    for i, task in enumerate(source.task_names):
        keep = whole["mask"][task] > 0
        inputs = whole["inputs"][i] if source.layout == "multi" else whole["inputs"]
        rows[task] = inputs[keep].reshape(int(keep.sum()), -1)
    return rows


# --- The test split is the eval set as it was -------------------------------------------------------

def old_eval_set(source) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(inputs, labels)`` of the eval set as the sources built it before there were two splits."""
    name, n = source.name, source.num_eval_examples
    if name == "seqtasks":
        rng = lambda task: base.eval_rng(2024, source.length, seqtasks.TASK_NAMES.index(task))
        tokens = [seqtasks.sample_sequences(rng(t), n, source.length) for t in source.task_names]
        labels = {t: seqtasks.label_sequences(x)[t] for t, x in zip(source.task_names, tokens)}
        return np.stack(tokens), labels
    if name == "multidigits":
        pairs = multidigits.draw_pairs(base.eval_rng(2019, source.jitter), multidigits.split_indices()[1], n,
                                       source.jitter)
        _, digit = multidigits.digit_images()
        labels = {"left_digit": digit[pairs.left_index], "right_digit": digit[pairs.right_index]}
        return multidigits.compose(pairs), {t: labels[t] for t in source.task_names}
    key = {"mmoe_synthetic": mmoe_synthetic._EVAL_KEY, "gradnorm_toy": gradnorm_toy._EVAL_KEY}[name]
    return source._rows(lambda block: base.eval_rng(key, block), slice(0, n))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_test_split_is_the_old_eval_set(name):
    source = make(name)
    default = list(source.eval_batches(32))
    assert_same_batches(default, list(source.eval_batches(32, split="test")))
    whole = concat(default, source.layout)
    inputs, labels = old_eval_set(source)
    axis = 1 if source.layout == "multi" else 0
    np.testing.assert_array_equal(np.take(whole["inputs"], np.arange(NUM), axis=axis), inputs)
    for task in source.task_names:
        np.testing.assert_array_equal(whole["labels"][task][:NUM], labels[task])
        assert whole["mask"][task].sum() == NUM and np.all(whole["mask"][task][NUM:] == 0)
    assert source.num_eval_examples == source.num_examples() == source.num_examples("test") == NUM


# --- Validation: fixed, disjoint from test, sliced like every batch ----------------------------------

@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_validation_is_fresh_fixed_and_as_large_as_test(name):
    source = make(name)
    assert source.num_examples("validation") == NUM
    validation, test = inputs_per_task(source, "validation"), inputs_per_task(source, "test")
    for task in source.task_names:
        assert len(validation[task]) == NUM
        shared = {row.tobytes() for row in validation[task]} & {row.tobytes() for row in test[task]}
        assert not shared, f"{task}: {len(shared)} validation inputs are test inputs"
    # Not the run seed's: another seed's source serves the same validation set.
    assert_same_batches(list(source.eval_batches(32, split="validation")),
                        list(make(name, seed=7).eval_batches(32, split="validation")))
    # Nor the train stream's first batch.
    train = source.train_batch(0, NUM)
    train_rows = train["inputs"][0] if source.layout == "multi" else train["inputs"]
    first = source.task_names[0]
    train_inputs = {r.tobytes() for r in train_rows.reshape(NUM, -1)}
    assert not train_inputs & {r.tobytes() for r in validation[first]}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_validation_size_option(name):
    option = "num_validation_pairs" if name == "multidigits" else "num_validation_examples"
    source = make(name, **{option: 9})
    assert source.num_examples("validation") == 9 and source.num_eval_examples == NUM
    batches = list(source.eval_batches(4, split="validation"))
    assert len(batches) == 3 and sum(b["mask"][source.task_names[0]].sum() for b in batches) == 9
    with pytest.raises(ValueError) as error:
        make(name, **{option: -1})
    assert option in str(error.value) and "\n" not in str(error.value)


def test_multidigits_validation_never_repeats_a_test_pair_of_images():
    source = make("multidigits", jitter=0, num_eval_pairs=2000)  # ~30 of 2000 random pairs would
    pairs, _ = source.held_out("validation")                       # repeat a test pair's two images
    test_pairs = set(zip(source.eval_pairs.left_index.tolist(), source.eval_pairs.right_index.tolist()))
    assert not test_pairs & set(zip(pairs.left_index.tolist(), pairs.right_index.tolist()))
    assert set(pairs.left_index) | set(pairs.right_index) <= set(source.eval_image_indices)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_sharded_validation_batches_are_slices_of_the_global_ones(name):
    source = make(name)
    whole = list(source.eval_batches(32, split="validation"))
    for count in (2, 4):
        for index in range(count):
            part = list(source.eval_batches(32, shard=(index, count), split="validation"))
            rows = base.shard_rows(32, (index, count))
            assert_same_batches(part, [base.slice_batch(b, rows, source.layout) for b in whole])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_an_unknown_split_fails_in_one_line(name):
    source = make(name)
    for call in (lambda: list(source.eval_batches(8, split="dev")), lambda: source.num_examples("dev")):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert "'dev'" in message and "validation, test" in message and "\n" not in message


def test_a_flat_mixture_passes_the_split_to_its_source():
    source = make("seqtasks")
    mixture = mixtures.FlatMixture(source, [1.0, 1.0, 1.0])
    for split in base.SPLITS:
        assert mixture.num_examples(split) == source.num_examples(split)
        assert_same_batches(list(mixture.eval_batches(16, shard=(1, 2), split=split)),
                            list(source.eval_batches(16, shard=(1, 2), split=split)))
    assert mixture.num_eval_examples == NUM
    with pytest.raises(ValueError, match="validation, test"):
        mixture.num_examples("train")


# --- TFDS sources on mock data: validation held out of train (or CelebA's own) ----------------------

NUM_MOCK = 12


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tfds_source(name: str, data_dir: str, seed: int = 0, **options):
    tasks = {"glue": ("cola", "stsb", "rte"), "multimnist": ("mnist_left", "mnist_right"),
             "celeba": data.AVAILABLE_TASKS["celeba"][:3]}[name]
    sizes = {"glue": {"max_length": 24}, "celeba": {"image_size": 8}}.get(name, {})
    with tfds_io.mock_data(NUM_MOCK):
        return data.make_source(name, tasks, seed=seed, data_dir=data_dir, **sizes, **options)


def served_train_indices(source, task: str | None = None) -> set[int]:
    """The train-split indices of two passes' worth of train batches."""
    steps = range(2 * NUM_MOCK // 2)
    if source.name == "glue":
        return {int(i) for step in steps for i in source.train_indices(task, step, 2)}
    return {int(i) for step in steps for i in source.train_indices(step, 2)}


def test_glue_test_is_the_labelled_validation_split_and_validation_is_carved_from_train(mock_dir):
    source = tfds_source("glue", mock_dir)
    assert_same_batches(list(source.eval_batches(8)), list(source.eval_batches(8, split="test")))
    mean, std = source.label_moments["stsb"]
    for task in source.task_names:
        tokens, labels = source._load(task, "validation")   # the eval set as it was: GLUE's validation
        if task == "stsb":
            labels = (labels - mean) / std
        np.testing.assert_array_equal(source.eval[task][0], tokens)
        np.testing.assert_allclose(source.eval[task][1], labels, rtol=1e-6)
        held, kept = source.validation_indices[task], source.train_pool[task]
        assert len(held) == NUM_MOCK // 2  # as many as test (12), at most half of the 12 train examples
        assert sorted(np.concatenate([held, kept])) == list(range(NUM_MOCK))
        assert not set(held.tolist()) & served_train_indices(source, task)
        np.testing.assert_array_equal(source.validation[task][0], source.train[task][0][held])
    assert source.num_examples("validation") == NUM_MOCK // 2 and source.num_eval_examples == NUM_MOCK
    flat = source.flat_batch(step=0, batch_size=36, rates=[1.0, 1.0, 1.0])
    for t, task in enumerate(source.task_names):
        tokens = source.train[task][0].astype(np.int32)
        held_rows = {tokens[i].tobytes() for i in source.validation_indices[task]}
        kept_rows = {tokens[i].tobytes() for i in source.train_pool[task]}
        rows = {r.tobytes() for r in flat["inputs"][flat["task_id"] == t]}
        assert rows and rows <= kept_rows - held_rows


def test_glue_validation_is_fixed_sliced_and_sized_by_its_option(mock_dir):
    source = tfds_source("glue", mock_dir)
    other_seed = tfds_source("glue", mock_dir, seed=5)
    whole = list(source.eval_batches(4, split="validation"))
    assert_same_batches(whole, list(other_seed.eval_batches(4, split="validation")))
    part = list(source.eval_batches(4, shard=(1, 2), split="validation"))
    assert_same_batches(part, [base.slice_batch(b, base.shard_rows(4, (1, 2)), "multi") for b in whole])
    small = tfds_source("glue", mock_dir, num_validation_examples=2, max_eval_examples=5)
    assert small.split_sizes("validation") == {"cola": 2, "stsb": 2, "rte": 2}
    assert small.eval_sizes == {"cola": 5, "stsb": 5, "rte": 5}
    # A smaller validation set is a prefix of a larger one.
    np.testing.assert_array_equal(small.validation_indices["rte"], source.validation_indices["rte"][:2])
    with pytest.raises(ValueError) as error:
        tfds_source("glue", mock_dir, num_validation_examples=-3)
    assert "num_validation_examples" in str(error.value) and "\n" not in str(error.value)


def test_multimnist_test_is_mnist_test_and_validation_is_carved_from_train(mock_dir):
    source = tfds_source("multimnist", mock_dir)
    test = list(source.eval_batches(8))
    assert_same_batches(test, list(source.eval_batches(8, split="test")))
    index = np.minimum(np.arange(16), NUM_MOCK - 1)
    old = source._batch(source.eval_images, source.eval_labels,
                        multimnist_tfds.partners(NUM_MOCK, "test"), index, (np.arange(16) < NUM_MOCK) * 1.0)
    assert_same_batches(test, [base.slice_batch(old, slice(0, 8), "single"),
                               base.slice_batch(old, slice(8, 16), "single")])
    held, kept = source.validation_indices, source.train_pool
    assert len(held) == NUM_MOCK // 2 and sorted(np.concatenate([held, kept])) == list(range(NUM_MOCK))
    served = served_train_indices(source)
    assert not set(held.tolist()) & served
    # Partners stay within their set: no train pair shows a validation image, and the reverse.
    assert not set(source.train_partners[sorted(served)].tolist()) & set(held.tolist())
    assert set(source.train_partners[held].tolist()) <= set(held.tolist())
    validation = list(source.eval_batches(4, split="validation"))
    assert sum(b["mask"]["mnist_left"].sum() for b in validation) == NUM_MOCK // 2
    assert_same_batches(validation, list(tfds_source("multimnist", mock_dir, seed=9).eval_batches(
        4, split="validation")))
    part = list(source.eval_batches(4, shard=(0, 2), split="validation"))
    assert_same_batches(part, [base.slice_batch(b, base.shard_rows(4, (0, 2)), "single") for b in validation])
    with pytest.raises(ValueError, match="validation, test"):
        list(source.eval_batches(4, split="train"))


def test_celeba_validation_is_carved_when_its_validation_split_is_test(mock_dir):
    source = tfds_source("celeba", mock_dir)  # eval_split="validation": test is CelebA's validation split
    images, attributes = source._load("validation")
    test = concat(list(source.eval_batches(8)), "single")
    np.testing.assert_array_equal(test["inputs"][:NUM_MOCK], images.astype(np.float32) / 255.0)
    held = source.validation_indices
    assert len(held) == NUM_MOCK // 2 and not set(held.tolist()) & served_train_indices(source)
    validation = concat(list(source.eval_batches(8, split="validation")), "single")
    train_images = source.train_images[held].astype(np.float32)
    np.testing.assert_array_equal(validation["inputs"][:len(held)], train_images / 255.0)
    assert_same_batches(list(source.eval_batches(4, split="validation")),
                        list(tfds_source("celeba", mock_dir, seed=4).eval_batches(4, split="validation")))


def test_celeba_validation_is_its_own_split_when_test_is_test(mock_dir):
    source = tfds_source("celeba", mock_dir, eval_split="test")
    test_images, _ = source._load("test")
    validation_images, _ = source._load("validation")
    test = concat(list(source.eval_batches(8)), "single")
    np.testing.assert_array_equal(test["inputs"][:NUM_MOCK], test_images.astype(np.float32) / 255.0)
    validation = concat(list(source.eval_batches(8, split="validation")), "single")
    np.testing.assert_array_equal(validation["inputs"][:NUM_MOCK],
                                  validation_images.astype(np.float32) / 255.0)
    assert source.num_examples("validation") == NUM_MOCK
    assert served_train_indices(source) == set(range(NUM_MOCK))  # nothing held out of train
    capped = tfds_source("celeba", mock_dir, eval_split="test", num_validation_examples=5)
    assert capped.num_examples("validation") == 5 and capped.num_eval_examples == NUM_MOCK


# --- Scoring: evaluation, train_seeds, the config ------------------------------------------------------

def tiny_config():
    config = default_config.get_config("tiny")
    config.total_steps, config.eval_every, config.log_every = 2, 2, 1
    config.data.options.num_eval_pairs = 24
    config.eval_batch_size = 16
    config.weighting.diagnostics_every = 0
    return config


def test_score_eval_set_refuses_an_unknown_split_before_any_batch():
    source = make("gradnorm_toy")
    with pytest.raises(ValueError, match="valid choices: validation, test"):
        evaluation.score_eval_set(lambda batch: 1 / 0, source, [], 8, "single", runs=[0], split="val")


def test_train_seeds_scores_both_splits_and_test_is_the_default_calls():
    config = tiny_config()
    default = seed_runs.train_seeds(config, [0, 1])
    both = seed_runs.train_seeds(config, [0, 1], splits=("validation", "test"))
    assert sorted(both.by_split) == ["test", "validation"] and sorted(both.by_split["test"]) == [2]
    assert both.final == default.final == default.by_split["test"][2] == both.by_split["test"][2]
    assert both.evals == default.evals and both.split == default.split == "test"
    key = "left_digit/accuracy"
    np.testing.assert_array_equal(both.metric(key), default.metric(key))
    np.testing.assert_array_equal(both.metric(key, split="test"), default.metric(key))
    validation = both.metric("left_digit/loss", split="validation")
    assert validation.shape == (2,) and not np.array_equal(validation, both.metric("left_digit/loss"))
    np.testing.assert_array_equal(both.metric(key, 2, split="validation"),
                                  both.metric(key, split="validation"))
    with pytest.raises(ValueError, match="'validation' was not scored"):
        default.metric(key, split="validation")
    # Each run's own eval source supplies its splits; validation alone is then final and evals.
    other = data.make_source("multidigits", config.tasks, seed=0, num_eval_pairs=24, jitter=1)
    mine = data.make_source("multidigits", config.tasks, seed=0, num_eval_pairs=24)
    alone = seed_runs.train_seeds(config, [0, 1], splits=("validation",), eval_sources=[mine, other])
    assert alone.split == "validation" and list(alone.by_split) == ["validation"]
    assert alone.final[0] == both.by_split["validation"][2][0] and alone.final[1] != both.final[1]


@pytest.mark.parametrize("splits", [(), ("test", "test"), ("dev",), "dev"])
def test_train_seeds_refuses_bad_splits_in_one_line_before_any_work(splits):
    with pytest.raises(ValueError) as error:
        seed_runs.train_seeds(None, [0], splits=splits)  # no config: fails before reading it
    assert "validation, test" in str(error.value) and "\n" not in str(error.value)


def test_config_eval_split_is_checked():
    config = default_config.get_config("tiny")
    assert config.data.eval_split == "test"
    config_check.validate(config, num_devices=8)
    config.data.eval_split = "validation"
    config_check.validate(config, num_devices=8)
    config.data.eval_split = "dev"
    with pytest.raises(config_check.ConfigError) as error:
        config_check.validate(config, num_devices=8)
    assert str(error.value) == "data.eval_split='dev' is not valid; choose one of: validation, test"


def test_a_training_run_scores_the_configs_eval_split(tmp_path, monkeypatch):
    config = tiny_config()
    config.total_steps, config.checkpoint_every = 2, 2
    config.data.eval_split = "validation"
    scored = []
    real_run_eval = train.run_eval

    def spy(*args, **kwargs):
        scored.append(kwargs.get("split"))
        return real_run_eval(*args, **kwargs)
    monkeypatch.setattr(train, "run_eval", spy)
    _, final = train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert scored == ["validation"] and "left_digit/accuracy" in final
