"""The run's resident model in this process: the base model with the scheme's adapters, built once.

Server and clients both need it (the server for the initial shared tensors and their sizes, every worker
and device to train and evaluate), so it sits on the floor below both. The model itself is cached per
process by ``fedpersona.model.resident.get_resident``; this adds the run's key and the scheme's own setup
(PAL's private mixture weights).
"""

from __future__ import annotations

import threading

from fedpersona.config import RunConfig
from fedpersona.model.adapters import AdapterState
from fedpersona.model.resident import ResidentModel, get_resident
from fedpersona.strategies.schemes import get_scheme

_SETUP_LOCK = threading.Lock()


_SCHEME_READY = "_fedpersona_scheme_ready"  # attribute marking a resident model whose scheme setup ran


def resident_for(config: RunConfig, *, keep: bool = True) -> ResidentModel:
    """This process's resident model for the run's (model, scheme, ranks, seed); built once. With
    ``keep=False`` a model built here is not kept (see ``get_resident``)."""
    scheme = get_scheme(config.scheme)
    prototypes = config.pal_prototypes if scheme.setup is not None else 0
    key = (config.model, config.scheme, config.shared_rank, config.private_rank, prototypes, config.seed,
           config.resolved_device(), config.chat_template, config.lora_target_modules, config.gradient_checkpointing)
    resident = get_resident(key, config.model, lambda: scheme.layout(config), seed=config.seed,
                            device=config.resolved_device(), chat_template=config.chat_template,
                            target_modules=config.lora_target_modules,
                            gradient_checkpointing=config.gradient_checkpointing, keep=keep)
    resident.max_tokens_per_batch = config.max_tokens_per_batch
    if scheme.setup is not None and not getattr(resident, _SCHEME_READY, False):
        with _SETUP_LOCK:
            if not getattr(resident, _SCHEME_READY, False):
                scheme.setup(resident.model, resident.layout)  # e.g. PAL's private mixture weights
                resident.adapters = AdapterState(resident.model, resident.layout.policy)
                setattr(resident, _SCHEME_READY, True)
    return resident
