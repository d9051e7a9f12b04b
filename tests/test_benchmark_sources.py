"""The offline benchmarks with known answers: multidigits' heavy overlap, retrieval and multiview.

Every source: shapes, dtypes and label ranges, train batches pure in (seed, step), shards equal slices,
validation disjoint from test and independent of the seed, one-line errors. Then each source's own
claims, measured on samples: the overlap geometry, the retrieval label against a brute-force recount,
and multiview's cross-task evidence (there when rows are aligned, gone when shuffled) and its exact
Bayes accuracies against Monte Carlo.
"""

import hashlib
import importlib

import numpy as np
import pytest

from mtt_jax import data, tasks as tasks_lib
from mtt_jax.data import base, multidigits, multiview, retrieval
from mtt_jax.run import config_check
from tests.test_splits import assert_same_batches, concat, inputs_per_task

NUM = 40  # held-out examples: two batches of 32, the second padded
DIGITS = ("left_digit", "right_digit")
VIEWS = multiview.TASK_NAMES
SOURCES = {
    "multidigits_heavy": ("multidigits", DIGITS, {"overlap": "heavy", "jitter": 1, "num_eval_pairs": NUM}),
    "retrieval": ("retrieval", ("retrieve_0", "retrieve_2", "retrieve_3"), {"num_eval_examples": NUM}),
    "multiview": ("multiview", VIEWS, {"num_eval_examples": NUM}),
    "multiview_shuffled": ("multiview", VIEWS, {"num_eval_examples": NUM, "shuffle_rows": True}),
}


def make(key: str, seed: int = 0, **extra):
    name, tasks, options = SOURCES[key]
    return data.make_source(name, tasks, seed=seed, **{**options, **extra})


def rows_of(batch: dict, layout: str, task_index: int = 0) -> np.ndarray:
    """One flattened input row per example (of task ``task_index`` in the multi-input layout)."""
    inputs = batch["inputs"][task_index] if layout == "multi" else batch["inputs"]
    return inputs.reshape(len(inputs), -1)


# --- The contract, for every source -----------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(SOURCES))
def test_shapes_dtypes_and_label_ranges(key):
    source = make(key)
    spec = source.input_spec
    for batch in (source.train_batch(3, 40), next(source.eval_batches(32, split="validation"))):
        rows = len(batch["mask"][source.task_names[0]])
        if source.layout == "multi":
            assert batch["inputs"].shape == (len(source.task_names), rows) + spec.shape
        else:
            assert batch["inputs"].shape == (rows,) + spec.shape
        if spec.kind == "tokens":
            assert batch["inputs"].dtype == np.int32
            assert 1 <= batch["inputs"].min() and batch["inputs"].max() < spec.vocab_size  # no padding
        else:
            assert batch["inputs"].dtype == np.float32
        assert list(batch["labels"]) == list(source.task_names) == list(batch["mask"])
        for task, labels in batch["labels"].items():
            assert labels.shape == (rows,) and np.issubdtype(labels.dtype, np.integer)
            assert 0 <= labels.min() and labels.max() < tasks_lib.get(task).num_classes
            assert tasks_lib.get(task).source == source.name
            assert batch["mask"][task].dtype == np.float32


@pytest.mark.parametrize("key", sorted(SOURCES))
def test_train_batches_are_pure_in_seed_and_step(key):
    source = make(key)
    assert_same_batches([source.train_batch(5, 40)], [make(key).train_batch(5, 40)])
    assert_same_batches([source.train_batch(5, 40)], [source.train_batch(5, 40)])  # no iterator state
    first = rows_of(source.train_batch(5, 40), source.layout)
    assert not np.array_equal(first, rows_of(source.train_batch(6, 40), source.layout))
    assert not np.array_equal(first, rows_of(make(key, seed=1).train_batch(5, 40), source.layout))
    if source.name == "multidigits":  # draws the global batch's pairs at once: rows depend on its size
        return
    # Row i does not depend on the batch size (rows come in seeded blocks).
    assert_same_batches([base.slice_batch(source.train_batch(5, 40), slice(0, 8), source.layout)],
                        [source.train_batch(5, 8)])


