"""The one exception of secure aggregation: a message or a round that breaks the protocol.

Kept apart from ``fedpersona.errors.UsageError`` on purpose: a ``ProtocolError`` is about what a *peer*
sent (a forged or late message, a ciphertext that fails authentication, too few shares to reconstruct),
never about the operator's settings, and the caller decides whether it drops one message or fails the
round. Its text names the stage, the user and the rule broken, and never carries key material or data.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A message that breaks the secure-aggregation protocol, or a round that cannot complete.

    Raised for: a message of the wrong stage or round, an unknown or duplicate sender, wrong lengths or
    types, a ciphertext or share that fails its check, a request that would reveal both secrets of one
    user, and a round where fewer than the threshold of a user's neighbours answered.
    """


class RoundFailed(ProtocolError):
    """The round cannot complete: too few users left, or too few shares to remove someone's masks.

    Distinct from a refused message (a plain ``ProtocolError``, after which the round goes on without
    that message): after ``RoundFailed`` the server's round is over and yields no sum.
    """
