"""The extension API (`mtt_jax.registry`): methods, sources with their tasks and model variants registered
from outside the library, refused when a name is taken or the interface does not fit, and the config's
``plugins`` (examples/plugin) imported before the config is checked, in a run whose weights follow the
plugin method's formula."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mtt_jax
from configs import default as default_config
from mtt_jax import data, registry, seed_runs, tasks as tasks_lib, weighting
from mtt_jax.models import variants
from mtt_jax.run import config_check, workdir


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Every registry a copy, and the plugin modules imported here forgotten afterwards: registrations
    in one test reach neither the next test nor the other modules run in this process."""
    for module, name in ((weighting, "METHODS"), (weighting, "DEFAULT_OPTIONS"), (weighting, "ADDED_METHODS"),
                         (data, "SOURCES"), (data, "AVAILABLE_TASKS"), (tasks_lib, "_REGISTRY"),
                         (variants, "VARIANTS")):
        monkeypatch.setattr(module, name, type(getattr(module, name))(getattr(module, name)))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "examples" or name.startswith(("examples.", "broken_plugin")):
            del sys.modules[name]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


class HalfWeights(mtt_jax.WeightingMethod):
    """``L = scale * sum_t L_t``."""
    name = "half_weights"

    def __init__(self, num_tasks: int, scale: float = 0.5):
        super().__init__(num_tasks)
        self.scale = scale

    def combine(self, params, state, losses_T, step, rng=None):
        weights_T = jnp.full((self.num_tasks,), self.scale, jnp.float32)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


def test_import_mtt_jax_is_cheap_and_exports_the_api():
    code = "import sys, mtt_jax; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert mtt_jax.register_method is weighting.register_method
    assert mtt_jax.register_source is data.register_source
    assert mtt_jax.register_model_variant is variants.register_variant
    assert mtt_jax.TaskSpec is tasks_lib.TaskSpec and mtt_jax.Source is data.Source
    with pytest.raises(AttributeError):
        mtt_jax.no_such_name  # noqa: B018


def test_a_registered_method_is_a_config_choice_with_its_options_block():
    mtt_jax.register_method("half_weights", HalfWeights)
    assert weighting.DEFAULT_OPTIONS["half_weights"] == {"scale": 0.5}
    config = default_config.get_config("tiny")
    config.weighting.name = "half_weights"
    config_check.validate(config, jax.device_count())  # imports no plugin; adds the options block
    assert config.weighting.half_weights.to_dict() == {"scale": 0.5}
    config.weighting.half_weights.scale = 0.25
    method = weighting.make_method(config.weighting, 2)
    total, weights, _ = method.combine({}, {}, jnp.array([1.0, 3.0]), jnp.int32(0))
    assert float(total) == 1.0 and np.allclose(weights, 0.25)
    config.weighting.half_weights.scal = 1.0
    with pytest.raises(config_check.ConfigError, match="unknown option.*weighting.half_weights.scal"):
        config_check.validate(config, jax.device_count())
    # A factory: a built-in method with other defaults, under a new name.
    cagrad = weighting.METHODS["cagrad"]
    mtt_jax.register_method("cagrad_strong", lambda num_tasks, c=0.9: cagrad(num_tasks, c=c))
    assert weighting.make_method(ml_collections.ConfigDict({"name": "cagrad_strong"}), 3).c == 0.9