@pytest.mark.parametrize("key", sorted(SOURCES))
def test_shards_are_slices_of_the_global_batch(key):
    source = make(key)
    whole_train = source.train_batch(2, 72)  # crosses two block boundaries
    whole_eval = list(source.eval_batches(32, split="test"))
    for count in (2, 3):
        for index in range(count):
            assert_same_batches([source.train_batch(2, 72, shard=(index, count))],
                                [base.slice_batch(whole_train, base.shard_rows(72, (index, count)),
                                                  source.layout)])
            part = list(source.eval_batches(32, shard=(index, count), split="test"))
            rows = base.shard_rows(32, (index, count))
            assert_same_batches(part, [base.slice_batch(b, rows, source.layout) for b in whole_eval])


@pytest.mark.parametrize("key", sorted(SOURCES))
def test_validation_is_disjoint_from_test_fixed_and_sized(key):
    source = make(key)
    assert source.num_examples("validation") == source.num_examples("test") == NUM
    validation, test = inputs_per_task(source, "validation"), inputs_per_task(source, "test")
    for task in source.task_names:
        assert len(validation[task]) == len(test[task]) == NUM
        shared = {row.tobytes() for row in validation[task]} & {row.tobytes() for row in test[task]}
        assert not shared, f"{task}: {len(shared)} validation inputs are test inputs"
    train_rows = {row.tobytes() for row in rows_of(source.train_batch(0, NUM), source.layout)}
    assert not train_rows & {row.tobytes() for row in validation[source.task_names[0]]}
    for split in base.SPLITS:  # not the run seed's
        assert_same_batches(list(source.eval_batches(32, split=split)),
                            list(make(key, seed=7).eval_batches(32, split=split)))
    whole = concat(list(source.eval_batches(32, split="validation")), source.layout)
    assert all(whole["mask"][t].sum() == NUM and np.all(whole["mask"][t][NUM:] == 0)
               for t in source.task_names)
    option = "num_validation_pairs" if source.name == "multidigits" else "num_validation_examples"
    small = make(key, **{option: 9})
    assert small.num_examples("validation") == 9 and small.num_examples() == NUM


BAD_OPTIONS = [
    ("multidigits", DIGITS, {"overlap": "total"}, "overlap"),
    ("retrieval", ("retrieve_0",), {"num_tasks": 9}, "num_tasks"),
    ("retrieval", ("retrieve_0",), {"num_groups": 17}, "num_groups"),
    ("retrieval", ("retrieve_0",), {"num_groups": 0}, "num_groups"),
    ("retrieval", ("retrieve_0",), {"num_values": 17}, "num_values"),
    ("retrieval", ("retrieve_0",), {"num_values": 1}, "num_values"),
    ("retrieval", ("retrieve_0",), {"length": 30}, "length"),
    ("retrieval", ("retrieve_4",), {}, "retrieve_4"),
    ("retrieval", ("retrieve_0",), {"num_eval_examples": 0}, "num_eval_examples"),
    ("multiview", VIEWS, {"reveal": (0.1, 0.1, 0.1)}, "reveal"),
    ("multiview", VIEWS, {"reveal": (0.1, 0.1, 1.0, 0.0)}, "reveal"),
    ("multiview", VIEWS, {"reveal": (0.1, -0.1, 0.1, 0.0)}, "reveal"),
    ("multiview", VIEWS, {"shuffle_rows": "yes"}, "shuffle_rows"),
    ("multiview", VIEWS, {"view_length": 0}, "view_length"),
    ("multiview", VIEWS, {"num_validation_examples": -1}, "num_validation_examples"),
    ("multiview", ("view_class", "view_other"), {}, "view_other"),
    ("multiview", VIEWS, {"mode": "aligned"}, "mode"),
]


@pytest.mark.parametrize("name, tasks, options, named", BAD_OPTIONS)
def test_bad_options_fail_in_one_line(name, tasks, options, named):
    with pytest.raises(ValueError) as error:
        data.make_source(name, tasks, seed=0, **options)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("family, variants", [("multidigits_heavy", ("", "tiny")),
                                              ("retrieval", ("", "narrow", "tiny")),
                                              ("multiview", ("", "shuffled", "tiny"))])
