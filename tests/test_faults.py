"""Bad input and faults a hostile user or a preemptible cloud brings: each ends in one line and exit
status 2 with the workdir untouched, or the run goes on (or stops saying why) with nothing lost.

The command line runs in this process (`run_main`), so these tests pay no interpreter or JAX start-up.
"""

import errno
import json
import os
import signal
import sys

import jax
import pytest
from absl import flags

from configs import default as default_config, seqtasks as seqtasks_config
from mtt_jax import main as main_module, train
from mtt_jax.run import cli, config_check, lease, memory_check, workdir, writers
from tests import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reset_flags():
    """Unparsed flags, without the ``--config.x`` override flags the last parse defined."""
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    sys.modules.pop("config_config", None)  # ml_collections loads each config file into this module


def run_main(capsys, *argv: str, config: str = "configs/default.py:tiny") -> tuple[int, list[str]]:
    """``python -m mtt_jax.main --config=CONFIG ARGV...`` in this process: its exit status and the
    lines it wrote to stderr."""
    reset_flags()
    capsys.readouterr()
    cwd, sys_argv = os.getcwd(), sys.argv
    sys.argv = ["mtt_jax.main", f"--config={config}", "--quiet", *argv]  # the config flag reads sys.argv
    os.chdir(ROOT)
    try:
        main_module.main(cli.parse_flags(sys.argv))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(cwd)
        sys.argv = sys_argv
        reset_flags()
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(capsys, workdir_path, *argv, expected: str, config="configs/default.py:tiny"):
    code, err = run_main(capsys, f"--workdir={workdir_path}", *argv, config=config)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    return err[0]


