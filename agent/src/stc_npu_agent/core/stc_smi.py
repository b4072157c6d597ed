"""Parses ``stc-smi -q -i N`` into health readings of NPU N.

Pure: the text comes in, readings come out, or ``ProbeOutputError`` with one
line that says what is wrong. Never a Healthy card from output that does not
say so: garbage, partial or unknown output is an error (the probeFailed
signal), and so is an answer about another NPU.

The documented shape (the vendor's docs show key/value lines; exact spacing
and the current temperature's key are not documented, so this parser assumes
the layout below, tolerant of spacing and case, strict about values)::

    NPU 0                                  (optional; if present, must be N)
        Product Name        : STCP920
        BUS-ID              : 0:03:00.0
        Status              : on           (the card: on | off)
        Temperature         : 45 C         (the current NPU temperature)
        AlertTemperature    : 85 C
        ShutdownTemperature : 95 C
        Cluster 0           : Status: WORK (or "Cluster 0" with its own
        Cluster 1                            "Status : WORK" line below it)
            Status          : WORK
        ...

- The card's ``Status`` is the first ``Status`` outside a cluster.
- A cluster's status is its header's own ``Status: X``, or else the first
  ``Status`` line after its header, before the next cluster: WORK or DEAD.
- Every cluster 0..clusters-1 must be there, once each, and no other. An off
  card need not report clusters or temperatures (it cannot): its readings
  are then the card status alone, and the rest keep their last state.
- A temperature at or above AlertTemperature is bad (ShutdownTemperature is
  when the card turns itself off, which cardStatus then shows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stc_npu_agent.core.health import (
    CARD_STATUS,
    CLUSTER_STATUS,
    PROBE_FAILED,
    TEMPERATURE,
    Reading,
)

CARD_STATES = {"on": False, "off": True}  # value -> bad
CLUSTER_STATES = {"WORK": False, "DEAD": True}
CURRENT_TEMPERATURE_KEYS = {"temperature", "npu temperature", "current temperature", "npu temp"}
_NPU_HEADER = re.compile(r"NPU\s*:?\s*(?P<index>[0-9]+)", re.I)
_CLUSTER_HEADER = re.compile(r"Cluster\s*(?P<index>[0-9]+)\s*(?::\s*(?P<rest>.*))?", re.I)
_STATUS_IN_LINE = re.compile(r"Status\s*:\s*(?P<value>\S+)", re.I)
_SECTION = re.compile(r"[A-Za-z][A-Za-z ]*")
_DEGREES = re.compile(r"(?P<number>-?[0-9]+(?:\.[0-9]+)?)\s*(?:°?\s*C)?", re.I)


class ProbeOutputError(ValueError):
    """stc-smi's output is not what the agent can judge; the message is one line."""


@dataclass
class _Parsed:
    clusters: dict[int, str | None]
    card: str | None = None
    temperature: float | None = None
    alert: float | None = None


def _degrees(key: str, value: str) -> float:
    match = _DEGREES.fullmatch(value.strip())
    if match is None:
        raise ProbeOutputError(f"{key}: not a temperature: {value.strip()[:40]!r}")
    return float(match.group("number"))


def _scan(text: str, index: int) -> _Parsed:
    parsed = _Parsed(clusters={})
    cluster: int | None = None  # the cluster whose Status is still to come
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if not line.isprintable():
            raise ProbeOutputError(f"line {number}: not printable text")
        header = _NPU_HEADER.fullmatch(line)
        if header:
            if int(header.group("index")) != index:
                raise ProbeOutputError(
                    f"answered for NPU {header.group('index')}, asked for NPU {index}"
                )
            continue
        cluster_header = _CLUSTER_HEADER.fullmatch(line)
        if cluster_header:
            cluster = _open_cluster(parsed, cluster_header, number)
        else:
            cluster = _key_value(parsed, cluster, line, number)
    return parsed


def _open_cluster(parsed: _Parsed, header: re.Match[str], number: int) -> int | None:
    """Record a cluster header; the cluster still waiting for its Status, if any."""
    cluster = int(header.group("index"))
    if cluster in parsed.clusters:
        raise ProbeOutputError(f"line {number}: cluster {cluster} reported twice")
    inline = _STATUS_IN_LINE.search(header.group("rest") or "")
    parsed.clusters[cluster] = inline.group("value") if inline else None
    return None if inline else cluster


def _key_value(parsed: _Parsed, cluster: int | None, line: str, number: int) -> int | None:
    key, colon, value = line.partition(":")
    if not colon and _SECTION.fullmatch(line):
        return cluster  # a section title, e.g. "Temperature"
    if not colon:
        raise ProbeOutputError(f"line {number}: not a 'key: value' line: {line[:40]!r}")
    key, value = key.strip().lower(), value.strip()
    if key == "status":
        if cluster is not None:
            parsed.clusters[cluster] = value
            return None
        if parsed.card is None:
            parsed.card = value
    elif key in CURRENT_TEMPERATURE_KEYS and value:
        parsed.temperature = _degrees(key, value)
    elif key == "alerttemperature":
        parsed.alert = _degrees(key, value)
    return cluster


def parse_query(text: str, index: int, clusters: int) -> list[Reading]:
    """The readings of NPU ``index`` from ``stc-smi -q -i index``, or
    ``ProbeOutputError``; a good probeFailed reading comes with them."""
    if not text.strip():
        raise ProbeOutputError("empty output")
    parsed = _scan(text, index)
    if parsed.card is None:
        raise ProbeOutputError("no card Status line")
    if parsed.card not in CARD_STATES:
        raise ProbeOutputError(f"card Status {parsed.card[:20]!r} is neither on nor off")
    readings = [
        Reading(PROBE_FAILED, False, "stc-smi answered"),
        Reading(CARD_STATUS, CARD_STATES[parsed.card], parsed.card),
    ]
    if CARD_STATES[parsed.card]:
        return readings  # off: clusters and temperatures are not reported
    readings.append(_cluster_reading(parsed.clusters, clusters))
    if parsed.temperature is None or parsed.alert is None:
        missing = "current temperature" if parsed.temperature is None else "AlertTemperature"
        raise ProbeOutputError(f"no {missing} line")
    hot = parsed.temperature >= parsed.alert
    value = f"{parsed.temperature:g} C (alert {parsed.alert:g} C)"
    readings.append(Reading(TEMPERATURE, hot, value))
    return readings


def _cluster_reading(found: dict[int, str | None], expected: int) -> Reading:
    wanted = set(range(expected))
    if set(found) != wanted:
        missing = sorted(wanted - set(found))
        extra = sorted(set(found) - wanted)
        what = f"missing cluster {missing[0]}" if missing else f"unexpected cluster {extra[0]}"
        raise ProbeOutputError(f"{what} (expected clusters 0..{expected - 1})")
    dead = []
    for cluster, status in sorted(found.items()):
        if status is None:
            raise ProbeOutputError(f"cluster {cluster} has no Status")
        if status not in CLUSTER_STATES:
            raise ProbeOutputError(
                f"cluster {cluster} Status {status[:20]!r} is neither WORK nor DEAD"
            )
        if CLUSTER_STATES[status]:
            dead.append(str(cluster))
    if dead:
        return Reading(CLUSTER_STATUS, True, f"DEAD cluster {', '.join(dead)}")
    return Reading(CLUSTER_STATUS, False, f"{expected} WORK")
