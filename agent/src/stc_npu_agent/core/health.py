"""Health signals of each NPU, with per-signal policy and hysteresis.

Pure: readings come in as plain values, signal states come out. No clock, no
I/O. Sources (discovery, the vendor probe) produce readings; the inventory
(``core.devices``) turns the signals into the NPU's health and reason.

Rules, and why:
- A signal is good or bad. ``presence`` (every node of the NPU is there and
  is a live character device) and ``pciDriver`` (every node resolves in sysfs
  to the NPU's PCI function, of an allowed vendor and bound to an allowed
  driver) follow each scan at once, both ways: an NPU without them cannot be
  handed out at all.
- The vendor probe's signals (``cardStatus``, ``clusterStatus``,
  ``temperature``, ``probeFailed``) have hysteresis: a good signal turns bad
  after ``failThreshold`` bad readings in a row, a bad one turns good after
  ``recoverThreshold`` good readings in a row. So a signal can change at most
  once per threshold readings (no flapping), and it always recovers on its
  own when the readings do: there is no sticky state and no manual reset.
- Policy ``ignore`` keeps a signal tracked and shown (``/status``,
  ``diagnose``) but out of the NPU's health.
- A signal no source has read yet is good: the NPU's health is what is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stc_npu_agent.core.config import SignalPolicy

PRESENCE = "presence"
PCI_DRIVER = "pciDriver"
CARD_STATUS = "cardStatus"
CLUSTER_STATUS = "clusterStatus"
TEMPERATURE = "temperature"
PROBE_FAILED = "probeFailed"
# Display order of the signals.
SIGNALS = (PRESENCE, PCI_DRIVER, CARD_STATUS, CLUSTER_STATUS, TEMPERATURE, PROBE_FAILED)

OK = "ok"
BAD = "bad"


@dataclass(frozen=True)
class Reading:
    """One reading of one signal: bad or not, and the value behind it."""

    signal: str
    bad: bool
    value: str


@dataclass(frozen=True)
class SignalState:
    bad: bool = False
    # The latest reading's value (what an operator wants to see).
    value: str = ""
    # Consecutive readings that disagree with ``bad`` so far.
    streak: int = 0
    # Readings it takes to change, in the direction of the streak.
    needed: int = 1
    # Policy "ignore": shown, but not part of the NPU's health.
    ignored: bool = False

    @property
    def state(self) -> str:
        return BAD if self.bad else OK

    @property
    def counts(self) -> bool:
        """Whether this signal makes its NPU Unhealthy now."""
        return self.bad and not self.ignored

    def describe(self, signal: str) -> str:
        """One phrase for a reason: ``cardStatus off``, with recovery progress."""
        text = f"{signal} {self.value}" if self.value else signal
        if self.streak:
            direction = "good" if self.bad else "bad"
            text += f" ({self.streak} of {self.needed} {direction} readings)"
        return text


@dataclass(frozen=True)
class Transition:
    """A signal of an NPU turned bad (old "ok", new "bad") or good again."""

    npu: str
    signal: str
    old: str
    new: str
    value: str


def step(state: SignalState, reading: Reading, policy: SignalPolicy) -> SignalState:
    """The signal after one more reading, with the policy's hysteresis."""
    ignored = policy.action == "ignore"
    if reading.bad == state.bad:
        return SignalState(state.bad, reading.value, 0, 1, ignored)
    needed = policy.fail_threshold if reading.bad else policy.recover_threshold
    streak = state.streak + 1
    if streak >= needed:
        return SignalState(reading.bad, reading.value, 0, 1, ignored)
    return SignalState(state.bad, reading.value, streak, needed, ignored)


def immediate(reading: Reading) -> SignalState:
    """A signal without hysteresis: it is what was read."""
    return SignalState(reading.bad, reading.value)


Signals = Mapping[str, SignalState]


@dataclass(frozen=True)
class HealthBook:
    """The hysteresis signals of every NPU (by NPU ID). Immutable."""

    npus: Mapping[str, Signals] = field(default_factory=dict)

    def signals(self, npu_id: str) -> Signals:
        return self.npus.get(npu_id, {})

    def observed(
        self, npu_id: str, readings: Iterable[Reading], policies: Mapping[str, SignalPolicy]
    ) -> HealthBook:
        """The book after one round of readings of one NPU. A signal without
        a policy (not a hysteresis signal) is refused: it is a caller's bug."""
        current = dict(self.signals(npu_id))
        for reading in readings:
            policy = policies.get(reading.signal)
            if policy is None:
                raise ValueError(f"no policy for signal {reading.signal!r}")
            current[reading.signal] = step(
                current.get(reading.signal, SignalState()), reading, policy
            )
        return HealthBook({**self.npus, npu_id: current})


def ordered(signals: Signals) -> list[tuple[str, SignalState]]:
    rank = {name: position for position, name in enumerate(SIGNALS)}
    return sorted(signals.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def transitions(npu_id: str, before: Signals, after: Signals) -> list[Transition]:
    """Every signal of one NPU whose good/bad state differs (a signal not in
    ``before`` was good)."""
    changed = []
    for name, state in ordered(after):
        old = before.get(name, SignalState())
        if old.bad != state.bad:
            changed.append(Transition(npu_id, name, old.state, state.state, state.value))
    return changed


def signals_document(signals: Signals) -> dict[str, dict[str, object]]:
    """The signals as /status and diagnose show them, in display order."""
    return {
        name: {
            "state": state.state,
            "value": state.value,
            "counts": state.counts,
            "ignored": state.ignored,
            "streak": state.streak,
            "needed": state.needed,
        }
        for name, state in ordered(signals)
    }
