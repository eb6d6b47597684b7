"""The run's life cycle, as named hooks that side concerns implement instead of living in the loop.

    on_train_start(trainer)                     after resume, before the first step
    on_step_start(trainer, step)                before the batch of `step` (1-based) is processed
    on_before_optimizer_step(trainer, step)     gradients are final, the update not yet applied
    on_step_end(trainer, step, metrics)         after the update; metrics read lazily (see below)
    on_eval_end(trainer, step, metrics)         after an evaluation (val_loss)
    on_checkpoint_saved(trainer, step, path)    a checkpoint of `step` is committed
    on_error(trainer, error)                    training raised; every callback hears it, then
                                                it propagates (or the first, more precise error
                                                an on_error raised, chained to it)
    on_train_end(trainer, result)               after the last step (also after a stop signal)

A callback implements any subset (plain duck typing; subclassing ``Callback`` is optional). A
callback with state to keep across a restart gives itself a ``name`` and implements
``state_dict()`` / ``load_state_dict()`` (plain JSON data): the checkpoint saves it under
``callbacks.<name>`` and a resume restores it before ``on_train_start``.

``metrics`` at ``on_step_end`` is a ``StepMetrics`` mapping: loss and gradient norm stay on the
device between log steps, and reading one of them copies it to the host (a device sync) on first
access. The built-in callbacks read them only at log steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult

HOOKS = (
    "on_train_start",
    "on_step_start",
    "on_before_optimizer_step",
    "on_step_end",
    "on_eval_end",
    "on_checkpoint_saved",
    "on_error",
    "on_train_end",
)


class Callback:
    """A base class with every hook a no-op, for callbacks that want one."""

    name: str | None = None
    """Set (and implement state_dict / load_state_dict) to be saved with checkpoints."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer, step: int) -> None: ...
    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None: ...
    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: str) -> None: ...
    def on_error(self, trainer: Trainer, error: BaseException) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


def is_stateful(callback: Any) -> bool:
    return bool(getattr(callback, "name", None)) and hasattr(callback, "state_dict")


class CallbackList:
    """Calls a hook on every callback that has it, in order; the ``last`` ones (the checkpoint)
    always after all others, so that a checkpoint of step N holds every callback's state after
    its on_step_end(N)."""

    def __init__(self, callbacks: list[Any], last: list[Any] | None = None) -> None:
        self.callbacks = list(callbacks)
        self.last = list(last or [])
        names = [cb.name for cb in self if is_stateful(cb)]
        if len(names) != len(set(names)):
            raise ValueError(f"stateful callbacks need distinct names, got {names}")

    def __iter__(self) -> Iterator[Any]:
        return iter([*self.callbacks, *self.last])

    def append(self, callback: Any) -> None:
        """Add a callback (before the ones that must come last)."""
        if is_stateful(callback) and callback.name in self.stateful():
            raise ValueError(f"stateful callbacks need distinct names: {callback.name!r} twice")
        self.callbacks.append(callback)

    def call(self, hook: str, *args: Any) -> None:
        assert hook in HOOKS, hook
        for cb in self:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def call_on_error(self, trainer: Trainer, error: BaseException) -> BaseException | None:
        """on_error on every callback, even when one raises; the first error raised."""
        raised: BaseException | None = None
        for cb in self:
            fn = getattr(cb, "on_error", None)
            if fn is None:
                continue
            try:
                fn(trainer, error)
            except Exception as e:
                raised = raised or e
        return raised

    def stateful(self) -> dict[str, Any]:
        """{name: callback} of the callbacks the checkpoint keeps."""
        return {cb.name: cb for cb in self if is_stateful(cb)}


class StepMetrics(Mapping[str, Any]):
    """One step's metrics: numbers, or 0-dim device tensors copied to the host (and cached as
    floats) the first time they are read."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, torch.Tensor):
            value = self._values[key] = value.item()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def update(self, **values: Any) -> None:
        self._values.update(values)

    def raw(self, key: str) -> Any:
        """The stored value, a device tensor or a number, without a copy to the host."""
        return self._values[key]
