"""Which aggregation strategies can run under secure aggregation, and why the others cannot.

Under secure aggregation (``fedpersona.server.secure``) the server never holds one user's update: the
SecAgg+ round hands the strategy a single reply, the weighted average of the sampled users' shared
tensors with their total weight. A rule that is a function of that sum works unchanged:

* FedAvg (McMahan et al. 2017) is the weighted average itself; FedProx (Li et al. 2020) differs only on
  the devices (the proximal term) and averages like FedAvg;
* FedAvgM (Hsu et al. 2019) and the adaptive optimisers FedAdam, FedYogi, FedAdagrad (Reddi et al.
  2021) take the pseudo-gradient ``current - average`` and keep their own state on the server;
* user-level DP (DP-FedAvg, Flower's ``DifferentialPrivacyClientSideFixedClipping``) adds its Gaussian
  noise to the average, which is the unmasked sum divided by the weight: it composes.

Rules that look at each update cannot: Krum and MultiKrum (Blanchard et al. 2017) score each update by its
distances to the others, Bulyan (El Mhamdi et al. 2018) selects and trims per update, FedMedian and
FedTrimmedAvg (Yin et al. 2018) take coordinate-wise medians / trimmed means over the updates, and QFedAvg
(Li et al. 2020, q-FFL) reweights each update by that user's own loss. Their subclasses, and any strategy
with ``train_loss_key`` (it asks each user for its loss) or ``needs_individual_updates = True`` (a
strategy of your own declares it so), are refused before the run starts.
"""

from __future__ import annotations

from fedpersona.strategies.registry import strategy_class, train_loss_key

SUM_ONLY = ("FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad")

# Flower's rules that need each user's own update, most specific first, with why.
NEEDS_INDIVIDUAL_UPDATES = (
    ("Bulyan", "selects and trims updates one by one"),
    ("Krum", "scores each update by its distances to the others"),
    ("MultiKrum", "scores each update by its distances to the others"),
    ("FedTrimmedAvg", "trims each coordinate's extreme updates"),
    ("FedMedian", "takes each coordinate's median over the updates"),
    ("QFedAvg", "reweights each update by its user's own training loss"),
)


def secure_aggregation_problem(spec: str) -> str | None:
    """Why the strategy ``spec`` cannot run under secure aggregation, in one line; None if it can.

    Args:
        spec: a strategy spec (``NAME``, ``NAME(key=value)``, ``package.module:Class``).

    Returns:
        None for a strategy that aggregates the sum only; else the reason and what to choose instead.

    Raises:
        UsageError: an unknown or broken strategy spec (``fedpersona.strategies.registry``).
    """
    import flwr.serverapp.strategy as flower

    cls = strategy_class(spec)
    reason = None
    for name, why in NEEDS_INDIVIDUAL_UPDATES:
        if issubclass(cls, getattr(flower, name)):
            reason = f"{cls.__name__} {why}"
            break
    if reason is None and getattr(cls, "needs_individual_updates", False):
        reason = f"{cls.__name__} declares needs_individual_updates"
    if reason is None and train_loss_key(cls):
        reason = f"{cls.__name__} weights users by their own training loss"
    if reason is None:
        return None
    return (f"{reason}, and under secure-aggregation the server holds only the users' sum; choose "
            f"{', '.join(SUM_ONLY)} (or turn secure-aggregation off)")
