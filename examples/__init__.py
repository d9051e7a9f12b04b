"""Examples of using mtt_jax from your own code (run them from the repository root)."""
