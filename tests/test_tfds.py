"""TFDS sources on ``tfds.testing.mock_data`` (through ``tfds_io.mock_data``): GLUE, MultiMNIST, CelebA.

Shapes, label ranges, the sentence-pair layout against the raw mock examples, the cache, the one-line
errors for a dataset that is not prepared and for labels that do not fit, and the GLUE metrics on
hand-made predictions.
"""

import os
from unittest import mock

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mtt_jax import data, tasks as tasks_lib
from mtt_jax.data import glue, multimnist_tfds, tfds_io
from mtt_jax.data.tokenizer import CLS_ID, SEP_ID, ByteTokenizer

NUM_MOCK = 12
GLUE_TASKS = data.AVAILABLE_TASKS["glue"]


def raw_examples(name: str, split: str, data_dir: str) -> list:
    with tfds_io.mock_data(NUM_MOCK):
        source = tfds_io.prepared_builder(name, data_dir).as_data_source(split=split)
        return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def glue_source(data_dir):
    with tfds_io.mock_data(NUM_MOCK):
        return data.make_source("glue", GLUE_TASKS, seed=0, data_dir=data_dir, max_length=48)


# --- GLUE ------------------------------------------------------------------------------------------

def test_glue_batch_shapes_and_label_ranges(glue_source):
    assert glue_source.layout == "multi"
    assert glue_source.input_spec == data.InputSpec(kind="tokens", shape=(48,), vocab_size=259)
    batch = glue_source.train_batch(step=3, batch_size=8)
    assert batch["inputs"].shape == (9, 8, 48) and batch["inputs"].dtype == np.int32
    for task in GLUE_TASKS:
        labels = batch["labels"][task]
        assert labels.shape == (8,)
        np.testing.assert_array_equal(batch["mask"][task], np.ones(8))
        spec = tasks_lib.get(task)
        if task == "stsb":
            assert labels.dtype == np.float32 and np.all(np.isfinite(labels))
        else:
            assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < spec.num_classes
    # Half of each task's 12 train examples is held out as its validation split (as many as its test
    # split, at most half of the train split).
    assert glue_source.num_train_examples == {task: NUM_MOCK // 2 for task in GLUE_TASKS}


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_sequences_are_cls_text_sep_text_sep(glue_source, data_dir, task):
    spec = glue.GLUE_TASKS[task]
    raw = raw_examples(f"glue/{spec.config}", "train", data_dir)
    tokens, labels = glue_source.train[task]
    byte = ByteTokenizer()
    for i, example in enumerate(raw):
        row = tokens[i].astype(np.int32)
        assert row[0] == CLS_ID
        sep = np.flatnonzero(row == SEP_ID)
        assert len(sep) == len(spec.text_keys)  # one separator per segment: between the two, and last
        assert byte.decode(row[1:sep[0]]) == tfds_io.text(example[spec.text_keys[0]])
        if len(spec.text_keys) == 2:
            assert byte.decode(row[sep[0] + 1:sep[1]]) == tfds_io.text(example[spec.text_keys[1]])
        assert np.all(row[sep[-1] + 1:] == 0)
        raw_label = np.asarray(example["label"]).item()
        if task == "stsb":
            mean, std = glue_source.label_moments["stsb"]
            assert labels[i] == pytest.approx((raw_label - mean) / std, rel=1e-5)
        else:
            assert labels[i] == raw_label


def test_glue_truncation_keeps_both_segments(data_dir):
    with tfds_io.mock_data(NUM_MOCK):
        short = data.make_source("glue", ["mrpc"], seed=0, data_dir=data_dir, max_length=12)
    for row in short.train["mrpc"][0]:
        sep = np.flatnonzero(row == SEP_ID)
        assert len(sep) == 2 and sep[1] == 11 and sep[0] >= 4  # 9 content bytes split longest-first


def test_glue_train_epochs_and_eval_padding(glue_source):
    # Passes over each task's 6 train examples (the 6 others are its validation split): 3 steps of 2
    # rows see every one once.
    seen = np.concatenate([glue_source.train_indices("cola", step, 2) for step in range(3)])
    assert sorted(seen) == sorted(glue_source.train_pool["cola"]) and len(seen) == NUM_MOCK // 2
    assert not np.array_equal(seen, glue_source.train_indices("sst2", 0, 6))  # tasks have own orders
    batches = list(glue_source.eval_batches(batch_size=8))
    assert len(batches) == 2 and batches[0]["inputs"].shape == (9, 8, 48)
    for task in GLUE_TASKS:
        assert sum(b["mask"][task].sum() for b in batches) == NUM_MOCK
    stsb = np.concatenate([b["labels"]["stsb"] for b in batches])[:NUM_MOCK]
    np.testing.assert_array_equal(stsb, glue_source.eval["stsb"][1])


def test_glue_options_mnli_mismatched_and_eval_cap(data_dir):
    with tfds_io.mock_data(NUM_MOCK):
        source = data.make_source("glue", ["mnli", "rte"], seed=0, data_dir=data_dir, max_length=48,
                                  mnli_eval="mismatched", max_eval_examples=5)
    assert os.path.exists(tfds_io.cache_path(data_dir, "glue", "mnli-v1",
                                             "validation_mismatched-bytes-L48.npz"))
    assert source.eval_sizes == {"mnli": 5, "rte": 5} and source.num_eval_examples == 5
    with pytest.raises(ValueError, match="mnli_eval"):
        data.make_source("glue", ["mnli"], seed=0, data_dir=data_dir, mnli_eval="both")


def test_glue_second_construction_reads_the_cache(glue_source, data_dir):
    with mock.patch.object(tfds_io, "read_split", side_effect=AssertionError("read TFDS again")):
        again = data.make_source("glue", GLUE_TASKS, seed=0, data_dir=data_dir, max_length=48)
    for task in GLUE_TASKS:
        np.testing.assert_array_equal(again.train[task][0], glue_source.train[task][0])
        np.testing.assert_array_equal(again.eval[task][1], glue_source.eval[task][1])
    # Another max_length is another cache entry, read from TFDS.
    with tfds_io.mock_data(NUM_MOCK), mock.patch.object(tfds_io, "read_split",
                                                        wraps=tfds_io.read_split) as read:
        data.make_source("glue", ["cola"], seed=0, data_dir=data_dir, max_length=40)
    assert read.call_count == 2  # train and validation


def test_glue_with_a_sentencepiece_model(tmp_path, data_dir):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["abcdefghij klmnop", "a quick test sentence", "ij hh ab cd ef"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=30,
                                   hard_vocab_limit=False, minloglevel=2)
    with tfds_io.mock_data(NUM_MOCK):
        source = data.make_source("glue", ["rte"], seed=0, data_dir=data_dir, max_length=48,
                                  tokenizer="sentencepiece", sentencepiece_model=str(tmp_path / "m.model"))
    assert source.input_spec.vocab_size == source.tokenizer.vocab_size < 259
    tokens = source.train["rte"][0]
    assert np.all(tokens[:, 0] == CLS_ID) and np.all((tokens == SEP_ID).sum(axis=1) == 2)
    assert tokens.max() < source.input_spec.vocab_size
    cached = os.listdir(tfds_io.cache_path(data_dir, "glue", "rte-v1"))
    assert f"train-{source.tokenizer.cache_key}-L48.npz" in cached


def test_glue_flat_batch_rows_come_from_their_tasks(glue_source):
    flat = glue_source.flat_batch(step=2, batch_size=18, rates=[1.0] * 9)
    assert flat["inputs"].shape == (18, 48) and np.bincount(flat["task_id"], minlength=9).tolist() == [2] * 9
    for i, (row, t) in enumerate(zip(flat["inputs"], flat["task_id"])):
        task = GLUE_TASKS[t]
        tokens, labels = glue_source.train[task]
        matches = [j for j, candidate in enumerate(tokens) if np.array_equal(row, candidate)]
        assert matches and flat["labels"][task][i] in labels[matches]
        assert [flat["mask"][name][i] for name in GLUE_TASKS] == [float(name == task) for name in GLUE_TASKS]


def test_labels_that_do_not_fit_the_task_raise_one_line(tmp_path):
    def bad_labels(name, split, data_dir, convert=lambda x: x, num_threads=1):
        examples = [{"sentence": "a", "label": np.int64(label)} for label in (0, 1, 2)]
        return 3, (convert(e) for e in examples)

    with mock.patch.object(tfds_io, "read_split", bad_labels):
        with pytest.raises(ValueError, match=r"\[0, 2\)") as error:
            data.make_source("glue", ["cola"], seed=0, data_dir=str(tmp_path))
    assert "cola" in str(error.value) and "\n" not in str(error.value)

    def bad_scores(name, split, data_dir, convert=lambda x: x, num_threads=1):
        examples = [{"sentence1": "a", "sentence2": "b", "label": np.float32(v)} for v in (1.0, 7.5)]
        return 2, (convert(e) for e in examples)

    with mock.patch.object(tfds_io, "read_split", bad_scores):
        with pytest.raises(ValueError, match=r"\[0.0, 5.0\]"):
            data.make_source("glue", ["stsb"], seed=0, data_dir=str(tmp_path / "stsb"))


# --- Not prepared ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, tasks, dataset", [
    ("glue", ("rte",), "glue/rte"),
    ("multimnist", ("mnist_left",), "mnist"),
    ("celeba", ("celeba_smiling",), "celeb_a"),
])
def test_missing_dataset_names_the_build_command_and_downloads_nothing(tmp_path, source, tasks, dataset):
    import tensorflow_datasets as tfds

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           side_effect=AssertionError("must not download")):
        with pytest.raises(data.DatasetNotPreparedError) as error:
            data.make_source(source, tasks, seed=0, data_dir=empty)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert f"tfds build {dataset} --data_dir={empty} --file_format=array_record" in message
    assert os.listdir(empty) == []


