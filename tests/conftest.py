"""Every test process simulates 8 CPU devices, so sharded code paths run in every test."""

import os

import pytest

from mtt_jax.perf import huge_pages

# The suite's cost is compiling, not running, its tiny programs: LLVM's cheaper pipeline compiles them
# about 30% faster (a cold test_zoo subset: 45 s -> 32 s), and XLA's older elemental emitters instead of
# its fusion emitters (which lower each fusion through MLIR first) cut a train step's compile to a third
# (a PCGrad step on 8 devices: 8.9 -> 2.5 CPU-seconds). Test processes only; subprocesses inherit them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test subprocesses (CLI, resume, multi-process) compile the same programs again: share a persistent
# compilation cache between them so each program compiles once per test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mtt_jax_test_compilation_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# pytest-xdist starts its workers after reading this file: they start with host allocations on huge
# pages, as the command lines do (`mtt_jax.perf.huge_pages`; test_zoo.py with a warm compilation cache: 57
# -> 50 s). The command-line subprocesses then find the tunable set and do not re-execute.
os.environ.update(huge_pages.this_machine_environment() or {})

# pytest-xdist hands whole modules to its two workers in collection order, so a long module collected
# last leaves one worker alone at the end. The longest ones go first (longest-processing-time-first
# scheduling); the others keep their order, and every module's tests keep theirs.
LONGEST_MODULES = ("test_zoo.py", "test_experiments.py", "test_scale.py", "test_flops.py", "test_mechanisms.py",
                   "test_resilience.py", "test_models.py", "test_faults.py", "test_cli.py", "test_splits.py",
                   "test_bucket_workdir.py", "test_train.py", "test_flat_mixture.py")


