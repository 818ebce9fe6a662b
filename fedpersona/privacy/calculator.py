"""Pure functions behind ``fedpersona privacy``: epsilon for a noise level, or noise for a target epsilon.

Both reports are flat dicts with stable keys (the ``--json`` output) and the same key set:
``mode`` ("epsilon" or "noise"), ``accountant``, ``noise_multiplier``, ``sample_rate``, ``steps``,
``delta``, ``epsilon`` (what the noise reaches) and ``target_epsilon`` (null in epsilon mode).
Accounting: DP-SGD (Abadi et al., 2016) with RDP (Mironov, 2017) or PRV (Gopi et al., 2021) accountants,
see ``fedpersona.privacy.accountant``.
"""

from __future__ import annotations

from typing import Any

from fedpersona.privacy.accountant import epsilon, noise_for_epsilon

REPORT_KEYS: tuple[str, ...] = ("mode", "accountant", "noise_multiplier", "sample_rate", "steps", "delta",
                                "epsilon", "target_epsilon")


def epsilon_report(noise: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
                   ) -> dict[str, Any]:
    """Epsilon spent by ``steps`` DP-SGD steps with noise multiplier ``noise`` at ``sample_rate``."""
    eps = epsilon(noise, sample_rate, steps, delta, accountant)
    return _report("epsilon", accountant, noise, sample_rate, steps, delta, eps, None)


def noise_report(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
                 ) -> dict[str, Any]:
    """The noise multiplier that keeps ``steps`` steps at ``sample_rate`` within ``target_epsilon``."""
    noise = noise_for_epsilon(target_epsilon, delta, sample_rate, steps, accountant)
    eps = epsilon(noise, sample_rate, steps, delta, accountant)
    return _report("noise", accountant, noise, sample_rate, steps, delta, eps, float(target_epsilon))


def format_report(report: dict[str, Any]) -> str:
    """One human line for a report of either mode."""
    setting = (f"{report['accountant']} accountant, sample rate {report['sample_rate']:g}, "
               f"{report['steps']} steps, delta {report['delta']:g}")
    if report["mode"] == "noise":
        return (f"noise multiplier {report['noise_multiplier']:.4f} gives epsilon {report['epsilon']:.4f} "
                f"<= target {report['target_epsilon']:g} ({setting})")
    return f"epsilon {report['epsilon']:.4f} with noise multiplier {report['noise_multiplier']:g} ({setting})"


def _report(mode: str, accountant: str, noise: float, sample_rate: float, steps: int, delta: float,
            eps: float, target: float | None) -> dict[str, Any]:
    values = (mode, accountant, float(noise), float(sample_rate), int(steps), float(delta), float(eps), target)
    return dict(zip(REPORT_KEYS, values, strict=True))