# --- MultiMNIST ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_source(data_dir):
    with tfds_io.mock_data(NUM_MOCK):
        return data.make_source("multimnist", ("mnist_left", "mnist_right"), seed=1, data_dir=data_dir)


def test_multimnist_shapes_labels_and_construction(mnist_source, data_dir):
    assert mnist_source.input_spec == data.InputSpec(kind="image", shape=(28, 28))
    batch = mnist_source.train_batch(step=0, batch_size=6)
    assert batch["inputs"].shape == (6, 28, 28) and batch["inputs"].dtype == np.float32
    assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
    raw = raw_examples("mnist", "train", data_dir)
    images = np.stack([np.asarray(e["image"])[..., 0] for e in raw])
    labels = np.array([int(e["label"]) for e in raw])
    index = mnist_source.train_indices(step=0, batch_size=6)
    partner = mnist_source.train_partners[index]
    for i in range(6):
        canvas = np.zeros((36, 36))
        canvas[:28, :28] = images[index[i]]
        canvas[6:34, 6:34] = np.maximum(canvas[6:34, 6:34], images[partner[i]])
        rows = multimnist_tfds.nearest_rows(36, 28)
        np.testing.assert_allclose(batch["inputs"][i], canvas[rows][:, rows] / 255, atol=1e-6)
        assert batch["labels"]["mnist_left"][i] == labels[index[i]]
        assert batch["labels"]["mnist_right"][i] == labels[partner[i]]
    for task in ("mnist_left", "mnist_right"):
        assert batch["labels"][task].dtype == np.int32 and batch["labels"][task].max() <= 9