# The slow tier: tests that repeat, for more cases, a behaviour the default tier already checks (every
# weighting method trained sharded, where one method of each kind runs by default; every mesh shape;
# every experiment at --tiny; the second and third interruption scenario), so that the README's test
# command fits CI's budget on two cores. `pytest tests --slow` runs them too (about twice the CPU time);
# run it before a release and after changing what these cover. An entry that names no test fails the
# collection, so the list cannot silently go stale. Entries: "module::test" (every case of it) or
# "module::test[case]".
ZOO_METHODS_BY_DEFAULT = ("famo", "pcgrad", "nash_mtl", "moco")
SLOW = (
    # weighting methods: one of each kind by default (loss-based with state, Gram, Gram with a solver,
    # state shaped like the parameters); the sampled Gram trains sharded in test_scale, the lookahead
    # (Auto-Lambda) in test_auto_lambda
    "test_zoo.py::test_method_trains_sharded_without_diverging[*]",
    "test_scale.py::test_eight_devices_match_one_device[8-1-1]",
    "test_scale.py::test_scanned_layers_on_a_mesh_shard_like_the_unrolled_blocks_and_step_the_same",
    "test_per_block.py::test_a_resumed_run_keeps_the_per_group_state",
    "test_per_block.py::test_sampled_gram_methods_group_their_cross_grams",
    "test_per_block.py::test_one_group_is_the_whole_encoder_path_exactly[gradvac]",
    "test_per_block.py::test_each_group_gets_the_method_of_its_own_gram_by_hand[upgrad]",
    "test_per_block.py::test_every_gram_and_double_sampling_method_runs_per_block",
    "test_scale.py::test_data_parallel_step_splits_the_work_and_reduces_once[gls]",
    "test_scale.py::test_data_parallel_step_splits_the_work_and_reduces_once[modo]",
    "test_scale.py::test_grad_accumulation_equals_one_big_step_for_methods_that_weigh_by_the_losses[dwa]",
    "test_scale.py::test_grad_accumulation_equals_one_big_step_for_methods_that_weigh_by_the_losses[imtl]",
    "test_scale.py::test_double_sampling_takes_three_strided_samples_of_the_batch[1]",
    "test_train_step.py::test_a_non_finite_step_changes_nothing_but_its_counters[db_mtl]",
    "test_train_step.py::test_a_non_finite_step_changes_nothing_but_its_counters[gradvac]",
    "test_train_step.py::test_a_non_finite_step_changes_nothing_but_its_counters[dwa]",
    "test_train_step.py::test_a_non_finite_step_changes_nothing_but_its_counters[uncertainty]",
    # experiments at --tiny: the zoo (and its flags) and gradnorm_toy by default; every experiment's
    # report is also rendered from archived runs (test_results_archive)
    "test_experiments.py::test_task_mechanisms",
    "test_experiments.py::test_mmoe_correlation",
    "test_experiments.py::test_pareto_toy",
    "test_experiments.py::test_multimnist",
    "test_experiments.py::test_task_attention",
    "test_experiments.py::test_task_grouping_recovers_the_pairs",
    "test_experiments.py::test_runner_matches_the_training_loop",
    "test_experiments.py::test_weighting_zoo_resumes_an_interrupted_run",
    # interruptions: SIGKILL and SIGTERM by default
    "test_resilience.py::test_interruptions_lose_no_record_eval_or_affinity_measurement",
    "test_resilience.py::test_two_processes_resume_a_damaged_run_and_match_one_process_with_eight_devices",
    "test_bucket_workdir.py::test_a_run_killed_on_a_bucket_resumes_with_every_record_it_had_checkpointed",
    "test_faults.py::test_a_full_disk_is_one_line_and_the_same_command_resumes",
    "test_multihost_faults.py::test_a_locked_workdir_stops_both_processes_with_the_same_line_at_once",
    # the benchmark command's variants (its FLOPs formula and one-host, two-host runs stay)
    "test_flops.py::test_benchmark_compares_attention_kernels_and_layer_scans_and_refuses_bad_variants",
    "test_flops.py::test_benchmark_command_compares_dtypes_side_by_side",
    "test_flops.py::test_the_benchmark_runs_on_two_hosts_and_process_0_reports",
    "test_platforms.py::test_the_sharded_step_lowers_without_host_calls[tpu]",
    "test_platforms.py::test_the_benchmark_reads_cudnn_and_every_matmul_of_a_multi_device_step[tpu]",
    # more configurations of what a first case checks
    "test_train.py::test_short_run_learns",
    "test_train.py::test_bf16_run_tracks_the_f32_run",
    "test_tfds_configs.py::test_glue_tiny_trains_and_reports_glue_metrics[temperature]",
    "test_flat_mixture.py::test_a_flat_row_gets_what_the_multi_input_forward_gives_its_example[options1]",
    "test_flat_mixture.py::test_a_flat_row_gets_what_the_multi_input_forward_gives_its_example[options2]",
    "test_variants.py::test_transformer_with_task_moe_in_both_layouts[configs.default]",
    "test_mechanisms.py::test_aligned_task_attention_trains_on_an_aligned_batch[mgda]",
    "test_mechanisms.py::test_additive_task_encoder_trains_on_multidigits[mgda]",
    "test_mechanisms.py::test_task_encoder_true_is_each_layouts_own_form",
    "test_mechanisms.py::test_attention_pool_trains_on_seqtasks_multi_input",
    "test_mechanisms.py::test_attention_pool_models_start_as_the_mean_readout_and_learn_per_task_queries[multi-True]",
    "test_mechanisms.py::test_the_flops_formula_counts_the_attention_pools[seqtasks]",
    "test_splits.py::test_a_training_run_scores_the_configs_eval_split",
    "test_adapters.py::test_a_frozen_encoder_step_changes_only_the_trained_parameters[hyper]",
    "test_cli.py::test_bad_config_exits_before_any_work[--config.weighting.weights*",
    "test_cli.py::test_bad_config_exits_before_any_work[--config.total_steps*",
    "test_cli.py::test_bad_config_exits_before_any_work[--config.mesh.data*",
    "test_cli.py::test_bad_config_exits_before_any_work[--config.model.task_attention*",
    "test_cli.py::test_bad_config_exits_before_any_work[--config.attention_kernel*",
    "test_cli.py::test_a_workdir_the_run_could_not_keep_exits_before_any_work[unknown_scheme]",
    "test_cli.py::test_a_workdir_the_run_could_not_keep_exits_before_any_work[file]",
)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tier (tests/conftest.py SLOW): the whole suite")


def _is_slow(item) -> tuple[bool, str | None]:
    """Whether ``item`` is in the slow tier, and the entry that put it there."""
    name = f"{item.path.name}::{item.name}"
    if name.startswith("test_zoo.py::test_method_trains_sharded_without_diverging["):
        method = item.callspec.params["name"]
        return method not in ZOO_METHODS_BY_DEFAULT, SLOW[0]
    for entry in SLOW[1:]:
        if name == entry or name.split("[")[0] == entry or (entry.endswith("*") and name.startswith(entry[:-1])):
            return True, entry
    return False, None


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    tiers = [(item, *_is_slow(item)) for item in items]
    collected = {item.path.name for item in items}
    stale = [e for e in SLOW if e.split("::")[0] in collected and e not in {entry for _, _, entry in tiers}]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names no collected test: {stale[0]}")
    if not config.getoption("--slow"):
        slow = [item for item, is_slow, _ in tiers if is_slow]
        items[:] = [item for item, is_slow, _ in tiers if not is_slow]
        config.hook.pytest_deselected(items=slow)


@pytest.fixture
def cudnn_probes_stubbed(monkeypatch):
    """JAX's cuDNN version and compute-capability probes answer as on a recent GPU, so that a model
    with the cuDNN kernel lowers for CUDA on this CPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda capability: False)
