"""A run written before a config field existed resumes after an upgrade when the field keeps the value
that does what its absence did (`mtt_jax.run.workdir.ADDED_FIELDS`), and only then."""

import json

import pytest

from configs import default as default_config
from mtt_jax.run import workdir


def write_old_run(path, config):
    """``config.json`` as code before every `ADDED_FIELDS` entry wrote it, and one metrics record."""
    old = workdir.config_dict(config)
    for *parents, name in workdir.ADDED_FIELDS:
        node = old
        for key in parents:
            node = node[key]
        del node[name]
    (path / "config.json").write_text(json.dumps(old))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')


def test_a_run_from_before_eval_split_resumes_at_the_old_behaviour_only(tmp_path):
    config = default_config.get_config("tiny")
    assert config.data.eval_split == workdir.ADDED_FIELDS[("data", "eval_split")]
    write_old_run(tmp_path, config)
    assert workdir.prepare(str(tmp_path), config)                      # resumed
    config.data.eval_split = "validation"
    with pytest.raises(workdir.WorkdirError, match=r"different config \(fields: data\)"):
        workdir.prepare(str(tmp_path), config)
