"""The SecAgg+ communication graph: each user paired with k = O(log n) others, and the share threshold t.

Why sparse (Bell et al., CCS 2020, Sec. 3-4): plain SecAgg (Bonawitz et al., CCS 2017) pairs every user
with every other, so each user does n - 1 key agreements, shares and mask expansions (O(n d) per user,
O(n^2) per round). SecAgg+ pairs a user only with its neighbours in a k-regular graph; the masks still
cancel in the total because every edge's mask is added by one end and subtracted by the other. We use
their construction: a Harary graph H(k, n) (users on a ring, each joined to the k/2 nearest on each side)
over a *random permutation* of the users, so which users are neighbours is not predictable from ids.
With k >= n - 1 (small cohorts) it is the complete graph, i.e. plain SecAgg.

The degree k: ``default_degree`` takes the even number at or above 3 log2 n (n = 10: complete; 50: 18;
200: 24; 1,000: 30). Bell et al. derive k from n, the tolerated fraction of corrupted users and of
dropouts, and the statistical security parameter; the guarantee (every honest user keeps enough honest,
live neighbours, and the honest subgraph stays connected so the server learns no partial sum) holds with
high probability only for k large enough for those fractions. Pass ``degree`` explicitly to follow their
bound for a given deployment; the default is a practical choice for honest-but-curious simulation.

The threshold t, counted over a user's closed neighbourhood (its k neighbours and itself, m = k + 1
share holders): every user Shamir-shares its self-mask seed b_u and its mask key s_u among them, t of
m needed to reconstruct. ``default_threshold`` is the smallest majority, t = floor(m / 2) + 1:

* **Security** (why a majority): an honest holder reveals, per user, the share of b_u (u survived) *or*
  of s_u (u dropped), never both. A server that lies about who dropped must collect t shares of each
  from two disjoint sets of honest holders, which needs 2 t <= m: impossible for t > m / 2. With c
  corrupted holders colluding with the server that becomes 2 (t - c) + c <= m, so t > (m + c) / 2
  resists c of them: raising t buys resistance to more colluders.
* **Robustness** (why not higher): a dropped user's s_u needs t of its k live neighbours, a survivor's
  b_u needs t live holders, so a neighbourhood tolerates m - t dropped holders (about half at the
  default; a user whose neighbourhood loses more makes the round fail cleanly, not silently).

``check_threshold`` refuses t <= m / 2 (it would let a lying server unmask) and t > m.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence

from fedpersona.errors import UsageError

__all__ = ["check_threshold", "default_degree", "default_threshold", "harary_graph"]

_DEGREE_FACTOR = 3  # k ~ 3 log2 n


def default_degree(num_users: int) -> int:
    """k for n users: the even number >= 3 log2 n, or n - 1 (the complete graph) when that is smaller.

    Args:
        num_users: n >= 2.

    Returns:
        k, 1 <= k <= n - 1.

    Raises:
        UsageError: n < 2 (secure aggregation of one user reveals its input).
    """
    if num_users < 2:
        raise UsageError(f"secure aggregation needs at least 2 users, got {num_users}")
    k = math.ceil(_DEGREE_FACTOR * math.log2(num_users))
    k += k % 2
    return min(k, num_users - 1)


def default_threshold(degree: int) -> int:
    """The smallest majority of a closed neighbourhood: t = floor((k + 1) / 2) + 1.

    Args:
        degree: k >= 1, a user's number of neighbours.

    Returns:
        t, with (k + 1) / 2 < t <= k + 1.
    """
    return (degree + 1) // 2 + 1


def check_threshold(threshold: int, degree: int) -> int:
    """Validate t against the closed neighbourhood size m = k + 1: m / 2 < t <= m.

    Args:
        threshold: t.
        degree: k.

    Returns:
        ``threshold``.

    Raises:
        UsageError: t <= m / 2 (a server lying about dropouts could reconstruct both secrets of a user)
            or t > m (nothing could ever be reconstructed).
    """
    m = degree + 1
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not m < 2 * threshold <= 2 * m:
        raise UsageError(f"secure aggregation: threshold={threshold!r} must be an integer in "
                         f"({m / 2:g}, {m}] for {degree} neighbours (a majority of the user and its "
                         f"neighbours); the default is {default_threshold(degree)}")
    return threshold


def harary_graph(users: Sequence[int], degree: int | None = None,
                 seed: bytes | None = None) -> dict[int, tuple[int, ...]]:
    """The SecAgg+ graph: a Harary graph H(k, n) over a seeded random permutation of ``users``.

    Args:
        users: the n >= 2 distinct user ids of the round.
        degree: k; default ``default_degree(n)``. k >= n - 1 gives the complete graph; an odd k below
            n - 1 is raised to the next even number (H(k, n) with odd k needs n even).
        seed: bytes seeding the permutation (the server draws it fresh per round: ``os.urandom(32)``,
            the default). The same users, degree and seed give the same graph.

    Returns:
        user -> its neighbours (sorted ids, itself excluded). Symmetric; every user has exactly k
        neighbours (min(k, n - 1)).

    Raises:
        UsageError: fewer than 2 users, duplicate users, or degree < 1.
    """
    members = list(users)
    n = len(members)
    if len(set(members)) != n:
        raise UsageError("secure aggregation: the round's users must be distinct")
    k = default_degree(n) if degree is None else degree
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"secure aggregation: degree={degree!r} must be an integer >= 1")
    if n < 2:
        raise UsageError(f"secure aggregation needs at least 2 users, got {n}")
    if k >= n - 1:
        return {u: tuple(sorted(v for v in members if v != u)) for u in members}
    k += k % 2
    if k >= n - 1:
        return {u: tuple(sorted(v for v in members if v != u)) for u in members}
    ring = sorted(members)
    random.Random(seed if seed is not None else os.urandom(32)).shuffle(ring)
    half = k // 2
    neighbours: dict[int, set[int]] = {u: set() for u in ring}
    for i, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(i + step) % n]
            neighbours[u].add(v)
            neighbours[v].add(u)
    return {u: tuple(sorted(neighbours[u])) for u in members}
