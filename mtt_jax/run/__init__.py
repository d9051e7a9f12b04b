"""Run plumbing: the workdir and its lock (a lease on buckets), metrics writers, checkpoints,
summaries, input prefetching, multi-process agreement, the command lines' shared parts, and
the checks of a config (its fields, its memory) before any work."""
