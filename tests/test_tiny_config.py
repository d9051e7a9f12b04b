"""The quick check the README offers, ``python -m mtt_jax.main --config configs/default.py:tiny``: its
console is the run's progress, not the libraries' INFO logs."""

import logging

import orbax.checkpoint
from absl import flags, logging as absl_logging

from mtt_jax import evaluation
from mtt_jax.run import cli


def test_library_info_lines_show_only_when_asked_for(monkeypatch):
    handler = absl_logging.get_absl_handler()

    def shown(path: str, level: int) -> bool:
        return bool(handler.filter(logging.LogRecord("absl", level, path, 1, "message", None, None)))

    orbax_module, own_module = orbax.checkpoint.__file__, evaluation.__file__
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 0)
    cli.quiet_library_logs()
    assert not shown(orbax_module, logging.INFO)
    assert shown(orbax_module, logging.WARNING) and shown(own_module, logging.INFO)
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)  # --verbosity=0 on the command line
    cli.quiet_library_logs()
    assert shown(orbax_module, logging.INFO)
