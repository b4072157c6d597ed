"""Health signals (pure): hysteresis, policy, recovery, and the stc-smi parser."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_npu_agent.core.config import ConfigError, SignalPolicy, parse_config
from stc_npu_agent.core.health import (
    HealthBook,
    Reading,
    SignalState,
    step,
    transitions,
)
from stc_npu_agent.core.stc_smi import ProbeOutputError, parse_query
from stc_npu_agent.testing.fake_stc_smi import default_npu, query

CARD = "cardStatus"


def feed(policy: SignalPolicy, bad_readings: list[bool]) -> list[SignalState]:
    """The signal's state after each reading."""
    state, states = SignalState(), []
    for bad in bad_readings:
        state = step(state, Reading(CARD, bad, "off" if bad else "on"), policy)
        states.append(state)
    return states


def test_a_signal_turns_bad_after_fail_threshold_and_good_after_recover_threshold() -> None:
    policy = SignalPolicy(fail_threshold=3, recover_threshold=2)
    states = feed(policy, [True, True, False, True, True, True, False, True, False, False])
    assert [state.bad for state in states] == [
        False, False, False,  # a good reading in between restarts the count
        False, False, True,  # three bad in a row
        True, True,  # one good, then a bad one: still bad
        True, False,  # two good in a row
    ]  # fmt: skip
    assert states[4].describe(CARD) == "cardStatus off (2 of 3 bad readings)"
    assert states[6].describe(CARD) == "cardStatus on (1 of 2 good readings)"
    assert states[5].describe(CARD) == "cardStatus off"


def test_ignored_signals_are_tracked_but_do_not_count() -> None:
    state = feed(SignalPolicy(action="ignore", fail_threshold=1), [True])[-1]
    assert state.bad
    assert not state.counts


@settings(max_examples=300, deadline=None)
@given(
    fail=st.integers(1, 5),
    recover=st.integers(1, 5),
    readings=st.lists(st.booleans(), max_size=60),
)
def test_no_flapping_faster_than_the_thresholds_allow(
    fail: int, recover: int, readings: list[bool]
) -> None:
    """Each change needs its threshold of readings since the last change, all
    of them on the new side, and it happens as soon as they are there."""
    policy = SignalPolicy(fail_threshold=fail, recover_threshold=recover)
    states = feed(policy, readings)
    bad, run = False, 0  # the expected state, and the readings against it in a row
    for reading, state in zip(readings, states, strict=True):
        run = run + 1 if reading != bad else 0
        if run >= (fail if reading else recover):
            bad, run = reading, 0
        assert state.bad == bad
    # Changes by reading position; -1 is the start (good).
    changes = [
        i for i in range(len(states)) if states[i].bad != (states[i - 1].bad if i else False)
    ]
    for earlier, later in itertools.pairwise([-1, *changes]):
        needed = fail if states[later].bad else recover
        assert later - earlier >= needed
        assert all(
            reading == states[later].bad for reading in readings[later - needed + 1 : later + 1]
        )


@settings(max_examples=300, deadline=None)
@given(
    fail=st.integers(1, 5),
    recover=st.integers(1, 5),
    readings=st.lists(st.booleans(), max_size=60),
)
def test_always_recovers_once_the_readings_do(
    fail: int, recover: int, readings: list[bool]
) -> None:
    policy = SignalPolicy(fail_threshold=fail, recover_threshold=recover)
    states = feed(policy, [*readings, *[False] * recover])
    assert not states[-1].bad
    assert not states[-1].streak


def test_book_reports_transitions_per_npu_and_signal() -> None:
    policies = {CARD: SignalPolicy(fail_threshold=1), "temperature": SignalPolicy()}
    before = HealthBook()
    after = before.observed(
        "stc1", [Reading(CARD, True, "off"), Reading("temperature", True, "90 C")], policies
    )
    changes = transitions("stc1", before.signals("stc1"), after.signals("stc1"))
    assert [(c.npu, c.signal, c.old, c.new, c.value) for c in changes] == [
        ("stc1", CARD, "ok", "bad", "off")
    ]  # temperature needs two bad readings
    assert after.signals("stc0") == {}
    with pytest.raises(ValueError, match="no policy for signal 'presence'"):
        before.observed("stc0", [Reading("presence", True, "x")], policies)


