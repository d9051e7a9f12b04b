"""The command line end to end, and bad configs stopping before any work with one line."""

import os
import subprocess
import sys

import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(workdir, *overrides, config="configs/default.py:tiny"):
    env = local.child_env(os.environ, 2)  # two devices, and conftest's cheaper compiles
    return subprocess.run([sys.executable, "-m", "mtt_jax.main", f"--config={config}",
                           f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_end_to_end_on_a_tiny_override(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(workdir, "--config.total_steps=6", "--config.eval_every=3", "--config.log_every=3",
                     "--config.weighting.name=fixed", "--config.weighting.weights=(1.0,0.5)",
                     "--config.affinity.every=3")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("config.json", "metrics.jsonl", "summary.md", "affinity.json"):
        assert (workdir / name).exists()
    assert "## Task affinity (TAG lookahead, mean of 2;" in (workdir / "summary.md").read_text()
    lines = [l for l in result.stdout.splitlines() if l.startswith("step ")]
    assert lines and all("steps/s" in l and "ETA" in l and "loss" in l for l in lines)
    assert "\r" not in result.stdout  # not a terminal: whole lines, no progress-bar redraws
    assert '"weight/right_digit": 0.5' in (workdir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("override,expected", [
    ("--config.tasks=('left_digit','middle_digit')", "unknown task 'middle_digit'"),
    ("--config.weighting.name=magic", "weighting.name='magic' is not valid; choose one of:"),
    ("--config.weighting.weights=(1.0,2.0,3.0)", "has 3 entries for 2 tasks"),
    ("--config.total_steps=0", "total_steps=0 must be a positive integer"),
    ("--config.mesh.data=3", "needs 3 devices"),
    ("--config.model.task_attention=everything", "model.task_attention='everything' is not valid"),
    ("--config.attention_kernel=cudnn", "attention_kernel='cudnn' needs a GPU"),
    ("--config.model.num_layer=3", "--config.model.num_layer: the config has no field 'num_layer'; "
                                   'did you mean "num_layers"'),
])
def test_bad_config_exits_before_any_work(tmp_path, override, expected):
    workdir = tmp_path / "never_created"
    extra = ["--config.weighting.name=fixed"] if "weights" in override else []
    result = run_cli(workdir, override, *extra)
    assert result.returncode == 2
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-1500:]
    assert not workdir.exists()


@pytest.mark.parametrize("where", ["unknown_scheme", "no_package", "file"])
def test_a_workdir_the_run_could_not_keep_exits_before_any_work(tmp_path, where):
    """A URL on no known object store, or on one whose package is missing, and a file, which cannot
    hold the run: each stops with one line, --overwrite or not, and nothing is created or cleared
    (no local folder named after the URL, lost with the machine). Bucket runs: test_bucket_workdir.py."""
    if where == "unknown_scheme":
        workdir, expected = "ftp://host/run", "unknown URL scheme ftp://"
    elif where == "no_package":
        workdir, expected = "s3://bucket/run", "s3:// needs the s3fs package (pip install s3fs)"
    else:
        workdir, expected = tmp_path / "a_file", "exists and is not a folder"
        workdir.write_text("kept\n")
    result = run_cli(workdir, "--overwrite")
    assert result.returncode == 2
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-1500:]
    if where == "file":
        assert workdir.read_text() == "kept\n"
    else:
        assert not os.path.exists(os.path.join(ROOT, workdir.split("/")[0]))


def test_a_workdir_whose_run_is_unknown_is_refused(tmp_path):
    """Outputs without their config.json, or a config.json that cannot be read, belong to no known
    run: resuming from them or writing among them would mix two runs (and --overwrite does not clear
    them either: tests/test_faults.py)."""
    from configs import default
    from mtt_jax.run import workdir
    config = default.get_config("tiny")
    (tmp_path / "checkpoints").mkdir()  # empty: what a run stopped at its start leaves
    assert not workdir.prepare(str(tmp_path), config)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    with pytest.raises(workdir.WorkdirError, match="holds metrics.jsonl without the config.json of their run"):
        workdir.prepare(str(tmp_path), config)
    (tmp_path / "config.json").write_text("{cut sho")
    with pytest.raises(workdir.WorkdirError, match=r"config.json cannot be read \(JSONDecodeError"):
        workdir.prepare(str(tmp_path), config)


def test_a_second_run_in_a_workdir_in_use_stops_before_building_or_writing(tmp_path, monkeypatch):
    """The same command launched twice, or a requeued job while its first copy still runs: refused
    before the start-up (building and compiling), and again when the lock is taken."""
    import os
    from configs import default
    from mtt_jax import train
    from mtt_jax.run import workdir
    built = []
    monkeypatch.setattr(train, "build", lambda config: built.append(config) or 1 / 0)
    with workdir.lock(str(tmp_path)):  # the first run
        with pytest.raises(workdir.WorkdirError,
                           match=rf"is in use by another run \(pid {os.getpid()} on .+\); wait for it"):
            train.train_and_evaluate(default.get_config("tiny"), str(tmp_path), quiet=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"] and not built  # nothing done
    workdir.check_free(str(tmp_path))  # released with the first run
    with workdir.lock(str(tmp_path)):
        pass
    with pytest.raises(workdir.WorkdirError, match="needs the s3fs package"):  # not locked into ./s3:
        train.train_and_evaluate(default.get_config("tiny"), "s3://bucket/run", quiet=True)
    assert not os.path.exists("s3:") and not built


def test_output_paths_are_checked_before_the_work_and_written_whole(tmp_path, monkeypatch):
    from mtt_jax.run import workdir
    folder, results = tmp_path / "folder", tmp_path / "folder" / "results.json"
    workdir.check_location(str(folder), "--profile")  # not there yet: created later
    workdir.check_output_file(str(results), "--out")
    with pytest.raises(workdir.WorkdirError, match="--out=.* is a folder; pass a file name"):
        workdir.check_output_file(str(tmp_path), "--out")
    with pytest.raises(workdir.WorkdirError, match=r"--out=s3://b: s3:// needs the s3fs package"):
        workdir.check_output_file("s3://b/r.json", "--out")
    workdir.write_json(str(results), {"step": 1})  # creates the folder
    assert results.read_text() == '{"step": 1}'
    with pytest.raises(workdir.WorkdirError, match="exists and is not a folder; pass a folder for --profile"):
        workdir.check_location(str(results), "--profile")
    with pytest.raises(workdir.WorkdirError, match="results.json is a file, so the folder cannot be created"):
        workdir.check_location(str(results / "run"))
    with monkeypatch.context() as patch:  # this suite may run as root, which may write anywhere
        patch.setattr(workdir.os, "access", lambda path, mode: str(path) != str(folder))
        with pytest.raises(workdir.WorkdirError, match=r"--out=.*: .*folder is not writable"):
            workdir.check_output_file(str(folder / "new" / "bench.json"), "--out")

    def fail_to_rename(source, target):  # the new content is written, then the rename fails
        assert open(source).read() == '{"step": 2}'
        raise OSError("disk full")
    monkeypatch.setattr(workdir.os, "replace", fail_to_rename)
    with pytest.raises(OSError, match="disk full"):
        workdir.write_json(str(results), {"step": 2})
    assert results.read_text() == '{"step": 1}'  # the previous content, whole
    assert sorted(p.name for p in folder.iterdir()) == ["results.json"]  # no temporary left


def test_a_missing_config_file_exits_with_one_line(tmp_path):
    result = run_cli(tmp_path / "never_created", "--config.total_steps=2", config="configs/nope.py:tiny")
    assert result.returncode == 2 and not (tmp_path / "never_created").exists()
    assert result.stderr.strip().splitlines() == [
        "error: --config: configs/nope.py is not a file (give configs/<name>.py[:variant])"]


@pytest.mark.parametrize("field,value,expected", [
    ("learning_rate", -1e-3, "optimizer.learning_rate=-0.001 must be in [0.0, inf)"),
    ("learning_rate", float("nan"), "optimizer.learning_rate=nan must be in [0.0, inf)"),
    ("b2", 1.0, "optimizer.b2=1.0 must be in [0.0, 1.0)"),
    ("weight_decay", -0.1, "optimizer.weight_decay=-0.1 must be in [0.0, inf)"),
    ("grad_clip_norm", 0.0, "optimizer.grad_clip_norm=0.0 must be in (0.0, inf)"),
    ("warmup_steps", -5, "optimizer.warmup_steps=-5 must be an integer >= 0"),
    ("affinity.every", -1, "affinity.every=-1 must be an integer >= 0 (0: off)"),
    ("affinity.lr", -0.1, "affinity.lr=-0.1 must be in [0.0, inf) (0: the current learning rate)"),
    ("profile.first_step", -1, "profile.first_step=-1 must be an integer >= 0 (0: off)"),
    ("profile.num_steps", 0, "profile.num_steps=0 must be a positive integer"),
    ("profile.first_step", 39, "profile.first_step=39 with profile.num_steps=3 ends at update 41, after "
                               "total_steps=40; start the window earlier"),
])
def test_optimizer_and_affinity_settings_that_would_not_train_are_refused(field, value, expected):
    from configs import default
    from mtt_jax.run import config_check
    config = default.get_config("tiny")
    section, name = field.split(".") if "." in field else ("optimizer", field)
    config[section][name] = value
    with pytest.raises(config_check.ConfigError) as error:
        config_check.validate(config, 1)
    assert str(error.value).startswith(expected)


def test_unshardable_model_exits_before_touching_the_workdir(tmp_path):
    """One attention head over tensor = 2: the parameter shapes come from the built model, so this is
    found after the config check, but still before anything is written, or cleared by --overwrite."""
    from configs import default
    from mtt_jax.run import workdir as workdir_lib
    workdir = tmp_path / "earlier_run"
    workdir_lib.write_config(str(workdir), default.get_config("tiny"))  # a run of ours: --overwrite may clear it
    (workdir / "metrics.jsonl").write_text("{}\n")
    result = run_cli(workdir, "--config.model.num_heads=1", "--config.mesh.data=1",
                     "--config.mesh.tensor=2", "--overwrite")
    assert result.returncode == 2
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-1500:]
    assert "splits axis 0 (size 1) over tensor = 2 devices" in error_lines[0]
    assert (workdir / "metrics.jsonl").read_text() == "{}\n"


def test_a_run_resumes_with_another_attention_kernel_or_from_before_the_field_existed(tmp_path):
    import json
    from configs import default
    from mtt_jax.run import workdir
    config = default.get_config("tiny")
    workdir.write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["attention_kernel"]  # a workdir written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config.attention_kernel = "xla"
    assert workdir.prepare(str(tmp_path), config)  # resumes: the same attention, up to float order
    config.dtype = "bfloat16"
    with pytest.raises(workdir.WorkdirError, match="fields: dtype"):
        workdir.prepare(str(tmp_path), config)
