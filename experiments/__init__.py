"""Paper reproductions, one module per table or figure (`python -m experiments.<name> --workdir DIR`).

Each writes ``DIR/table.md``, ``DIR/results.json`` and PNG plots; ``--quick`` runs in at most 10 minutes on
2 CPU cores; ``--help`` states the cost of the full run. Shared pieces: `common` (command line, tables,
plots), `toys` (on-device samplers of the synthetic sources), `delta_m` (the two delta-m conventions);
seeds are trained at once under ``jax.vmap`` by the training library (`mtt_jax.seed_runs`), which owns
every training loop and evaluation. Measured numbers beside the papers': RESULTS.md.
"""

EXPERIMENTS = ("mmoe_correlation", "gradnorm_toy", "pareto_toy", "multimnist", "weighting_zoo",
               "task_grouping", "task_attention", "task_mechanisms")