def test_a_taken_name_or_a_method_that_does_not_fit_is_refused_in_one_line():
    mtt_jax.register_method("half_weights", HalfWeights)
    mtt_jax.register_method("half_weights", HalfWeights)  # the same object again: a second import
    with pytest.raises(ValueError) as error:
        mtt_jax.register_method("ew", type("EW2", (HalfWeights,), {"name": "ew"}))
    assert "'ew' is already registered" in one_line(error)
    mtt_jax.register_method("ew", type("EW2", (HalfWeights,), {"name": "ew"}), replace=True)
    assert weighting.METHODS["ew"].__name__ == "EW2"

    class NoCombine(mtt_jax.WeightingMethod):
        name = "no_combine"

    class GramWithoutHook(mtt_jax.WeightingMethod):
        name = "gram_without_hook"
        requires = "gram"

    refused = {
        ("no_combine", NoCombine): "requires = 'losses' but does not implement combine",
        ("gram_without_hook", GramWithoutHook): "does not implement gram_weights",
        ("other_name", HalfWeights): "has name = 'half_weights'; set the class attribute name = 'other_name'",
        ("not_a_method", dict): "is not a subclass of mtt_jax.weighting.WeightingMethod",
        ("rep_grad", HalfWeights): "cannot name a config.weighting.<name> block",
        ("needs_c", lambda num_tasks, c: None): "option\\(s\\) c have no default",
    }
    for (name, method), expected in refused.items():
        with pytest.raises(ValueError, match=expected) as error:
            mtt_jax.register_method(name, method)
        one_line(error)
        assert name not in weighting.METHODS or name == "rep_grad"
    mtt_jax.register_method("returns_a_number", lambda num_tasks: 3)  # a factory is checked when built
    with pytest.raises(ValueError, match="its factory returned int, not a WeightingMethod"):
        weighting.make_method(ml_collections.ConfigDict({"name": "returns_a_number"}), 2)


def test_a_registered_source_serves_its_tasks_and_a_taken_name_or_task_is_refused():
    from examples.plugin.my_source import NoisySums  # registers noisy_sums, sum_sign and half_sum
    assert data.SOURCES["noisy_sums"] is NoisySums
    assert data.AVAILABLE_TASKS["noisy_sums"] == ("sum_sign", "half_sum")
    assert tasks_lib.get("sum_sign").source == "noisy_sums" and tasks_lib.get("half_sum").kind == "regression"
    assert data.source_options("noisy_sums") == ("num_features", "noise", "num_eval_examples")
    source = data.make_source("noisy_sums", ["half_sum"], seed=3, num_features=4)
    batch = source.train_batch(5, 8)
    assert batch["inputs"].shape == (8, 4) and list(batch["labels"]) == ["half_sum"]
    np.testing.assert_array_equal(source.train_batch(5, 8, shard=(1, 2))["inputs"], batch["inputs"][4:])

    spec = tasks_lib.TaskSpec("sum_sign", "classification", num_classes=2)
    with pytest.raises(ValueError) as error:
        mtt_jax.register_source("noisy_sums", type("Other", (NoisySums,), {}), tasks=[spec])
    assert "'noisy_sums' is already registered" in one_line(error)
    refused = {
        "uses_left_digit": ({"all_task_names": ("left_digit",)}, [],
                            "already served by data source 'multidigits'"),
        "lacks_a_spec": ({"all_task_names": ("unspecified",)}, [], "task 'unspecified' has no TaskSpec"),
        "aligned_single": ({"all_task_names": ("aligned_task",), "aligned_rows": True},
                           [tasks_lib.TaskSpec("aligned_task", "regression")], "only the multi-input layout"),
        "bad_layout": ({"all_task_names": ("t",), "layout": "flat"}, [], "layout = 'flat'"),
    }
    for name, (attributes, specs, expected) in refused.items():
        cls = type(name, (NoisySums,), {"name": name, **attributes})
        with pytest.raises(ValueError, match=expected) as error:
            mtt_jax.register_source(name, cls, tasks=specs)
        one_line(error)
        assert name not in data.SOURCES

    class PositionalOption(NoisySums):
        name = "positional_option"

        def __init__(self, task_names, seed, noise=0.5):
            super().__init__(task_names, seed, noise=noise)
    with pytest.raises(ValueError, match=r"must be \(task_names, seed, \*, option=default, ...\)"):
        mtt_jax.register_source("positional_option", PositionalOption)
    with pytest.raises(ValueError, match="leaves abstract methods unimplemented: eval_batches"):
        mtt_jax.register_source("abstract", type("abstract", (data.Source,), {
            "name": "abstract", "layout": "single", "all_task_names": ("x",), "train_batch": None,
            "num_examples": None}))