def test_configs_validate_and_build_their_source(family, variants):
    module = importlib.import_module(f"configs.{family}")
    for variant in variants:
        config = module.get_config(variant)
        config_check.validate(config, num_devices=1)
        source = data.make_source(config.data.source, config.tasks, seed=0, **dict(config.data.options))
        assert source.task_names == tuple(config.tasks)
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


# --- multidigits, overlap="heavy" -------------------------------------------------------------------

def digest(source) -> str:
    """sha256 of train batches (whole and a shard) and both held-out sets."""
    h = hashlib.sha256()

    def add(batch):
        h.update(np.ascontiguousarray(batch["inputs"]).tobytes())
        for task in sorted(batch["labels"]):
            h.update(np.ascontiguousarray(batch["labels"][task]).tobytes())
            h.update(batch["mask"][task].tobytes())
    for step in (0, 5):
        add(source.train_batch(step, 48))
        add(source.train_batch(step, 48, shard=(1, 3)))
    for split in ("test", "validation"):
        for batch in source.eval_batches(32, split=split):
            add(batch)
    return h.hexdigest()


@pytest.mark.parametrize("jitter, expected", [
    (0, "43d1600d521e51f4eff1859ec3f58c616b7aa930e60981ed267552e7c12b3876"),
    (1, "8e49a3c1723c47238e28bc661d803938f26d8f9304d901d4887468186e0ca11c")])
def test_default_multidigits_is_byte_identical_to_the_code_before_the_overlap_option(jitter, expected):
    """The digests were computed by the committed code before ``overlap`` existed (3139b22)."""
    for options in ({}, {"overlap": "standard"}):
        source = data.make_source("multidigits", DIGITS, seed=3, jitter=jitter, num_eval_pairs=50, **options)
        assert digest(source) == expected


def ink_fractions(pairs: multidigits.Pairs) -> dict[str, float]:
    """Measured overlap, averaged over pairs and both digits: the share of a digit's square inside the
    other's, of its ink (pixel mass) inside the other's square, and of its inked pixels the other inks."""
    images, _ = multidigits.digit_images()
    num_pairs, size = len(pairs.left_index), multidigits.CANVAS_SIZE
    example, span = np.arange(num_pairs)[:, None, None], np.arange(8)
    layers, squares = [], []
    for index, corner in ((pairs.left_index, pairs.left_corner), (pairs.right_index, pairs.right_corner)):
        rows = (corner[:, 0, None] + span)[:, :, None]
        cols = (corner[:, 1, None] + span)[:, None, :]
        layer, square = np.zeros((num_pairs, size, size)), np.zeros((num_pairs, size, size), bool)
        layer[example, rows, cols], square[example, rows, cols] = images[index], True
        layers.append(layer)
        squares.append(square)
    area, mass, inked = [], [], []
    for mine, other in ((0, 1), (1, 0)):
        area.append((squares[mine] & squares[other]).sum(axis=(1, 2)) / 64)
        mass.append((layers[mine] * squares[other]).sum(axis=(1, 2)) / layers[mine].sum(axis=(1, 2)))
        both = (layers[mine] > 0) & (layers[other] > 0)
        inked.append(both.sum(axis=(1, 2)) / (layers[mine] > 0).sum(axis=(1, 2)))
    return {"area": float(np.mean(area)), "mass": float(np.mean(mass)), "inked": float(np.mean(inked))}


