"""One resident model per process: frozen base + adapters built once, then only tensors are swapped.

A simulation worker serves many users in turn; building a PEFT model or reloading the base per client
dominates run time (the stock FlowerTune template does). Here each process keeps one ResidentModel per
(model, layout) and a client only loads its shared and private tensors into it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from fedpersona.model.adapters import AdapterLayout, AdapterState, attach_adapters
from fedpersona.model.loading import load_base
from fedpersona.model.prompting import PromptFormat


class RefLogpCache:
    """Reference (frozen base) log-probs of pairs, computed once: a bounded LRU keyed by pair content."""

    def __init__(self, max_items: int = 200_000) -> None:
        self._items: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.max_items = max_items

    def get(self, key: Hashable) -> tuple[float, float] | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: tuple[float, float]) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ResidentModel:
    model: torch.nn.Module  # the PEFT model (base frozen, all adapters active)
    tokenizer: object
    adapters: AdapterState
    layout: AdapterLayout
    ref_cache: RefLogpCache
    device: str
    prompt_format: PromptFormat
    # padded tokens one forward may hold (micro-batch budget: fedpersona.alignment.microbatch); a memory
    # setting of this process, not of the model, so it may change between calls
    max_tokens_per_batch: int = 2048

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


_RESIDENT: dict[Hashable, ResidentModel] = {}
_LOCK = threading.Lock()


def get_resident(
    key: Hashable, model: str, layout_factory: Callable[[], AdapterLayout], seed: int = 0, device: str = "cpu",
    *, chat_template: bool = True, target_modules: str = "", gradient_checkpointing: bool = False,
    keep: bool = True,
) -> ResidentModel:
    """The process's resident model for ``key``, built on first use and kept. ``key`` must cover every
    argument that shapes the model (model, layout, seed, device, chat_template, target_modules,
    gradient_checkpointing). ``keep=False`` (a process that only needs the initial adapter tensors, like
    the server) returns the kept one if there is one, else builds one that nothing here holds on to."""
    with _LOCK:
        resident = _RESIDENT.get(key)
        if resident is None:
            base, tokenizer = load_base(model, device) if keep else load_base.__wrapped__(model, device)
            if _RESIDENT and keep:
                # The cached base is wrapped in place by PEFT (LoRA layers injected into it): a second layout
                # in one process loads a pristine base of its own (a deepcopy would carry the first's adapters).
                base, tokenizer = load_base.__wrapped__(model, device)
            layout = layout_factory()
            if gradient_checkpointing:
                # non-reentrant: works with a frozen base (no enable_input_require_grads needed)
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model = attach_adapters(base, layout, seed, target_modules=target_modules)
            resident = ResidentModel(peft_model, tokenizer, AdapterState(peft_model, layout.policy), layout,
                                     RefLogpCache(), device, PromptFormat(tokenizer, chat_template))
            if keep:
                _RESIDENT[key] = resident
        return resident
