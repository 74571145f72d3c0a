"""Benchmarks, side by side with the tool a user would pick instead (not tests).

``python -m bench SUITE [--quick] [--json FILE]``; one module per suite in
``bench/``, each exposing ``run(quick: bool) -> list[Metric]``. A suite with
``SECTIONS`` (a tuple of names) takes ``run(quick, sections=...)`` too: the ones
``--only``/``--skip`` leave (default: all).
"""