def test_multimnist_36_keeps_the_canvas_and_nearest_resize_spans_it(data_dir):
    rows = multimnist_tfds.nearest_rows(36, 28)
    assert rows[0] == 0 and rows[-1] == 35 and np.all(np.diff(rows) >= 1)
    with tfds_io.mock_data(NUM_MOCK):
        big = data.make_source("multimnist", ("mnist_right",), seed=1, data_dir=data_dir, image_size=36)
    assert big.train_batch(0, 2)["inputs"].shape == (2, 36, 36)
    assert list(big.eval_batches(8))[0]["inputs"].shape == (8, 36, 36)


# --- CelebA ----------------------------------------------------------------------------------------

def test_celeba_forty_attribute_tasks(data_dir):
    tasks = data.AVAILABLE_TASKS["celeba"]
    with tfds_io.mock_data(NUM_MOCK):
        source = data.make_source("celeba", tasks, seed=0, data_dir=data_dir, image_size=16)
    assert source.input_spec == data.InputSpec(kind="image", shape=(16, 16, 3))
    batch = source.train_batch(step=1, batch_size=4)
    assert batch["inputs"].shape == (4, 16, 16, 3) and batch["inputs"].dtype == np.float32
    assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
    raw = raw_examples("celeb_a", "train", data_dir)
    index = source.train_indices(step=1, batch_size=4)
    for task in tasks:
        assert tasks_lib.get(task).num_classes == 2
        attribute = next(a for a in data.celeba.ATTRIBUTES if f"celeba_{a.lower()}" == task)
        expected = [int(bool(raw[i]["attributes"][attribute])) for i in index]
        np.testing.assert_array_equal(batch["labels"][task], expected)
    image = data.celeba.resize(raw[index[0]]["image"], 16)
    np.testing.assert_allclose(batch["inputs"][0], image / 255, atol=1e-6)
    with mock.patch.object(tfds_io, "read_split", side_effect=AssertionError("read TFDS again")):
        cached = data.make_source("celeba", ("celeba_smiling",), seed=0, data_dir=data_dir, image_size=16)
    assert isinstance(cached.train_images, np.memmap)
    np.testing.assert_array_equal(cached.train_batch(1, 4)["labels"]["celeba_smiling"],
                                  batch["labels"]["celeba_smiling"])


