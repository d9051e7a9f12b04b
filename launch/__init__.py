"""Launchers for mtt_jax: Cloud TPU VMs, SLURM GPU clusters and local multi-process runs."""
