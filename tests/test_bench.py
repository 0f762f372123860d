"""bench/linear.py's round orders: the balance its ratios rely on (bench/NOTES.md, run 193)."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_linear():
    # the module puts the repository root on sys.path (for svdq), which would let our nodes/
    # shadow ComfyUI's in the integration tests: restore it
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_linear",
                                                      os.path.join(ROOT, "bench", "linear.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path[:] = saved


@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_latin_orders_balanced(n):
    orders = _bench_linear().latin_orders(n)
    assert len(orders) == n and all(sorted(o) == list(range(n)) for o in orders)
    for pos in range(n):                                   # every method in every position once
        assert sorted(o[pos] for o in orders) == list(range(n))
    follows = [(o[i], o[i + 1]) for o in orders for i in range(n - 1)]
    assert len(set(follows)) == n * (n - 1)                # every ordered pair exactly once


def test_round_zero_is_the_single_pass_order():
    mod = _bench_linear()
    first = mod.latin_orders(len(mod.METHODS))[0]          # main() times in METHODS' order
    assert [mod.METHODS[j] for j in first] == ["bf16", "fp8", "r0", "r32"]
