"""Benchmarks: measuring dsv2 beside its peers. Nothing in the library imports this package.

    common.py     what every benchmark shares: random checkpoints and token shards, timing
                  windows, the memory-bandwidth roofline, child processes, percentiles
    generate.py   `dsv2 bench` (= bench/generate.py): generation, dsv2's engine beside transformers
    children.py   the measuring child processes of `dsv2 bench` (one per engine and dtype)

The other entry scripts (`bench/train_step.py`, `bench/serve_load.py`, `bench/balance.py`)
live in the repository's `bench/` folder and use `common.py`. Measured figures, with their
date and CPU, are in the README.
"""
