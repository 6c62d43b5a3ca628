"""The node process: Trio control loop, worker pool, diskcache store."""
