"""Personalization schemes: which LoRA tensors are shared, private or frozen, plus any extra behaviour.

A scheme is an adapter layout (which adapters sit on the base, their ranks) with a split policy (the role
of every tensor: SHARED goes to the server, PRIVATE stays on the device, FROZEN is not trained), and at
most a little extra behaviour on the device. It composes with every aggregation strategy, because
strategies only ever see the shared tensors. The schemes' sources and how the field evaluates them:
docs/explanation/schemes.md.

=========  ==========================  ==========================  =============================================
scheme     shared (aggregated)         private (device)            source
=========  ==========================  ==========================  =============================================
split      LoRA adapter, rank r_s      LoRA adapter, rank r_p      FedPDPO 2603.19741, HYDRA 2406.02888,
                                                                   dual-adapter FDLoRA 2406.07925
global     LoRA adapter, rank r_s      nothing                     FedAvg-LoRA; OpenFedLLM FedDPO 2402.06954
local      nothing                     LoRA adapter, rank r_p      OPPU 2402.04401 (one PEFT per user)
fedsa      LoRA A (rank r_s)           LoRA B                      FedSA-LoRA 2410.01463
ffa        LoRA B (A frozen, seeded)   nothing                     FFA-LoRA 2403.12313
finetune   LoRA adapter, rank r_s      a fine-tuned private copy   FedAvg + local fine-tuning baseline
                                       of that adapter             (e.g. Cheng et al., arXiv 2102.04925)
pal        K prototype adapters        K mixture logits            PAL 2406.08469
=========  ==========================  ==========================  =============================================

Behaviour beyond the layout (carried out by ``fedpersona.round``):

* what a user fits for itself (``personal_fit``): its PRIVATE tensors (split, local, fedsa, pal), a private
  copy of the shared adapter (finetune), or nothing (global, ffa: personalized == global);
* finetune trains the shared adapter only during rounds; its personalized model exists from the final
  evaluation on (the user's copy, fine-tuned on the user's training pairs): earlier evaluations report
  personalized == global;
* ``local`` shares nothing: every reply carries an empty ArrayRecord (0 bytes) and aggregation is the
  identity on it (``fedpersona.strategies.registry``);
* "global" for fedsa is A with B at its initial zero, i.e. the base model: FedSA has no global B.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedpersona.errors import UsageError
from fedpersona.plugins import Registry, typed_arguments
from fedpersona.model.adapters import SINGLE_ADAPTER, AdapterLayout, AdapterState, Role, SplitPolicy, by_adapter_name
from fedpersona.strategies import pal


class LayoutSettings(Protocol):
    """The run settings a layout reads (``RunConfig`` has them all)."""

    shared_rank: int
    private_rank: int
    pal_prototypes: int
    pal_init_std: float


PERSONAL_FITS = ("private", "copy", "none")


@dataclass(frozen=True)
class Scheme:
    """A personalization scheme: which LoRA tensors are shared, private or frozen, plus a little behaviour.

    The contract a scheme of your own follows (``@register_scheme`` it, or name it by import path:
    ``--scheme myschemes:MY_SCHEME``; a callable returning a ``Scheme`` works too, with arguments from the
    spec, ``--scheme 'myschemes:make(rank=4)'``):

    * ``build(settings) -> AdapterLayout``: the adapters on the frozen base (name -> rank) and the split
      policy, a function from every adapter tensor's name (``...lora_A.<adapter>.weight``) to a ``Role``.
      SHARED tensors are what the device sends and the server aggregates (any strategy); PRIVATE tensors
      stay on the device; FROZEN ones keep their seeded initial values. ``settings`` carries the run's
      ``shared_rank``, ``private_rank``, ``pal_prototypes`` and ``pal_init_std``.
    * ``personal_fit``: what a new user fits at the final evaluation and what counts as personal:
      ``"private"`` (its PRIVATE tensors), ``"copy"`` (a private copy of the SHARED ones) or ``"none"``
      (personalized == global).
    * optional hooks, each called on the device: ``setup(model, layout)`` adds modules the layout's LoRA
      does not (PAL's mixture logits); ``init_private(state, seed, settings)`` sets a training user's first
      private values; ``shape_update(state, received, trained) -> dict`` reshapes what is sent (PAL's
      responsibility weighting). A scheme with ``setup``, hooks on LoRA modules or ``shape_update`` is
      trained user by user (no stacked multi-user steps).

    Args:
        name: the scheme's name (reports and ``fedpersona settings``).
        description: one line, with the paper it comes from.
        build: the layout function above.
        personal_fit: ``"private"``, ``"copy"`` or ``"none"``.
        finetune_at_eval: the final evaluation fine-tunes the personal copy first (``finetune``).
        supports_dp: whether pair-level DP-SGD can train it (its personal fit must fit in the ledger).
        setup: optional hook ``setup(model, layout)``, above.
        init_private: optional hook ``init_private(state, seed, settings)``, above.
        shape_update: optional hook ``shape_update(state, received, trained) -> dict``, above.
    """

    name: str
    description: str
    build: Callable[[LayoutSettings], AdapterLayout]
    personal_fit: str = "private"
    finetune_at_eval: bool = False
    supports_dp: bool = True
    setup: Callable[[torch.nn.Module, AdapterLayout], object] | None = None
    init_private: Callable[[AdapterState, int, LayoutSettings], None] | None = None
    shape_update: Callable[[AdapterState, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
                           dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.personal_fit not in PERSONAL_FITS:
            raise ValueError(f"scheme {self.name}: personal_fit {self.personal_fit!r} is not one of {PERSONAL_FITS}")
        if not callable(self.build):
            raise ValueError(f"scheme {self.name}: build must be a function settings -> AdapterLayout")

    def layout(self, settings: LayoutSettings) -> AdapterLayout:
        """The adapter layout for the run's ranks.

        Args:
            settings: the run's layout settings (``RunConfig`` has them).

        Returns:
            The ``AdapterLayout``.
        """
        return self.build(settings)

    @property
    def roles(self) -> set[Role]:
        """The roles this scheme's tensors take (probed on a rank-1 layout)."""
        layout = self.build(_PROBE)
        probes = [f"x.lora_{m}.{name}.weight" for name in layout.ranks for m in ("A", "B")]
        probes += list(layout.extra.get("extra_tensors", ()))
        return {layout.policy(p) for p in probes}

    @property
    def has_shared(self) -> bool:
        return Role.SHARED in self.roles

    @property
    def has_private(self) -> bool:
        return Role.PRIVATE in self.roles


@dataclass(frozen=True)
class _Probe:
    shared_rank: int = 1
    private_rank: int = 1
    pal_prototypes: int = 2
    pal_init_std: float = 0.25


_PROBE = _Probe()


def _by_matrix(a: Role, b: Role) -> SplitPolicy:
    def policy(tensor_name: str) -> Role:
        return a if ".lora_A." in tensor_name else b

    return policy


def _split(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"shared": s.shared_rank, "private": s.private_rank},
                         by_adapter_name({"shared": Role.SHARED, "private": Role.PRIVATE}))