def test_a_registered_model_variant_is_built_by_name():
    class WideBottom(variants.SharedBottomMLP):
        bottom_units: tuple = (256,)

    mtt_jax.register_model_variant("wide_bottom", WideBottom)
    mtt_jax.register_model_variant("wide_bottom", WideBottom)  # the same object again
    specs = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
    model = variants.build_variant("wide_bottom", specs, tower_units=())
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 64)))["params"])
    assert params["trunk"]["dense_0"]["kernel"].shape == (64, 256)
    for name, builder, expected in (
            ("wide_bottom", variants.MultiGateMoE, "'wide_bottom' is already registered"),
            ("dense", nn.Dense, "lacks encode\\(\\), decode"),
            ("no_tasks", lambda units: None, "takes no keyword argument tasks")):
        with pytest.raises(ValueError, match=expected) as error:
            mtt_jax.register_model_variant(name, builder)
        one_line(error)
    mtt_jax.register_model_variant("wide_bottom", variants.MultiGateMoE, replace=True)
    assert isinstance(variants.build_variant("wide_bottom", specs), variants.MultiGateMoE)


def test_the_example_plugin_trains_with_weights_proportional_to_the_losses():
    from examples.plugin import config as example_config
    config = example_config.get_config("tiny")  # imports the plugins: their names exist from here on
    assert config.weighting.loss_proportional.to_dict() == {"min_loss": 1e-8}
    config_check.validate(config, jax.device_count())

    # One step by hand: losses (1, 3) give weights (1/4, 3/4), a total of 1/4 + 9/4 = 2.5, and the
    # gradient of the total with respect to the losses is the weights (they are held constant).
    method = weighting.make_method(config.weighting, 2)
    total, weights, _ = method.combine({}, {}, jnp.array([1.0, 3.0]), jnp.int32(0))
    np.testing.assert_allclose(weights, [0.25, 0.75])
    assert float(total) == pytest.approx(2.5)
    grad = jax.grad(lambda losses: method.combine({}, {}, losses, jnp.int32(0))[0])(jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(grad, [0.25, 0.75])

    config.total_steps = 3
    runs = seed_runs.train_seeds(config, [0], log_every=1)
    assert runs.task_names == ["sum_sign", "half_sum"]
    losses_NxT, weights_NxT = runs.curve_losses[:, 0], runs.curve_weights[:, 0]
    assert losses_NxT.shape == (3, 2) and np.all(losses_NxT > 0)
    np.testing.assert_allclose(weights_NxT, losses_NxT / losses_NxT.sum(1, keepdims=True), rtol=1e-5)
    assert 0.0 <= runs.final[0]["sum_sign/accuracy"] <= 1.0


def test_a_plugin_that_does_not_import_stops_the_command_before_any_work(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mtt_jax.main", "--config=configs/default.py:tiny",
         f"--workdir={tmp_path / 'run'}",
         "--config.plugins=('examples.plugin.my_methods', 'no_such_plugin_module')"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "error: plugins: importing 'no_such_plugin_module' failed: ModuleNotFoundError: No module named "
        "'no_such_plugin_module' (install its package, or put the folder that holds it on PYTHONPATH)")
    assert not (tmp_path / "run").exists()


def test_a_plugin_that_fails_while_importing_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text(
        "import mtt_jax\nfrom mtt_jax.weighting.loss_based import EqualWeighting\n"
        "mtt_jax.register_method('ew', type('EW3', (EqualWeighting,), {}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = default_config.get_config("tiny")
    config.plugins = ("broken_plugin",)
    with pytest.raises(config_check.ConfigError) as error:
        config_check.validate(config, jax.device_count())
    assert one_line(error).startswith("plugins: importing 'broken_plugin' failed: ValueError: weighting "
                                      "method 'ew' is already registered")
    with pytest.raises(ValueError, match=r"plugins='broken_plugin' must be a tuple"):  # before any import
        registry.import_plugins("broken_plugin")


def test_plugins_are_part_of_the_run_identity_and_runs_from_before_the_field_resume(tmp_path):
    config = default_config.get_config("tiny")
    old = workdir.config_dict(config)
    del old["plugins"]  # config.json as code without the field wrote it
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert workdir.prepare(str(tmp_path), config)  # resumed: no plugins does what no field did
    config.plugins = ("examples.plugin.my_methods",)
    with pytest.raises(workdir.WorkdirError, match=r"different config \(fields: plugins\)"):
        workdir.prepare(str(tmp_path), config)