def test_heavy_overlap_covers_about_half_of_each_digit_and_adds_light_noise():
    standard = data.make_source("multidigits", DIGITS, seed=0)
    heavy = data.make_source("multidigits", DIGITS, seed=0, overlap="heavy")
    measured = {name: ink_fractions(source.train_pairs(0, 4000))
                for name, source in (("standard", standard), ("heavy", heavy))}
    print(measured)
    assert measured["standard"]["area"] == pytest.approx(16 / 64)
    assert measured["heavy"]["area"] == pytest.approx(36 / 64)
    assert measured["standard"]["mass"] == pytest.approx(0.26, abs=0.02)
    assert measured["heavy"]["mass"] == pytest.approx(0.70, abs=0.02)
    assert measured["standard"]["inked"] == pytest.approx(0.09, abs=0.02)
    assert measured["heavy"]["inked"] == pytest.approx(0.38, abs=0.02)
    # The same image pairs, now rendered closer and with N(0, 0.1^2) pixel noise on top.
    pairs = heavy.train_pairs(0, 2000)
    np.testing.assert_array_equal(pairs.left_index, standard.train_pairs(0, 2000).left_index)
    residual = heavy.train_batch(0, 2000)["inputs"] - multidigits.compose(pairs)
    assert abs(residual.mean()) < 0.002 and residual.std() == pytest.approx(0.1, rel=0.01)
    assert abs(np.corrcoef(residual[:, 0, 0], residual[:, 5, 7])[0, 1]) < 0.1
    np.testing.assert_array_equal(standard.train_batch(0, 64)["inputs"],
                                  multidigits.compose(standard.train_pairs(0, 64)))
    # The two labels stay independent: one predicts the other at chance (10 classes).
    labels = heavy.train_batch(1, 4000)["labels"]
    assert np.mean(labels["left_digit"] == labels["right_digit"]) == pytest.approx(0.1, abs=0.02)


# --- retrieval --------------------------------------------------------------------------------------

