"""The run's figures and its TensorBoard summary: what they show, on hand-made records."""

import glob
import struct

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import default as default_config  # noqa: E402
from mtt_jax import tasks as tasks_lib  # noqa: E402
from mtt_jax.run import summary  # noqa: E402
from mtt_jax.run.writers import MetricWriter  # noqa: E402

ACCURACY = tasks_lib.TaskSpec("digit", "classification", 10)
REGRESSION = tasks_lib.TaskSpec("value", "regression")


def records():
    train = [{"step": s, "split": "train", "digit/loss": 2.0 / s, "value/loss": 1.0 / s} for s in range(1, 11)]
    evals = [{"step": s, "split": "eval", "digit/loss": 1.5 / s, "digit/accuracy": 0.1 * s,
              "digit/baseline_accuracy": 0.11, "value/loss": 0.9 / s, "value/mse": 0.9 / s,
              "value/baseline_mse": 1.0} for s in (5, 10)]
    return train + evals


def test_curves_give_each_task_its_own_loss_and_metric_axes_with_the_input_blind_line():
    fig = summary.curves_figure(plt, records(), [ACCURACY, REGRESSION])
    axes = np.asarray(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes[0]] == ["digit", "value"]
    assert axes[1, 0].get_ylabel() == "eval accuracy" and axes[1, 1].get_ylabel() == "eval mse"
    for column, baseline in ((0, 0.11), (1, 1.0)):
        labels = [line.get_label() for line in axes[1, column].lines]
        assert "input-blind predictor" in labels
        dashed = axes[1, column].lines[labels.index("input-blind predictor")]
        assert dashed.get_ydata()[0] == baseline
        loss_labels = [line.get_label() for line in axes[0, column].lines]
        assert loss_labels == ["train (one batch)", "train (running mean of 5)", "eval"]
    assert axes[0, 0].get_yscale() == "log"  # the losses span more than a decade
    plt.close(fig)


def test_the_attention_map_writes_its_values_and_says_what_is_fixed_by_construction():
    two = summary.attention_figure(plt, np.array([[0.0, 1.0], [1.0, 0.0]]), [ACCURACY, REGRESSION])
    assert "1 by construction" in two.axes[0].get_title()
    assert sorted(t.get_text() for t in two.axes[0].texts) == ["1.000", "1.000"]
    plt.close(two)
    tasks = [tasks_lib.TaskSpec(f"t{i}", "classification", 2) for i in range(3)]
    matrix = np.array([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])
    three = summary.attention_figure(plt, matrix, tasks)
    assert len(three.axes[0].texts) == 9 and "construction" not in three.axes[0].get_title()
    assert three.axes[0].images[0].norm.vmin == 0.1 and three.axes[0].images[0].norm.vmax == 0.6
    plt.close(three)


def tensorboard_tags(folder) -> set:
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in glob.glob(f"{folder}/events*"):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            length = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            tags |= {value.tag for value in event.summary.value}
    return tags


def test_tensorboard_gets_the_runs_hparams_and_its_summary_text(tmp_path):
    config = default_config.get_config("tiny")
    fields = summary.hparams(config)
    assert fields["model.d_model"] == config.model.d_model and fields["tasks"] == str(list(config.tasks))
    assert all(isinstance(v, (bool, int, float, str)) for v in fields.values())
    writer = MetricWriter(str(tmp_path))
    writer.write_run_summary(fields, {"loss": 1.5, "digit/accuracy": 0.7, "task_attention": [[1.0]]},
                             "| task | accuracy |", step=20)
    writer.close()
    tags = tensorboard_tags(tmp_path / "tensorboard")
    assert {"_hparams_/experiment", "hparam/loss", "hparam/digit/accuracy", "summary/text_summary"} <= tags
