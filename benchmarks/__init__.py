"""dynft's benchmarks: each figure beside a baseline measured in the same run, reported as a ratio."""