# --- GLUE metrics on hand-made predictions ---------------------------------------------------------

def test_glue_tasks_report_glue_metrics():
    assert tasks_lib.get("cola").metric_names == ("matthews_corr", "accuracy")
    assert tasks_lib.get("mrpc").metric_names == ("f1", "accuracy") == tasks_lib.get("qqp").metric_names
    assert tasks_lib.get("stsb").metric_names == ("pearson", "spearman", "mse")
    assert tasks_lib.get("stsb").kind == "regression"
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert tasks_lib.get(task).main_metric == "accuracy"
    assert tasks_lib.get("left_digit").metric_names == ("accuracy", "macro_f1")  # defaults unchanged


def test_matthews_and_f1_against_hand_counts():
    pred = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    label = np.array([1, 0, 0, 0, 1, 1, 1, 1])
    # TP 4, FP 1, TN 2, FN 1: MCC = (4*2 - 1*1) / sqrt(5 * 5 * 3 * 3) = 7 / 15; F1 = 8 / (8 + 1 + 1).
    assert tasks_lib.matthews_corr(pred, label) == pytest.approx(7 / 15)
    assert tasks_lib.f1(pred, label) == pytest.approx(0.8)
    metrics = tasks_lib.compute_metrics(tasks_lib.get("cola"), pred, label)
    assert metrics == pytest.approx({"matthews_corr": 7 / 15, "accuracy": 6 / 8})
    assert tasks_lib.compute_metrics(tasks_lib.get("mrpc"), pred, label) == pytest.approx(
        {"f1": 0.8, "accuracy": 0.75})
    assert tasks_lib.matthews_corr(np.ones(4), np.array([0, 1, 1, 0])) == 0.0  # constant prediction
    assert tasks_lib.f1(np.zeros(4), np.array([0, 1, 1, 0])) == 0.0


def test_metrics_agree_with_scikit_learn_and_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    for num_classes in (2, 3):
        pred, label = rng.integers(0, num_classes, 200), rng.integers(0, num_classes, 200)
        assert tasks_lib.matthews_corr(pred, label) == pytest.approx(
            sk_metrics.matthews_corrcoef(label, pred))
    pred, label = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert tasks_lib.f1(pred, label) == pytest.approx(sk_metrics.f1_score(label, pred))
    x, y = rng.normal(size=100), rng.integers(0, 6, 100).astype(float)  # many ties in y
    assert tasks_lib.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_spearman_by_hand_with_ties():
    # Ranks of [5, 6, 7, 8, 7] are [1, 2, 3.5, 5, 3.5]; against ranks 1..5:
    # sum dx dy = 8, sum dx^2 = 10, sum dy^2 = 9.5.
    assert tasks_lib.spearman(np.array([1.0, 2, 3, 4, 5]), np.array([5.0, 6, 7, 8, 7])) == \
        pytest.approx(8 / np.sqrt(95))
    np.testing.assert_allclose(tasks_lib.average_ranks(np.array([5.0, 6, 7, 8, 7])), [1, 2, 3.5, 5, 3.5])
    assert tasks_lib.spearman(np.array([3.0, 1, 2]), np.array([30.0, 10, 20])) == pytest.approx(1.0)
    stsb = tasks_lib.compute_metrics(tasks_lib.get("stsb"), np.array([1.0, 2, 3, 4]),
                                     np.array([1.0, 3, 2, 4]))
    assert stsb["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert stsb["mse"] == pytest.approx(0.5)


def test_baselines_report_every_metric_of_the_task():
    label = np.array([1, 1, 1, 0])
    assert tasks_lib.trivial_baseline(tasks_lib.get("cola"), label) == {"matthews_corr": 0.0,
                                                                        "accuracy": 0.75}
    assert tasks_lib.trivial_baseline(tasks_lib.get("qqp"), label) == pytest.approx(
        {"f1": 6 / 7, "accuracy": 0.75})
    assert tasks_lib.trivial_baseline(tasks_lib.get("stsb"), np.array([1.0, 3.0])) == {
        "pearson": 0.0, "spearman": 0.0, "mse": 1.0}


def test_task_metrics_are_checked_at_registration():
    with pytest.raises(ValueError, match="does not apply"):
        tasks_lib.register(tasks_lib.TaskSpec("bad_one", "classification", 2, metrics=("spearman",)))
    with pytest.raises(ValueError, match="binary"):
        tasks_lib.register(tasks_lib.TaskSpec("bad_two", "classification", 3, metrics=("f1",)))
    assert "bad_one" not in tasks_lib.registered() and "bad_two" not in tasks_lib.registered()
