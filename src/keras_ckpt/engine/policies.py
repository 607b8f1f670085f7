"""When to save and what to keep: small policy objects that combine with `|`.

As Orbax's `save_decision_policy` and `preservation_policy`: a save policy
answers "save now?" for one event of the training loop (a step ended, an
epoch ended); a keep rule names checkpoints to keep, and the checkpoints kept
are the union of what every rule keeps (plus the latest, always). Both are
frozen dataclasses, validated when made.

```python
save = keras_ckpt.SaveEveryNSteps(500) | keras_ckpt.SaveEveryNSeconds(600)
keep = keras_ckpt.KeepLast(3) | keras_ckpt.KeepBest(1, monitor="val_loss")
```
"""

import dataclasses

from keras_ckpt import _args
from keras_ckpt import manager as manager_lib

STEP = "step"
EPOCH_END = "epoch_end"


@dataclasses.dataclass(frozen=True)
class SaveEvent:
    """What the training loop just did, as a save policy sees it.

    Attributes:
        kind: `"step"` (a training step ended) or `"epoch_end"`.
        steps_since_save: int, steps trained since the last save.
        seconds_since_save: float, wall time since the last save.
    """

    kind: str
    steps_since_save: int
    seconds_since_save: float


class SavePolicy:
    """Base of the save policies: `should_save(event) -> bool`."""

    def should_save(self, event):
        raise NotImplementedError

    def __or__(self, other):
        return AnyOf((self, other))


@dataclasses.dataclass(frozen=True)
class SaveEveryNSteps(SavePolicy):
    """Saves every `n` training steps (batches).

    Args:
        n: positive int, steps between two saves.
    """

    n: int

    def __post_init__(self):
        if not _args.is_int(self.n) or self.n < 1:
            _args.invalid("n", self.n, "a positive int")

    def should_save(self, event):
        return event.kind == STEP and event.steps_since_save >= self.n


@dataclasses.dataclass(frozen=True)
class SaveEveryNSeconds(SavePolicy):
    """Saves when `seconds` of wall time have passed since the last save.

    Args:
        seconds: positive number.
    """

    seconds: float

    def __post_init__(self):
        _check_positive("seconds", self.seconds)

    def should_save(self, event):
        return event.seconds_since_save >= self.seconds


@dataclasses.dataclass(frozen=True)
class SaveAtEpochEnd(SavePolicy):
    """Saves at the end of every epoch."""

    def should_save(self, event):
        return event.kind == EPOCH_END


@dataclasses.dataclass(frozen=True)
class AnyOf(SavePolicy):
    """Saves when any of `policies` says so (what `a | b` makes).

    Args:
        policies: tuple of `SavePolicy`.
    """

    policies: tuple

    def __post_init__(self):
        object.__setattr__(self, "policies", _flatten(
            "policies", self.policies, SavePolicy, AnyOf))

    def should_save(self, event):
        return any(policy.should_save(event) for policy in self.policies)


class KeepRule:
    """Base of the keep rules; `a | b` keeps what either keeps."""

    def __or__(self, other):
        return KeepAny((self, other))


@dataclasses.dataclass(frozen=True)
class KeepLast(KeepRule):
    """Keeps the newest `n` checkpoints (None keeps all).

    Args:
        n: positive int or None.
    """

    n: int = 3

    def __post_init__(self):
        if self.n is not None and (not _args.is_int(self.n) or self.n < 1):
            _args.invalid("max_to_keep", self.n, "a positive int or None")


@dataclasses.dataclass(frozen=True)
class KeepBest(KeepRule):
    """Keeps the best `k` checkpoints by a logged metric.

    Args:
        k: non-negative int.
        monitor: str, the metric (e.g. `"val_loss"`).
        mode: `"auto"`, `"min"` or `"max"`. Defaults to `"auto"`.
    """

    k: int = 1
    monitor: str = None
    mode: str = "auto"

    def __post_init__(self):
        if not _args.is_int(self.k) or self.k < 0:
            _args.invalid("keep_best", self.k, "a non-negative int")
        if not isinstance(self.monitor, str) or not self.monitor:
            _args.invalid("monitor", self.monitor,
                          "a metric name such as 'val_loss'")
        _args.check_choice("mode", self.mode, ("auto", "min", "max"))


@dataclasses.dataclass(frozen=True)
class KeepEveryNHours(KeepRule):
    """Also keeps one checkpoint in every `hours`-long window.

    Args:
        hours: positive number.
    """

    hours: float

    def __post_init__(self):
        _check_positive("keep_every_n_hours", self.hours)


@dataclasses.dataclass(frozen=True)
class KeepAny(KeepRule):
    """The union of `rules` (what `a | b` makes).

    Args:
        rules: tuple of `KeepRule`.
    """

    rules: tuple

    def __post_init__(self):
        object.__setattr__(self, "rules", _flatten(
            "rules", self.rules, KeepRule, KeepAny))


def retention_policy(keep):
    """The `manager.RetentionPolicy` (the union the stores apply) of `keep`:
    a `KeepRule`, a union of them, or a `RetentionPolicy` as is."""
    if isinstance(keep, manager_lib.RetentionPolicy):
        return keep
    if not isinstance(keep, KeepRule):
        _args.invalid("keep", keep, "KeepLast/KeepBest/KeepEveryNHours "
                      "rules combined with |")
    rules = keep.rules if isinstance(keep, KeepAny) else (keep,)
    fields = dict(max_to_keep=0, keep_every_n_hours=None, monitor=None,
                  mode="min", keep_best=0)
    for rule in rules:
        if isinstance(rule, KeepLast):
            newest = fields["max_to_keep"]
            fields["max_to_keep"] = (
                None if rule.n is None or newest is None
                else max(rule.n, newest))
        elif isinstance(rule, KeepEveryNHours):
            fields["keep_every_n_hours"] = rule.hours
        elif isinstance(rule, KeepBest):
            if fields["monitor"] not in (None, rule.monitor):
                raise ValueError(
                    "Invalid value for argument `keep`: checkpoints are "
                    "ranked by one metric; received KeepBest rules for "
                    f"{fields['monitor']!r} and {rule.monitor!r}.")
            fields.update(
                monitor=rule.monitor, keep_best=max(rule.k, fields["keep_best"]),
                mode=manager_lib.resolve_mode(rule.monitor, rule.mode))
    return manager_lib.RetentionPolicy(**fields)


def _flatten(name, items, member, union):
    """`items` with the members of nested unions in their place."""
    flat = []
    for item in items:
        if not isinstance(item, member):
            _args.invalid(name, item, f"{member.__name__} objects")
        flat.extend(getattr(item, name) if isinstance(item, union)
                    else (item,))
    return tuple(flat)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value <= 0
    ):
        _args.invalid(name, value, "a positive number")
