"""Benchmarks, side by side with the tool a user would pick instead (not tests).

``python -m bench SUITE [--quick] [--json FILE]``; one module per suite in
``bench/``, each exposing ``run(quick: bool) -> list[Metric]``.
"""
