"""SecAgg+ as two state machines exchanging plain messages: the protocol's entry point.

The round (Bonawitz et al. CCS 2017, Sec. 4; Bell et al. CCS 2020, sparse graph), four stages, each a
request from the server to every user still in the round and at most one reply per user:

1. ``setup``: the server sends each user its neighbours in the SecAgg+ graph, the threshold t, the
   vector length d and the modulus bits b; the user makes two fresh X25519 key pairs (``c``: encryption,
   ``s``: masks) and advertises both public keys.
2. ``share-keys``: the server sends each user its neighbourhood's public keys; the user Shamir-shares
   its fresh self-mask seed b_u and its ``s`` private key among the holders (its neighbours and itself,
   t of them needed), encrypts each holder's two shares under their agreed ``c`` key (AES-GCM bound to
   round, stage, sender, receiver) and commits to b_u.
3. ``masked-input``: the server routes the ciphertexts; the user adds to its encoded input its self
   mask (from b_u) and, for every neighbour whose shares arrived, the pairwise mask (from the ``s``
   agreement), + when its id is smaller, - otherwise, mod 2^b.
4. ``unmask``: the server names, among the users whose shares each survivor holds, who survived and who
   dropped; the survivor returns its b shares of survivors and its s shares of dropouts, never both for
   one user. The server reconstructs, removes every survivor's self mask and the pairwise masks between
   dropouts and survivors, and has the exact sum mod 2^b of the survivors' inputs.

``Client`` (``fedpersona.secagg.client``) and ``Server`` (``fedpersona.secagg.server``) carry the rules;
message keys live in ``fedpersona.secagg.messages``; ``fedpersona.secagg.local.run_round`` drives a
whole round in one process.
"""

from __future__ import annotations

from fedpersona.secagg.client import Client
from fedpersona.secagg.errors import ProtocolError, RoundFailed
from fedpersona.secagg.messages import MASKED_INPUT, SETUP, SHARE_KEYS, STAGES, UNMASK
from fedpersona.secagg.server import RoundResult, Server

__all__ = [
           "MASKED_INPUT",
           "SETUP",
           "SHARE_KEYS",
           "STAGES",
           "UNMASK",
           "Client",
           "ProtocolError",
           "RoundFailed",
           "RoundResult",
           "Server",
]
