"""Several worker processes: the supervisor, the worker contract, and merging workers' metrics."""
