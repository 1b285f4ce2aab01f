"""Benchmarks: adabatch against fixed batch sizes, a hand-written heuristic and its peers.

Run ``python -m benchmarks.run --suite quick`` (see :mod:`benchmarks.run`). The training loops
live in :mod:`benchmarks.loops` (plain PyTorch baselines and the adabatch loop that mirrors them)
and :mod:`benchmarks.peers` (fairscale AdaScale, AdaptDL); :mod:`benchmarks.report` turns the
results JSON into tables and plots.
"""
