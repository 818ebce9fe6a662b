"""Secure aggregation (SecAgg+): the server learns the sum of the round's contributions, not one of them.

Why: every device's shared-adapter update would otherwise reach the server readable, and
gradient-inversion attacks recover training text from LoRA updates. This package is the protocol's
Flower-free core (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020): pure state machines over plain-dict messages, to be carried by Flower's Message API.

Modules: ``crypto`` (X25519, HKDF-SHA256, AES-GCM from ``cryptography``), ``shamir`` (t-of-n sharing
over GF(2^521 - 1)), ``masks`` (AES-CTR mask expansion of full 32-byte keys; vectors mod 2^b),
``quantize`` (L2 clip, capped weight, unbiased stochastic rounding into a no-wrap modulus), ``graph``
(the sparse Harary graph and the threshold), ``messages``, ``client``, ``server`` and ``protocol`` (the
stages), ``local`` (a whole round in one process).

Threat model implemented:

* **Honest-but-curious server** (it follows the protocol and tries to learn from what it sees), possibly
  colluding with some users: it learns only the sum of the surviving users' encoded contributions (and
  who survived), provided the colluders are fewer than t in every neighbourhood (else they rebuild a
  user's secrets) and the honest users' subgraph stays connected (the server learns the sum of each of
  its components: an honest user whose neighbours all collude is exposed). Each masked vector alone is
  uniform mod 2^b; ciphertexts are opaque to the server; for each user it receives the shares of only
  one of its two secrets. The degree k makes the connectivity likely (Bell et al.); a device may also
  refuse rounds giving it too few neighbours (``Client(min_neighbours=...)``).
* **Malicious users**: a user's ciphertexts and shares are authenticated (AES-GCM with associated
  data; the self-mask seed is committed; a reconstructed mask key must match the advertised public
  key), so a corrupted share makes the round fail cleanly instead of yielding a wrong sum. A malicious
  user can still send any integers as its contribution: honest devices bound themselves
  (``quantize``), and the server checks the *sum* (finite by construction, within n times the bound),
  so one malicious user can move the sum anywhere within that bound, no further; it can also make the
  round fail by sending corrupted shares (denial of service). Per-user range proofs are out of scope.
* **What a malicious server could do that this does not stop**: lie about who dropped out to obtain,
  for one user, the shares of both its self-mask seed and its mask key. Honest users never reveal both
  for one user, and the threshold is a majority of each closed neighbourhood, so two disjoint sets of
  honest holders cannot both reach it: with c colluding holders in a neighbourhood of m, t > (m + c) / 2
  resists them (``graph``; the default smallest majority resists c = 0, or 1 when m is even: raise t
  to resist more, at the cost of tolerating fewer dropouts). Without the consistency-check round of Bonawitz et al. (signatures over the
  survivor list, a PKI) a malicious server may still send different users different views, and it
  chooses the graph and can fill a victim's neighbourhood with sybils or simulate users: a
  sybil-controlled server, and a server that drops all but one honest user (``min_survivors`` only
  bounds the sum's size from the server's own honest code), are out of scope.

Cost per user and round (k neighbours, d coordinates): 2 X25519 key generations, 3k agreements (the
encryption key of each pair is derived when sending and again when receiving, so no key is kept in
the state; one mask key per pair), 2 Shamir splits into k + 1 shares (O(k t) field operations), k AES-GCM
encryptions and decryptions of 156 bytes, and k + 1 mask expansions of d coordinates (AES-CTR, 8 bytes
per coordinate) plus as many vector additions: O(k d). The server: O(n d) to sum and remove self masks,
O(k d) per dropout, O(n t^2) for the Lagrange interpolations. Figures: ``benchmarks/secagg_core.py``.
"""

from __future__ import annotations

from fedpersona.secagg.client import Client
from fedpersona.secagg.errors import ProtocolError, RoundFailed
from fedpersona.secagg.graph import default_degree, default_threshold, harary_graph
from fedpersona.secagg.local import RoundStats, run_round
from fedpersona.secagg.quantize import QuantizationPlan
from fedpersona.secagg.server import RoundResult, Server

__all__ = [
    "Client",
    "ProtocolError",
    "QuantizationPlan",
    "RoundFailed",
    "RoundResult",
    "RoundStats",
    "Server",
    "default_degree",
    "default_threshold",
    "harary_graph",
    "run_round",
]
