"""What forgotten pairs have already cost: the device's privacy record (``privacy_record.json``).

``fedpersona feedback forget`` deletes the user's pairs, private adapter and ledger. Without a record,
importing the same pairs again would start a fresh ledger, and their cost would start over although
the server has already seen updates computed from them. So ``forget`` first *retires* the ledger here:
the phases it spent (noise multiplier, sample rate, steps) and keyed hashes of the pairs it covered,
never their text. A new ledger over pairs that appear in a retired entry starts with that entry's phases
as its prior (``PrivacyLedger.prior``): the epsilon the device reports never drops, and the new noise is
calibrated for what is left of the user's budget.

The hashes are HMAC-SHA256 under a random per-device salt kept in the same file, so they identify a pair
only on this device. A ledger that could not be read when it was retired is recorded as an unbounded
spend (epsilon infinite for those pairs): not knowing what was spent must never count as nothing spent.
The record is not deleted by ``forget`` (it holds no text); ``fedpersona feedback reset-budget`` says what
deleting it would mean.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

RECORD_FILE = "privacy_record.json"
RECORD_VERSION = 1
UNKNOWN_SPEND = [[0.0, 1.0, 1]]  # one noiseless release: epsilon infinite (an unreadable retired ledger)


class PrivacyRecord:
    """The retired ledgers of one device state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RECORD_FILE

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": RECORD_VERSION, "salt": secrets.token_hex(16), "retired": []}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{self.path}: the privacy record of forgotten pairs is unreadable ({err}); restore it "
                             "from a backup (deleting it would let forgotten pairs start a fresh budget)") from None
        if not (isinstance(data, dict) and isinstance(data.get("salt"), str) and isinstance(data.get("retired"), list)):
            raise UsageError(f"{self.path}: not a privacy record; restore it from a backup")
        return data

    @staticmethod
    def _hash(salt: str, pair: PreferencePair) -> str:
        text = json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False)
        return hmac.new(bytes.fromhex(salt), text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def retire(self, ledger: dict[str, Any] | None, pairs: Iterable[PreferencePair], *, readable: bool = True) -> None:
        """Record that ``ledger`` (its JSON object; None or unreadable -> unbounded spend) covered ``pairs``."""
        from fedpersona.io import atomic_write_json
        from fedpersona.privacy.ledger import PrivacyLedger

        data = self._load()
        hashes = sorted({self._hash(data["salt"], p) for p in pairs})
        if not hashes:
            return
        try:
            parsed = PrivacyLedger.from_json(ledger) if readable and ledger else None
        except UsageError:
            parsed = None  # malformed: recorded as an unbounded spend below
        if parsed is not None:
            phases = [[float(n), float(q), int(s)] for n, q, s in parsed.own_phases()]
            epsilon = parsed.spent_epsilon()  # with its prior: what these pairs had cost when forgotten
        elif readable and not ledger:
            return  # an empty ledger spent nothing
        else:
            phases, epsilon = UNKNOWN_SPEND, float("inf")
        if not phases:
            return  # nothing was spent on them
        data["retired"].append({"pairs": hashes, "phases": phases, "accountant": (ledger or {}).get("accountant", "rdp"),
                                "delta": float(parsed.delta) if parsed is not None else None,
                                "epsilon": "inf" if epsilon == float("inf") else epsilon,
                                "retired": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        atomic_write_json(self.path, data)

    def _covering(self, pairs: Iterable[PreferencePair]) -> list[dict[str, Any]]:
        """The retired entries whose pairs include any of ``pairs``."""
        if not self.path.exists():
            return []
        data = self._load()
        hashes = {self._hash(data["salt"], p) for p in pairs}
        return [entry for entry in data["retired"] if hashes.intersection(entry.get("pairs", ()))]

    def prior_for(self, pairs: Iterable[PreferencePair]) -> list[tuple[float, float, int]]:
        """Phases retired ledgers spent on any of ``pairs`` (every overlapping entry, composed)."""
        return self.spent_on(pairs)[0]

    def spent_on(self, pairs: Iterable[PreferencePair]) -> tuple[list[tuple[float, float, int]], float | None]:
        """``(prior_for(pairs), delta)``: the phases and the smallest delta their ledgers accounted at (None
        if none recorded one), the delta at which their epsilon is reported as those ledgers reported it."""
        entries = self._covering(pairs)
        deltas = [float(e["delta"]) for e in entries if e.get("delta")]
        phases = [(float(n), float(q), int(s)) for entry in entries for n, q, s in entry["phases"]]
        return phases, (min(deltas) if deltas else None)

    def entries(self) -> int:
        return len(self._load()["retired"]) if self.path.exists() else 0