def test_retrieval_labels_equal_a_brute_force_recount_and_every_group_is_present():
    source = data.make_source("retrieval", ("retrieve_0", "retrieve_5"), seed=2, num_tasks=6,
                              num_groups=6, num_values=5, length=18)
    batch = source.train_batch(4, 64)
    assert source.input_spec == data.InputSpec(kind="tokens", shape=(18,), vocab_size=31)
    for row in range(64):
        tokens = batch["inputs"][row].tolist()
        found = {group: [] for group in range(6)}
        for token in tokens:
            found[(token - 1) // 5].append((token - 1) % 5)
        assert all(len(values) == 3 for values in found.values())  # every group, 18 / 6 times
        assert batch["labels"]["retrieve_0"][row] == max(found[0])
        assert batch["labels"]["retrieve_5"][row] == max(found[5])


def test_retrieval_label_distribution_and_trivial_accuracy_are_exact():
    source = data.make_source("retrieval", ("retrieve_0", "retrieve_1"), seed=0)  # defaults: V 16, n 4
    accuracies = source.reference_accuracies()
    assert accuracies["retrieve_0"] == {"bayes": 1.0, "trivial": pytest.approx(1 - (15 / 16) ** 4)}
    exact = retrieval.label_distribution(16, 4)
    assert exact.sum() == pytest.approx(1.0) and exact.argmax() == 15
    labels = source.train_batch(0, 20_000)["labels"]
    for task in source.task_names:
        frequency = np.bincount(labels[task], minlength=16) / 20_000
        standard_error = np.sqrt(exact * (1 - exact) / 20_000)
        assert np.all(np.abs(frequency - exact) < 4 * standard_error + 1e-12)
    # Group 0 and group 1 are drawn independently: the two labels agree as often as independence says.
    agree = np.mean(labels["retrieve_0"] == labels["retrieve_1"])
    assert agree == pytest.approx((exact ** 2).sum(), abs=4 * np.sqrt(0.12 / 20_000))


# --- multiview --------------------------------------------------------------------------------------

def count_features(tokens_NxL: np.ndarray) -> np.ndarray:
    """``[N, K]``: how often each content token occurs in a view."""
    return (tokens_NxL[..., None] == 1 + np.arange(multiview.NUM_CLASSES)).sum(axis=1)


def count_classifier_accuracy(fit_views: list, fit_labels, test_views: list, test_labels,
                              num_classes: int) -> float:
    """A naive-Bayes classifier on token counts, fitted on one sample and scored on another: per label,
    the frequency of each token in each view (add-one smoothing). Knows nothing of the generator."""
    log_prior = np.log(np.bincount(fit_labels, minlength=num_classes) + 1.0)
    scores = np.tile(log_prior, (len(test_labels), 1))
    for fit, test in zip(fit_views, test_views):
        counts_NxK, test_counts = count_features(fit), count_features(test)
        per_label = np.stack([counts_NxK[fit_labels == y].sum(axis=0) + 1.0 for y in range(num_classes)])
        log_frequency = np.log(per_label / per_label.sum(axis=1, keepdims=True))
        scores += test_counts @ log_frequency.T
    return float(np.mean(scores.argmax(axis=1) == test_labels))


def views_and_labels(source, step: int, rows: int):
    batch = source.train_batch(step, rows)
    return {task: batch["inputs"][i] for i, task in enumerate(source.task_names)}, batch["labels"]


def test_multiview_blind_task_learns_only_through_aligned_rows():
    rows = 16_384  # standard error of an accuracy near 0.25: 0.0034
    chance = 0.25
    tolerance = 4 * np.sqrt(chance * (1 - chance) / rows)
    others = ("view_class", "view_parity", "view_high")
    exact = multiview.reference_accuracies()
    for shuffle_rows in (False, True):
        source = data.make_source("multiview", VIEWS, seed=0, shuffle_rows=shuffle_rows)
        assert source.aligned_rows is (not shuffle_rows)
        fit_views, fit_labels = views_and_labels(source, 0, rows)
        test_views, test_labels = views_and_labels(source, 1, rows)
        score = lambda task, views: count_classifier_accuracy(
            [fit_views[v] for v in views], fit_labels[task], [test_views[v] for v in views],
            test_labels[task], multiview.TASK_CLASSES[task])
        own = score("view_blind", ("view_blind",))
        across = score("view_blind", others)
        class_own = score("view_class", ("view_class",))
        print(f"shuffle_rows={shuffle_rows}: blind own {own:.4f}, blind from the others {across:.4f}, "
              f"view_class own {class_own:.4f}")
        assert abs(own - chance) < tolerance                       # its own view is noise either way
        assert class_own == pytest.approx(exact["view_class"]["own"], abs=0.02)  # own data unchanged
        if shuffle_rows:
            assert abs(across - chance) < tolerance                # the other rows are other instances
        else:
            assert across == pytest.approx(exact["view_blind"]["all"], abs=0.02)


def test_shuffled_rows_are_the_aligned_rows_moved_and_never_shared():
    aligned = data.make_source("multiview", VIEWS, seed=3)
    shuffled = data.make_source("multiview", VIEWS, seed=3, shuffle_rows=True)
    a, s = aligned.train_batch(2, 64), shuffled.train_batch(2, 64)  # two whole blocks
    for t, task in enumerate(VIEWS):
        for block in (slice(0, 32), slice(32, 64)):  # per block, the same examples in another order
            key = lambda batch: sorted(zip(batch["inputs"][t][block].tolist(),
                                           batch["labels"][task][block].tolist()))
            assert key(a) == key(s)
    np.testing.assert_array_equal(s["inputs"][0], a["inputs"][0])  # view_class: 0 steps along the cycle
    for t in range(1, len(VIEWS)):  # every other task's row b shows another row's instance
        aligned_row = {tuple(row): i for i, row in enumerate(a["inputs"][t].tolist())}
        assert len(aligned_row) == 64
        moved_to = np.array([aligned_row[tuple(row)] for row in s["inputs"][t].tolist()])
        assert np.all(moved_to != np.arange(64))
        assert np.all(moved_to // 32 == np.arange(64) // 32)  # within its block


def test_multiview_posterior_is_the_product_of_per_token_likelihoods():
    reveal = (0.3, 0.1, 0.2, 0.0)
    source = data.make_source("multiview", VIEWS, seed=1, reveal=reveal, view_length=5)
    tokens = source.train_batch(0, 6)["inputs"]
    computed = multiview.posterior(tokens, reveal)
    for row in range(6):
        likelihood = np.ones(multiview.NUM_CLASSES)
        for view, q in enumerate(reveal):
            for token in tokens[view, row]:
                likelihood *= [q * (token - 1 == c) + (1 - q) / multiview.NUM_CLASSES
                               for c in range(multiview.NUM_CLASSES)]
        np.testing.assert_allclose(computed[row], likelihood / likelihood.sum(), rtol=1e-10)


@pytest.mark.parametrize("reveal, view_length", [(multiview.DEFAULT_REVEAL, 16), ((0.3, 0.1, 0.3, 0.0), 8)])
def test_multiview_exact_bayes_accuracies_agree_with_monte_carlo(reveal, view_length):
    rows = 20_000
    source = data.make_source("multiview", VIEWS, seed=5, reveal=reveal, view_length=view_length)
    batch = source.train_batch(0, rows)
    for t, task in enumerate(VIEWS):
        for views in ((task,), VIEWS):
            exact = multiview.bayes_accuracy(task, reveal, view_length, views)
            at = [VIEWS.index(v) for v in views]
            predicted = multiview.bayes_predictions(
                task, multiview.posterior(batch["inputs"][at], [reveal[i] for i in at]))
            estimate = np.mean(predicted == batch["labels"][task])
            standard_error = np.sqrt(exact * (1 - exact) / rows)
            print(f"{task} from {len(views)} view(s): exact {exact:.4f}, Monte Carlo {estimate:.4f}")
            assert abs(estimate - exact) < 4 * standard_error
    if reveal == multiview.DEFAULT_REVEAL:  # the docstring's table
        table = multiview.reference_accuracies()
        assert {t: {k: round(v, 4) for k, v in row.items()} for t, row in table.items()} == {
            "view_class": {"trivial": 0.25, "own": 0.6017, "all": 0.8192},
            "view_parity": {"trivial": 0.5, "own": 0.739, "all": 0.8812},
            "view_high": {"trivial": 0.5, "own": 0.739, "all": 0.8812},
            "view_blind": {"trivial": 0.25, "own": 0.25, "all": 0.8192}}
        shuffled = data.make_source("multiview", VIEWS, seed=0, shuffle_rows=True).reference_accuracies()
        assert all(row["all"] == row["own"] for row in shuffled.values())


def test_multiview_bayes_rule_on_held_out_rows_scores_near_the_exact_expectation():
    rows = 20_000
    exact = multiview.reference_accuracies()
    aligned = data.make_source("multiview", VIEWS, seed=0, num_eval_examples=rows)
    shuffled = data.make_source("multiview", VIEWS, seed=0, num_eval_examples=rows, shuffle_rows=True)
    on_rows, on_shuffled = aligned.bayes_rule_accuracies("test"), shuffled.bayes_rule_accuracies("test")
    for task in VIEWS:
        for views in ("own", "all"):
            standard_error = np.sqrt(exact[task][views] * (1 - exact[task][views]) / rows)
            assert abs(on_rows[task][views] - exact[task][views]) < 4 * standard_error
        # whole blocks: each task's shuffled rows are its aligned rows in another order
        assert on_shuffled[task]["own"] == on_shuffled[task]["all"] == on_rows[task]["own"]
    assert on_rows["view_blind"]["all"] > exact["view_blind"]["own"] + 0.5  # the others' views carry it
    pair = data.make_source("multiview", ("view_class", "view_blind"), seed=0, num_eval_examples=rows)
    tokens, labels = pair.held_out("test")
    from_both = multiview.bayes_predictions("view_blind", multiview.posterior(tokens, (0.15, 0.0)))
    assert pair.bayes_rule_accuracies("test")["view_blind"]["all"] == np.mean(from_both == labels["view_blind"])


def test_multiview_exact_bayes_refuses_an_intractable_sum_in_one_line():
    with pytest.raises(ValueError) as error:
        multiview.bayes_accuracy("view_blind", (0.1, 0.2, 0.3, 0.0), 16, VIEWS)
    assert "count statistics" in str(error.value) and "\n" not in str(error.value)


def test_aligned_rows_is_declared_by_multiview_only():
    assert base.Source.aligned_rows is False
    assert data.SOURCES["multiview"].aligned_rows is True
    assert not any(source.aligned_rows for name, source in data.SOURCES.items() if name != "multiview")
