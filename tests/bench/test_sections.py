"""``python -m bench``'s sections: opt-in sections run only when named."""

from __future__ import annotations

import argparse

import pytest

from bench.__main__ import SUITES, _sections


def _chosen(only=None, skip=None, known=("a", "b", "big"), opt_in=("big",)):
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(only=only, skip=skip, suite="engine")
    return _sections(parser, args, known, opt_in)


def test_opt_in_sections_run_only_when_named():
    assert _chosen() == {"a", "b"}
    assert _chosen(only="big") == {"big"}
    assert _chosen(only="a,big") == {"a", "big"}
    assert _chosen(skip="a") == {"b"}
    with pytest.raises(SystemExit):
        _chosen(only="nope")


def test_engine_declares_its_real_sizes_opt_in_and_the_model_cache_is_no_suite():
    from bench import engine

    assert set(engine.OPT_IN) == {"sd15", "sdxl-base"} <= set(engine.SECTIONS)
    assert "realsize" not in SUITES and "engine" in SUITES


def test_cpu_declares_its_served_sd15_rows_opt_in_and_they_are_no_suite():
    from bench import cpu

    assert set(cpu.OPT_IN) == {"sd15"} <= set(cpu.SECTIONS)
    assert "served" not in SUITES and "cpu" in SUITES


def test_a_20_step_generation_is_estimated_from_a_warm_2_and_4_step_request():
    from bench.served import RUNS, _estimate_20

    assert RUNS[0][0] == "first"  # the first request carries one-time costs
    assert _estimate_20({"first": 99.0, "again": 10.0, "long": 14.0}) == pytest.approx(10.0 - 4.0 + 40.0)
    assert _estimate_20({"first": 9.0, "again": 5.0, "long": 4.0}) == 5.0  # noise: no negative step


def test_a_script_run_returns_its_last_marked_json_and_a_failure_says_so():
    from bench.report import run_script

    script = (
        "import json, sys\n"
        "print('X ' + json.dumps({'n': 1}))\n"
        "print('X ' + json.dumps({'n': int(sys.argv[1])}))"
    )
    assert run_script(script, ["2"], "X ", "the probe") == {"n": 2}
    with pytest.raises(RuntimeError, match="the probe failed"):
        run_script("raise SystemExit(3)", [], "X ", "the probe")