@pytest.fixture
def config_files(tmp_path):
    files = {"syntax": "def get_config(:\n", "raises": "def get_config(arg=None):\n    raise RuntimeError('boom')\n",
             "no_get_config": "X = 1\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    return tmp_path


@pytest.mark.parametrize("argv,expected", [
    (["--config.total_steps=abc"], "flag --config.total_steps=abc: invalid literal for int()"),
    (["--config.seed=-1"], "seed=-1 must be an integer >= 0"),
    (["--config.transfer_guard=bogus"], "transfer_guard='bogus' is not valid; choose one of: allow"),
    (["--config.data.options.num_eval_pairs=0"], "data.source='multidigits': num_eval_pairs must be an "
                                                 "integer >= 1, got 0"),
    (["--config.model.ffn=task_moe", "--config.model.num_experts=0"], "model.num_experts=0 must be in [1,"),
    (["--config.model.patch_size=5"], "model.patch_size=5: image 12x12 is not divisible into 5x5 patches"),
    (["--config.axis_rules=(('embed','bogus'),)"], "names mesh axis 'bogus'; the mesh axes are data, fsdp"),
    (["--config.weighting.name=fixed", "--config.weighting.weights=nan"],
     "weighting.weights=('nan',) must be a tuple of 2 finite, non-negative numbers"),
    (["--config.weighting.name=fixed", "--config.weighting.weights=(float('nan'),1.0)"],
     "must be a tuple of 2 finite, non-negative numbers"),
    (["--config.weighting.name=fixed", "--config.weighting.weights=(0.0,0.0)"], "are all 0, so nothing"),
    (["--config.weighting.weights=(1.0,2.0)"], "is used only by weighting.name='fixed'; 'ew' would ignore"),
    (["--config.weighting.name=uncertainty", "--config.weighting.init_log_var=nan"],
     "weighting.init_log_var=nan must be in (-inf, inf)"),
    (["--config.nonfinite_skip_limit=1.5"], "nonfinite_skip_limit=1.5 must be in [0.0, 1.0] (1: never halt)"),
    (["--config.batch_size=1000000000"], "batch_size=1000000000 and eval_batch_size=256 need about"),
    (["--config.eval_batch_size=1000000000"], "GiB of host memory for the batches the loop holds"),
])
def test_bad_input_exits_2_in_one_line_before_the_workdir_is_touched(capsys, tmp_path, argv, expected):
    assert_refused(capsys, tmp_path / "run", *argv, expected=expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("length", [0, 1])
def test_a_sequence_length_the_source_cannot_generate_is_one_line(length):
    config = seqtasks_config.get_config("tiny")
    config.data.options.length = length  # a config file's field, not an existing one to override
    config_check.validate(config, jax.device_count())
    with pytest.raises(config_check.ConfigError) as error:
        train.build(config)
    assert str(error.value) == f"data.source='seqtasks': length must be an integer >= 2, got {length}"


def test_a_vocabulary_smaller_than_the_data_is_one_line(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "run", "--config.model.vocab_size=-3", config="configs/seqtasks.py:tiny",
                   expected="model.vocab_size=-3 is smaller than the data's vocabulary of 32")


def test_a_config_file_that_does_not_load_is_one_line(capsys, config_files):
    for name, expected in (("syntax", "syntax.py line 1: SyntaxError: invalid syntax"),
                           ("raises", "loading the config failed: RuntimeError: boom"),
                           ("no_get_config", "the file defines no get_config()")):
        assert_refused(capsys, config_files / "run", expected=expected, config=str(config_files / f"{name}.py"))
    assert_refused(capsys, config_files / "run", expected="unknown variant 'huge' of configs/default.py",
                   config="configs/default.py:huge")
    assert_refused(capsys, "", expected="--workdir is empty; pass a folder")
    assert not (config_files / "run").exists()


def test_a_step_that_cannot_fit_in_device_memory_is_refused_before_the_workdir(capsys, tmp_path,
                                                                                monkeypatch):
    """The compiled train step's memory analysis against the device's limit (here set to 1/16 MiB)."""
    monkeypatch.setattr(memory_check, "device_memory_limit", lambda device: 2**16)
    error = assert_refused(capsys, tmp_path / "run", expected="the train step needs about ")
    needed_mib = float(error.split("needs about ")[1].split(" MiB")[0])
    assert 0.1 < needed_mib < 1024  # the tiny model's parameters, Adam's moments and activations
    assert "per device (its compiled memory analysis), but cpu has 0.06 MiB available; lower batch_size" in error
    assert not (tmp_path / "run").exists()


# --- Workdirs: never clear what is not ours ----------------------------------------------------------

def test_overwrite_never_clears_a_folder_without_a_run_of_ours(capsys, tmp_path):
    other_tool = tmp_path / "other_tool"
    other_tool.mkdir()
    (other_tool / "config.json").write_text('{"learning_rate": 0.1}')
    (other_tool / "checkpoints").mkdir()
    (other_tool / "checkpoints" / "ckpt-1").write_text("theirs")
    assert_refused(capsys, other_tool, "--overwrite", expected="config.json is not an mtt_jax run's config")
    bare = tmp_path / "bare"
    (bare / "tensorboard").mkdir(parents=True)
    (bare / "tensorboard" / "events").write_text("theirs")
    assert_refused(capsys, bare, "--overwrite", expected="holds tensorboard without the config.json of an "
                                                         "mtt_jax run; --overwrite clears only a run of mtt_jax")
    cut_short = tmp_path / "cut_short"
    cut_short.mkdir()
    (cut_short / "config.json").write_text("{cut sho")
    (cut_short / "metrics.jsonl").write_text("{}\n")
    assert_refused(capsys, cut_short, "--overwrite", expected="config.json cannot be read (JSONDecodeError")
    assert (other_tool / "checkpoints" / "ckpt-1").read_text() == "theirs"
    assert (bare / "tensorboard" / "events").read_text() == "theirs"
    assert (cut_short / "metrics.jsonl").read_text() == "{}\n"
    ours = tmp_path / "ours"
    config = default_config.get_config("tiny")
    workdir.write_config(str(ours), config)
    (ours / "metrics.jsonl").write_text("{}\n")
    (ours / "notes.txt").write_text("mine")
    config.seed = 1
    assert not workdir.prepare(str(ours), config, overwrite=True)
    assert sorted(p.name for p in ours.iterdir()) == ["notes.txt"]  # only the run's outputs go


def test_an_output_of_the_wrong_kind_is_refused_before_the_run(capsys, tmp_path):
    config = default_config.get_config("tiny")
    workdir.write_config(str(tmp_path), config)
    (tmp_path / "checkpoints").write_text("not a folder")
    assert_refused(capsys, tmp_path, expected="checkpoints is a file, but the run keeps its checkpoints in a "
                                              "folder there; move it away")
    assert (tmp_path / "checkpoints").read_text() == "not a folder"


# --- Faults during a run ---------------------------------------------------------------------------

def records(workdir_path, split="train"):
    with open(os.path.join(workdir_path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def at_step(monkeypatch, step_to_act, action):
    """Runs ``action()`` when the loop checks whether to stop after update ``step_to_act``."""
    real = train.stop_requested

    def patched(preemption, held, step, every):
        if step == step_to_act:
            action()
        return real(preemption, held, step, every)
    monkeypatch.setattr(train, "stop_requested", patched)


def test_deleting_metrics_jsonl_mid_run_loses_no_record(monkeypatch, tmp_path, caplog):
    config = seqtasks_config.get_config("tiny")  # 20 steps, log every 5, eval every 10
    at_step(monkeypatch, 12, lambda: os.remove(tmp_path / "metrics.jsonl"))
    train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert [r["step"] for r in records(tmp_path)] == [5, 10, 15, 20]
    assert [r["step"] for r in records(tmp_path, "eval")] == [10, 20]
    assert "metrics.jsonl was deleted or replaced while the run was writing it; restored its 3 records" in caplog.text
    assert "| mean_value |" in (tmp_path / "summary.md").read_text()


def test_a_run_that_skips_most_updates_halts_instead_of_ending_successfully(monkeypatch, tmp_path):
    steps.inject_nan(monkeypatch, lambda step: step >= 3)
    config = seqtasks_config.get_config("tiny")
    config.checkpoint_every, config.nonfinite_skip_window = 2, 8
    # Updates 4, 5, ... are skipped; 3 of the last 8 is more than 0.25 * 8 at update 6.
    with pytest.raises(train.NonFiniteLossError, match=r"^3 of the last 8 updates up to step 6 had a non-finite "
                                                       r"loss or gradient and were skipped, more than "
                                                       r"nonfinite_skip_limit=0.25; halted"):
        train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert not (tmp_path / "summary.md").exists()


def test_the_skip_window_counts_the_last_updates_only():
    window = train.SkipWindow(window=4, limit=0.5)
    assert [window.add(s) for s in (True, True, False, False, True, True)] == [False] * 6  # 2 of 4
    assert window.add(True) and window.count == 3
    never = train.SkipWindow(window=4, limit=1.0)
    assert not any(never.add(True) for _ in range(10))


class FakeLease:
    """A workdir lease whose state turns ``to`` after update ``after``."""

    def __init__(self, after: int, to: str):
        self.after, self.to, self.updates = after, to, 0
        self.reason = ""

    def state(self):  # asked once after each update
        self.updates += 1
        if self.updates < self.after:
            return lease.HELD
        self.reason = f"the lease gs://b/run/.lock is {self.to}"
        return self.to


@pytest.mark.parametrize("to", [lease.AT_RISK, lease.LOST])
def test_a_run_that_loses_its_lease_stops(monkeypatch, tmp_path, to):
    """At risk: the run saves a checkpoint at the step reached, then stops; lost: it stops without
    writing anything more (another run may own the workdir)."""
    import contextlib
    config = seqtasks_config.get_config("tiny")
    config.checkpoint_every = 4
    monkeypatch.setattr(train.workdir_lib, "lock",
                        lambda path, enabled=True: contextlib.nullcontext(FakeLease(after=7, to=to)))
    with pytest.raises(workdir.WorkdirError) as error:
        train.train_and_evaluate(config, str(tmp_path), quiet=True)
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    if to == lease.AT_RISK:
        assert str(error.value) == ("the lease gs://b/run/.lock is at risk; saved the checkpoint at step 7 and "
                                    "stopped. Run the same command to resume.")
        assert steps == [4, 7] and [r["step"] for r in records(tmp_path)] == [5]
    else:
        assert str(error.value) == ("the lease gs://b/run/.lock is lost; stopped at step 7 without writing "
                                    "anything more (what was stored before is kept)")
        assert steps == [4] and [r["step"] for r in records(tmp_path)] == [5]


def test_sigterm_during_start_up_exits_0_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main_module, "initialize_distributed", lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, err = run_main(capsys, f"--workdir={tmp_path / 'run'}")
    assert code == 0 and not (tmp_path / "run").exists(), err


def test_a_full_disk_is_one_line_and_the_same_command_resumes(capsys, tmp_path, monkeypatch):
    """(That a resumed run computes what an uninterrupted one does: tests/test_resilience.py.)"""
    args = ("--config.checkpoint_every=5", "--config.total_steps=10", "--config.eval_every=10")
    real_write = writers.LocalRecordFile.write

    def disk_full_at_step_10(self, data):
        if b'"step": 10, "split": "train"' in data:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        real_write(self, data)
    with monkeypatch.context() as patch:
        patch.setattr(writers.LocalRecordFile, "write", disk_full_at_step_10)
        error = assert_refused(capsys, tmp_path / "run", *args, expected="no space left on the device writing ")
    assert error.endswith("free space and run the same command to resume")
    assert [r["step"] for r in records(tmp_path / "run")] == [5]  # step 10's record was never written
    with monkeypatch.context() as patch:  # a disk full from the start: config.json cannot be written
        patch.setattr(workdir.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        assert_refused(capsys, tmp_path / "never", *args, expected="no space left on the device")
    assert not (tmp_path / "never" / "config.json").exists()
    assert run_main(capsys, f"--workdir={tmp_path / 'run'}", *args)[0] == 0
    assert [r["step"] for r in records(tmp_path / "run")] == [5, 10]
    assert [r["step"] for r in records(tmp_path / "run", "eval")] == [10]