def test_health_config_defaults_and_one_line_errors() -> None:
    config = parse_config(
        {
            "health": {
                "vendorProbe": {"enabled": True, "intervalSeconds": 5},
                "signals": {"temperature": {"policy": "ignore"}},
            }
        }
    )
    assert config.health.vendor_probe.enabled
    assert config.health.vendor_probe.interval_seconds == 5.0
    assert config.health.signals["temperature"] == SignalPolicy(action="ignore")
    assert config.health.signals["probeFailed"].fail_threshold == 3
    assert parse_config(config.to_mapping()) == config
    for raw, message in [
        ({"signals": {"presence": {}}}, "health.signals.presence: unknown key"),
        ({"signals": {CARD: {"policy": "warn"}}}, f"health.signals.{CARD}.policy: expected one"),
        ({"signals": {CARD: {"failThreshold": 0}}}, "failThreshold: must be from 1 to 1000"),
        ({"vendorProbe": {"enabled": "yes"}}, "health.vendorProbe.enabled: expected true or"),
        ({"vendorProbe": {"tool": "stc-smi"}}, "health.vendorProbe.tool: must be an absolute"),
        ({"vendorProbe": {"libraryPath": "lib"}}, "vendorProbe.libraryPath: must be an absolute"),
        ({"vendorProbe": {"timeoutSeconds": 20}}, "timeoutSeconds: 20 is longer than"),
        ({"vendorProbe": {"concurrency": True}}, "concurrency: expected a whole number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"health": raw})


# --- stc-smi -q -i N ---


def npu_output(index: int = 0, **fields: object) -> str:
    return query(index, {**default_npu(index), **fields})


def signals_of(text: str, index: int = 0) -> dict[str, tuple[bool, str]]:
    return {r.signal: (r.bad, r.value) for r in parse_query(text, index, clusters=4)}


def test_a_healthy_card() -> None:
    assert signals_of(npu_output()) == {
        "probeFailed": (False, "stc-smi answered"),
        CARD: (False, "on"),
        "clusterStatus": (False, "4 WORK"),
        "temperature": (False, "45 C (alert 85 C)"),
    }


def test_off_dead_and_hot() -> None:
    assert signals_of(npu_output(status="off"))[CARD] == (True, "off")
    dead = npu_output(2, clusters=["WORK", "DEAD", "WORK", "DEAD"])
    assert signals_of(dead, 2)["clusterStatus"] == (True, "DEAD cluster 1, 3")
    assert signals_of(npu_output(temperature=85))["temperature"] == (True, "85 C (alert 85 C)")


def test_cluster_status_on_the_header_line() -> None:
    text = "Status: on\nTemperature: 40 C\nAlertTemperature: 80 C\n" + "".join(
        f"Cluster {k}: NPC 0-7 Status: {'DEAD' if k == 2 else 'WORK'}\n" for k in range(4)
    )
    assert signals_of(text)["clusterStatus"] == (True, "DEAD cluster 2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty output"),
        ("\x1b[31m??? STCML_ERROR 0xdead\n", "line 1: not printable text"),
        ("segfault at 0 ip 00007f\n", "not a 'key: value' line"),
        (npu_output()[: npu_output().index("Temperature")], "missing cluster 0"),
        (npu_output().replace("Status              : on", "Status : standby"), "neither on nor"),
        (npu_output().replace("DEAD", "x").replace(": WORK", ": BUSY", 1), "BUSY"),
        (npu_output(clusters=["WORK"] * 3), "missing cluster 3"),
        (npu_output(clusters=["WORK"] * 5), "unexpected cluster 4"),
        (npu_output().replace("Cluster 1", "Cluster 0"), "cluster 0 reported twice"),
        (npu_output().replace("NPU 0", "NPU 1"), "answered for NPU 1, asked for NPU 0"),
        (npu_output().replace("AlertTemperature", "Alert"), "no AlertTemperature line"),
        (npu_output().replace("45 C", "hot"), "not a temperature"),
        ("Product Name : STCP920\n", "no card Status line"),
    ],
)
def test_garbage_or_partial_output_is_an_error_never_a_healthy_card(
    text: str, message: str
) -> None:
    with pytest.raises(ProbeOutputError, match=message):
        parse_query(text, 0, clusters=4)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(npu_output()) - 1))
def test_any_truncation_is_refused_or_still_complete(cut: int) -> None:
    """Output cut anywhere is an error, unless what is left still holds every
    field (a cut inside the last value's trailing text)."""
    full = signals_of(npu_output())
    try:
        readings = signals_of(npu_output()[:cut])
    except ProbeOutputError:
        return
    assert readings == full
