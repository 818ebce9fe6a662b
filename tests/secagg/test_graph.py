"""The SecAgg+ Harary graph and the majority threshold (fedpersona.secagg.graph)."""

from __future__ import annotations

import pytest

from fedpersona.errors import UsageError
from fedpersona.secagg.graph import (
    check_threshold,
    default_degree,
    default_threshold,
    harary_graph,
)


def _connected(graph: dict[int, tuple[int, ...]]) -> bool:
    start = next(iter(graph))
    seen, frontier = {start}, [start]
    while frontier:
        for v in graph[frontier.pop()]:
            if v not in seen:
                seen.add(v)
                frontier.append(v)
    return len(seen) == len(graph)


@pytest.mark.parametrize("n", [10, 16, 50, 200, 1000])
def test_graph_is_symmetric_regular_and_connected(n):
    users = [1000 + 3 * i for i in range(n)]
    graph = harary_graph(users, seed=b"s")
    k = default_degree(n)
    assert set(graph) == set(users)
    for u, neighbours in graph.items():
        assert len(neighbours) == k and u not in neighbours and list(neighbours) == sorted(set(neighbours))
        assert all(u in graph[v] for v in neighbours)
    assert _connected(graph)


def test_degree_is_logarithmic_and_small_cohorts_are_complete():
    assert [default_degree(n) for n in (2, 3, 8, 10, 50, 200, 1000)] == [1, 2, 7, 9, 18, 24, 30]
    for n in range(2, 11):
        graph = harary_graph(range(n))
        assert all(len(v) == n - 1 for v in graph.values())  # plain SecAgg
    assert all(len(v) == 4 for v in harary_graph(range(20), degree=3, seed=b"x").values())  # odd k rounded up


def test_graph_is_seeded_and_random_labelled():
    users = list(range(100))
    assert harary_graph(users, seed=b"a") == harary_graph(users, seed=b"a")
    assert harary_graph(users, seed=b"a") != harary_graph(users, seed=b"b")
    ring = harary_graph(users, seed=b"a")
    assert any(abs(u - v) > 20 for u in users for v in ring[u])  # neighbours are not id-adjacent


def test_threshold_is_the_smallest_majority_of_the_closed_neighbourhood():
    for k in range(1, 40):
        t = default_threshold(k)
        assert 2 * t > k + 1 and 2 * (t - 1) <= k + 1 and t <= k + 1
        assert check_threshold(t, k) == t
        with pytest.raises(UsageError, match="majority"):
            check_threshold((k + 1) // 2, k)  # a minority would let a lying server unmask
        with pytest.raises(UsageError):
            check_threshold(k + 2, k)


def test_bad_graph_parameters_are_refused():
    with pytest.raises(UsageError):
        harary_graph([1])
    with pytest.raises(UsageError):
        harary_graph([1, 1, 2])
    with pytest.raises(UsageError):
        harary_graph(range(10), degree=0)
    with pytest.raises(UsageError):
        default_degree(1)