def _global(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"shared": s.shared_rank}, by_adapter_name({"shared": Role.SHARED}))


def _local(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"private": s.private_rank}, by_adapter_name({"private": Role.PRIVATE}))


def _fedsa(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({SINGLE_ADAPTER: s.shared_rank}, _by_matrix(Role.SHARED, Role.PRIVATE))


def _ffa(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({SINGLE_ADAPTER: s.shared_rank}, _by_matrix(Role.FROZEN, Role.SHARED))


def _pal(s: LayoutSettings) -> AdapterLayout:
    return pal.pal_layout(s.pal_prototypes, s.shared_rank)


def _check_scheme(obj: object) -> Scheme:
    if isinstance(obj, Scheme):
        return obj
    if callable(obj):
        return obj  # a factory (or class) returning a Scheme: called with the spec's arguments (get_scheme)
    raise TypeError(f"{obj!r} is neither a Scheme nor a callable returning one")


SCHEMES: Registry[Scheme] = Registry("scheme", "--scheme", _check_scheme)


def register_scheme(scheme: Scheme | None = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register a personalization scheme (usable as ``--scheme NAME``).

    Args:
        scheme: a ``Scheme``, or a callable returning one (its spec arguments become its keyword
            arguments); omitted, a decorator.
        name: the name to register under (default: ``scheme.name``, or the callable's ``__name__``).
        replace: replace an existing scheme of that name.

    Returns:
        ``scheme`` (or the decorator).

    Raises:
        ValueError: the name is taken.
    """
    if scheme is None:
        return lambda target: register_scheme(target, name=name, replace=replace)
    key = name or getattr(scheme, "name", None) or getattr(scheme, "__name__", "")
    return SCHEMES.register(key, scheme, replace=replace)


for _builtin in (
    Scheme("split", "shared LoRA adapter + private per-user LoRA adapter, both active "
                    "(FedPDPO 2603.19741, HYDRA 2406.02888, FDLoRA 2406.07925)", _split),
    Scheme("global", "one LoRA adapter, all of it shared; no private part "
                     "(FedAvg-LoRA; OpenFedLLM FedDPO 2402.06954)", _global, personal_fit="none"),
    Scheme("local", "one LoRA adapter per user, nothing shared (OPPU 2402.04401)", _local),
    Scheme("fedsa", "one LoRA adapter: A shared, B private (FedSA-LoRA 2410.01463)", _fedsa),
    Scheme("ffa", "one LoRA adapter: A frozen from a shared seed, B shared (FFA-LoRA 2403.12313)", _ffa,
           personal_fit="none"),
    Scheme("finetune", "one shared LoRA adapter trained federatedly; at the final evaluation each user "
                       "fine-tunes a private copy on its own pairs (FedAvg + local fine-tuning, "
                       "Cheng et al. 2102.04925)", _global,
           personal_fit="copy", finetune_at_eval=True, supports_dp=False),
    Scheme("pal", "K shared prototype LoRA adapters mixed by private per-user weights "
                  "(PAL 2406.08469)", _pal, setup=pal.install_mixture,
           init_private=pal.init_mixture, shape_update=pal.weight_update),
):
    register_scheme(_builtin)


def get_scheme(spec: str) -> Scheme:
    """The scheme a spec names: a registered name (``split``), or ``package.module:NAME`` (a ``Scheme`` or
    a callable returning one, called with the spec's arguments).

    Args:
        spec: ``NAME``, ``module:NAME`` or either with ``(key=value, ...)``.

    Returns:
        The ``Scheme``.

    Raises:
        fedpersona.errors.UsageError: unknown, not importable, not a scheme, or arguments it does not take.
    """
    obj, args = SCHEMES.get(spec)
    if isinstance(obj, Scheme):
        if args:
            raise UsageError(f"--scheme {spec}: scheme {obj.name} takes no arguments (a callable returning a "
                             "Scheme does)")
        return obj
    try:
        scheme = obj(**typed_arguments(obj, args, f"--scheme {spec}"))
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken plug-in factory: one line
        raise UsageError(f"--scheme {spec}: building the scheme failed ({type(err).__name__}: {err})") from None
    if not isinstance(scheme, Scheme):
        raise UsageError(f"--scheme {spec}: returned {type(scheme).__name__}, not a fedpersona Scheme")
    return scheme
