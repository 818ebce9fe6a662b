"""Pair-level differential privacy: DP-SGD per preference pair, accountants, the per-user ledger.

- ``accountant``: epsilon / noise for Poisson-subsampled Gaussian DP-SGD (RDP, PRV), over a history.
- ``ledger``: ``PrivacyLedger`` (noise calibrated once per user, phases spent, JSON for client state).
- ``dp_training``: ``train_local_dp`` (Opacus hooks, joint clipping of shared + private adapters).
- ``calculator``: pure functions behind ``fedpersona privacy``.

``dp_training`` imports torch and the trainer; import it explicitly. The light parts are re-exported.
"""

from fedpersona.privacy.accountant import epsilon, epsilon_of_history, noise_for_epsilon, sample_rate_for
from fedpersona.privacy.ledger import PrivacyLedger, default_delta

__all__ = ["PrivacyLedger", "default_delta", "epsilon", "epsilon_of_history", "noise_for_epsilon", "sample_rate_for"]
