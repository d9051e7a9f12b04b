"""A plugin: a weighting method (`my_methods`) and a data source with its tasks (`my_source`) registered
from outside the library, and a config that uses them through ``config.plugins`` (`config`).
docs/extending.md walks through it."""
