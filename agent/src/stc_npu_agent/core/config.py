"""The agent's configuration: parsed and validated from a plain mapping.

Pure: the YAML file is read by the shell (``stc_npu_agent.settings``); this
module only turns the parsed mapping into frozen dataclasses, or raises
``ConfigError`` with one line that names the key and what is wrong. The keys
are camelCase and have the same shape as the chart's ``config`` values.
"""

from __future__ import annotations

import importlib
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stc_npu_agent.core import nfd

HpeMode = Literal["mapped", "unmapped"]
HPE_MODES: tuple[HpeMode, ...] = ("mapped", "unmapped")
# How Allocate names a container's devices: DeviceSpecs (every runtime) or
# CDI device names (runtimes with CDI: containerd 2.x, CRI-O).
DeviceListStrategy = Literal["device-specs", "cdi-cri"]
DEVICE_LIST_STRATEGIES: tuple[DeviceListStrategy, ...] = ("device-specs", "cdi-cri")
# Whether (and how) Allocate sets STC_SET_DEVICES, the HPE runtime's list of
# cluster IDs (see core/allocation.py for what each mode means).
StcSetDevices = Literal["none", "global", "local"]
STC_SET_DEVICES_MODES: tuple[StcSetDevices, ...] = ("none", "global", "local")
DEFAULT_CDI_SPEC_DIR = "/var/run/cdi"
# sharing.replicas: the most IDs advertised per NPU. Each replica is a device
# in every ListAndWatch message and in the kubelet's checkpoint, and a slice
# of one NPU's memory and time: a hundred sharers is already past any useful
# share. Two digits keep a replica ID (stc0::99) within the kubelet's 63
# characters for any NPU ID of up to 59.
MAX_REPLICAS = 100
# sharing.renameShared: the shared resource is <resourceName>.shared.
SHARED_SUFFIX = ".shared"
# How the NPUs are served: the device plugin API (a count of an extended
# resource), or Dynamic Resource Allocation (claims, the kubelet's DRA API).
Mode = Literal["device-plugin", "dra"]
MODES: tuple[Mode, ...] = ("device-plugin", "dra")
# How a device plugin becomes known to the kubelet: Register on kubelet.sock,
# or a registration socket the kubelet's plugin watcher finds (DRA mode
# always registers the second way).
Registration = Literal["kubelet-socket", "plugin-watcher"]
REGISTRATIONS: tuple[Registration, ...] = ("kubelet-socket", "plugin-watcher")
DEFAULT_PLUGIN_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DRA_DRIVER_NAME = "npu.streamcomputing.com"
# The kubelet's per-driver dir for a DRA driver's own files (the checkpoint).
DEFAULT_DRA_STATE_DIR = f"/var/lib/kubelet/plugins/{DRA_DRIVER_NAME}"
# dra.sliceIntervalSeconds: below 0.1 s a flapping NPU is a write storm; above
# a minute the scheduler keeps placing pods on an NPU gone that long.
MIN_SLICE_INTERVAL = 0.1
MAX_SLICE_INTERVAL = 60.0

DEFAULT_RESOURCE_NAME = "streamcomputing.com/npu"
DEFAULT_HPE_PATH = "/usr/local/hpe"
# An NPU's own node is stc<N>; its cluster nodes stc<N>c<k> and its control
# node stc<N>ctrl are its members. Only NPU 0 is documented by the vendor, and
# other card generations may name nodes differently: hence patterns.
DEFAULT_NPU_PATTERN = r"stc(?P<index>[0-9]+)"
DEFAULT_MEMBER_PATTERN = r"stc(?P<index>[0-9]+)(c[0-9]+|ctrl)"
# The members every NPU must have before it is Healthy (the vendor documents
# four clusters and a control node), as names with the NPU index in {index}.
DEFAULT_REQUIRED_MEMBERS = (*(f"stc{{index}}c{k}" for k in range(4)), "stc{index}ctrl")
# What every node must resolve to in sysfs: a PCI function of one of these
# vendors (0x23e2: Stream Computing), bound to one of these kernel drivers.
DEFAULT_PCI_VENDORS = ("0x23e2",)
DEFAULT_DRIVERS = ("stc",)
INDEX = "{index}"
# Where node-feature-discovery's nfd-worker reads local feature files.
DEFAULT_NFD_FEATURE_FILE = "/etc/kubernetes/node-feature-discovery/features.d/stc-npu"
# How long the feature file's labels live without a refresh: the agent
# rewrites it at half that age, so labels vanish this long after it dies.
DEFAULT_NFD_EXPIRY_SECONDS = 300
MIN_NFD_EXPIRY_SECONDS = 60
# PCI device ID -> the model name in the .model label.
DEFAULT_NFD_MODELS = (("0x0100", "STCP920"),)
# The HPE version file, relative to the HPE install dir. The vendor documents
# none: an assumption, hence configurable.
DEFAULT_HPE_VERSION_FILE = "version"
# The vendor's npu-exporter listens here; nothing of ours may.
NPU_EXPORTER_PORT = 9836

# Health signals whose policy and hysteresis the config sets: the vendor
# probe's. Node presence and the PCI function's identity and driver are not
# configurable: an NPU without its nodes or its driver cannot be handed out,
# so they turn an NPU Unhealthy at once and Healthy when they are back.
SignalAction = Literal["ignore", "unhealthy"]
SIGNAL_ACTIONS: tuple[SignalAction, ...] = ("ignore", "unhealthy")
PROBE_SIGNALS = ("cardStatus", "clusterStatus", "temperature", "probeFailed")
DEFAULT_STC_SMI = "/usr/local/hpe/bin/stc-smi"
# The vendor's images run HPE tools with LD_LIBRARY_PATH=/usr/local/hpe/lib.
DEFAULT_STC_SMI_LIBRARIES = "/usr/local/hpe/lib"


class ConfigError(ValueError):
    """A configuration value the agent refuses; the message is one line."""


@dataclass(frozen=True)
class HpeConfig:
    mode: HpeMode = "mapped"
    host_path: str = DEFAULT_HPE_PATH
    container_path: str = DEFAULT_HPE_PATH


@dataclass(frozen=True)
class DiscoveryConfig:
    # Full-match regular expressions over device node names; both must
    # capture the NPU index in a group named "index".
    npu_pattern: str = DEFAULT_NPU_PATTERN
    member_pattern: str = DEFAULT_MEMBER_PATTERN
    required_members: tuple[str, ...] = DEFAULT_REQUIRED_MEMBERS
    # Lower case, as sysfs writes them ("0x23e2").
    pci_vendors: tuple[str, ...] = DEFAULT_PCI_VENDORS
    drivers: tuple[str, ...] = DEFAULT_DRIVERS


@dataclass(frozen=True)
class SignalPolicy:
    """What a bad reading of one signal does, and how many it takes."""

    # "unhealthy": a signal that went bad makes its NPU Unhealthy; "ignore":
    # it is tracked and shown, but the NPU's health does not follow it.
    action: SignalAction = "unhealthy"
    # Consecutive bad readings that turn a good signal bad, and consecutive
    # good readings that turn it good again.
    fail_threshold: int = 2
    recover_threshold: int = 2


def _default_signals() -> dict[str, SignalPolicy]:
    # One failed run is often the tool, not the card (a slow start, a
    # busy driver): probeFailed needs three in a row, and one good run clears it.
    return {
        "cardStatus": SignalPolicy(),
        "clusterStatus": SignalPolicy(),
        "temperature": SignalPolicy(),
        "probeFailed": SignalPolicy(fail_threshold=3, recover_threshold=1),
    }


@dataclass(frozen=True)
class VendorProbeConfig:
    """The stc-smi probe: off by default (it needs access to the NPUs)."""

    enabled: bool = False
    tool: str = DEFAULT_STC_SMI
    # LD_LIBRARY_PATH for the tool only (the agent's own process keeps its
    # libraries); "" leaves the variable as the agent has it.
    library_path: str = DEFAULT_STC_SMI_LIBRARIES
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    # stc-smi runs at most this many at once (one run per NPU).
    concurrency: int = 2
    # Clusters each NPU must report (the STCP920 has 4): output with fewer is
    # partial, and partial output is a probe failure, never a Healthy card.
    clusters: int = 4


@dataclass(frozen=True)
class HealthConfig:
    vendor_probe: VendorProbeConfig = field(default_factory=VendorProbeConfig)
    signals: Mapping[str, SignalPolicy] = field(default_factory=_default_signals)


@dataclass(frozen=True)
class CdiConfig:
    # Where the agent writes its CDI spec (only with deviceListStrategy
    # cdi-cri): a directory the container runtime reads specs from.
    spec_dir: str = DEFAULT_CDI_SPEC_DIR


@dataclass(frozen=True)
class SharingConfig:
    # IDs advertised per NPU: 1 is no sharing (the NPU's own ID), N > 1 gives
    # stc0::0 .. stc0::N-1, each a whole NPU for whoever gets it.
    replicas: int = 1
    # With replicas > 1: advertise <resourceName>.shared instead of resourceName.
    rename_shared: bool = False
    # With replicas > 1: refuse a container more than one replica.
    fail_requests_greater_than_one: bool = False

    @property
    def shared(self) -> bool:
        return self.replicas > 1


@dataclass(frozen=True)
class DraConfig:
    # Where the DRA driver keeps its checkpoint of prepared claims: a host
    # dir that outlives the agent's container.
    state_dir: str = DEFAULT_DRA_STATE_DIR
    # The least time between two writes of the node's ResourceSlice: changes
    # in between fold into the next write, so a flapping NPU on many nodes
    # costs the API server at most one write per node per interval.
    slice_interval: float = 1.0


@dataclass(frozen=True)
class MetricsConfig:
    # Serve Prometheus metrics at /metrics on the probe port.
    enabled: bool = False


@dataclass(frozen=True)
class NfdConfig:
    # Write a node-feature-discovery local feature file (node labels).
    enabled: bool = False
    feature_file: str = DEFAULT_NFD_FEATURE_FILE
    expiry_seconds: int = DEFAULT_NFD_EXPIRY_SECONDS
    # (PCI device ID as sysfs writes it, model name), in the file's order.
    models: tuple[tuple[str, str], ...] = DEFAULT_NFD_MODELS
    hpe_version_file: str = DEFAULT_HPE_VERSION_FILE


@dataclass(frozen=True)
class Config:
    mode: Mode = "device-plugin"
    registration: Registration = "kubelet-socket"
    plugin_registry_dir: str = DEFAULT_PLUGIN_REGISTRY_DIR
    dra: DraConfig = field(default_factory=DraConfig)
    resource_name: str = DEFAULT_RESOURCE_NAME
    hpe: HpeConfig = field(default_factory=HpeConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    device_list_strategy: tuple[DeviceListStrategy, ...] = ("device-specs",)
    stc_set_devices: StcSetDevices = "none"
    cdi: CdiConfig = field(default_factory=CdiConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)

    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    nfd: NfdConfig = field(default_factory=NfdConfig)

    @property
    def advertised_resource(self) -> str:
        """The resource registered with the kubelet (renamed when shared)."""
        if self.sharing.shared and self.sharing.rename_shared:
            return self.resource_name + SHARED_SUFFIX
        return self.resource_name

    @property
    def uses_cdi(self) -> bool:
        """Devices are handed out by CDI name, so the spec must be written:
        Allocate with cdi-cri, and every NodePrepareResources answer in DRA mode."""
        return self.mode == "dra" or "cdi-cri" in self.device_list_strategy

    def to_mapping(self) -> dict[str, Any]:
        """The effective config in the file's own shape (for the start-up log)."""
        return {
            "resourceName": self.resource_name,
            "hpe": {
                "mode": self.hpe.mode,
                "hostPath": self.hpe.host_path,
                "containerPath": self.hpe.container_path,
            },
            "discovery": {
                "npuPattern": self.discovery.npu_pattern,
                "memberPattern": self.discovery.member_pattern,
                "requiredMembers": list(self.discovery.required_members),
                "pciVendors": list(self.discovery.pci_vendors),
                "drivers": list(self.discovery.drivers),
            },
            "health": {
                "vendorProbe": {
                    "enabled": self.health.vendor_probe.enabled,
                    "tool": self.health.vendor_probe.tool,
                    "libraryPath": self.health.vendor_probe.library_path,
                    "intervalSeconds": self.health.vendor_probe.interval_seconds,
                    "timeoutSeconds": self.health.vendor_probe.timeout_seconds,
                    "concurrency": self.health.vendor_probe.concurrency,
                    "clusters": self.health.vendor_probe.clusters,
                },
                "signals": {
                    name: {
                        "policy": policy.action,
                        "failThreshold": policy.fail_threshold,
                        "recoverThreshold": policy.recover_threshold,
                    }
                    for name, policy in self.health.signals.items()
                },
            },
            "deviceListStrategy": list(self.device_list_strategy),
            "stcSetDevices": self.stc_set_devices,
            "cdi": {"specDir": self.cdi.spec_dir},
            "sharing": {
                "replicas": self.sharing.replicas,
                "renameShared": self.sharing.rename_shared,
                "failRequestsGreaterThanOne": self.sharing.fail_requests_greater_than_one,
            },
            "mode": self.mode,
            "registration": self.registration,
            "pluginRegistryDir": self.plugin_registry_dir,
            "dra": {
                "stateDir": self.dra.state_dir,
                "sliceIntervalSeconds": self.dra.slice_interval,
            },
            "metrics": {"enabled": self.metrics.enabled},
            "nfd": {
                "enabled": self.nfd.enabled,
                "featureFile": self.nfd.feature_file,
                "expirySeconds": self.nfd.expiry_seconds,
                "models": dict(self.nfd.models),
                "hpeVersionFile": self.nfd.hpe_version_file,
            },
        }


# --- validators: each takes (key, value) and returns the value or raises ---

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def extended_resource_name_problem(name: str) -> str | None:
    """Why the kubelet would refuse ``name`` as a device plugin resource, or None.

    Mirrors the kubelet's own checks (``v1helper.IsExtendedResourceName``):
    ``domain/name`` with a DNS-subdomain domain outside ``kubernetes.io``, a
    qualified name part of at most 63 characters, and a quota form
    ``requests.<name>`` that is itself a qualified name.
    """
    if name.count("/") != 1:
        return "must be of the form <domain>/<name>, e.g. streamcomputing.com/npu"
    domain, short = name.split("/")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return "the kubernetes.io domain is reserved for native resources"
    if domain.startswith("requests."):
        return "must not start with 'requests.' (reserved for quota)"
    if not _DNS_SUBDOMAIN.fullmatch(domain) or len("requests." + domain) > 253:
        return f"domain {domain!r} is not a valid DNS subdomain"
    if len(short) > 63 or not _QUALIFIED_NAME_PART.fullmatch(short):
        return (
            f"name {short!r} must be at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    return None


_CDI_VENDOR_OR_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


def cdi_kind_problem(kind: str) -> str | None:
    """Why CDI would refuse ``kind`` (``vendor/class``), or None.

    Vendor and class each start with a letter, end with a letter or digit,
    and hold only letters, digits, '_', '-' and '.' (a resource name's domain
    may start with a digit: CDI's vendor may not).
    """
    vendor, slash, class_ = kind.partition("/")
    if not slash or not vendor or not class_:
        return "a CDI kind is vendor/class"
    for part, what in ((vendor, "vendor"), (class_, "class")):
        if not _CDI_VENDOR_OR_CLASS.fullmatch(part):
            return (
                f"{what} {part!r} must start with a letter, end with a letter or digit "
                "and hold only letters, digits, '_', '-', '.'"
            )
    return None


def _resource_name(key: str, value: object) -> str:
    text = _string(key, value)
    problem = extended_resource_name_problem(text)
    if problem:
        raise ConfigError(f"{key}: invalid resource name {text!r}: {problem}")
    return text


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    if not value:
        raise ConfigError(f"{key}: must not be empty")
    return value


def _absolute_path(key: str, value: object) -> str:
    text = _string(key, value)
    if not text.startswith("/"):
        raise ConfigError(f"{key}: must be an absolute path, got {text!r}")
    if "\0" in text or posixpath.normpath(text) != text.rstrip("/") or text == "/":
        raise ConfigError(f"{key}: must be a normalized absolute path other than /, got {text!r}")
    return text


def _hpe_mode(key: str, value: object) -> str:
    if value not in HPE_MODES:
        raise ConfigError(f"{key}: expected one of {', '.join(HPE_MODES)}, got {_describe(value)}")
    return str(value)


def _device_list_strategy(key: str, value: object) -> tuple[str, ...]:
    known = ", ".join(DEVICE_LIST_STRATEGIES)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {known}, got {_describe(value)}")
    if not value:
        raise ConfigError(f"{key}: must name at least one of {known}")
    for item in value:
        if item not in DEVICE_LIST_STRATEGIES:
            raise ConfigError(f"{key}: unknown strategy {_describe(item)} (known: {known})")
    repeated = sorted({item for item in value if value.count(item) > 1})
    if repeated:
        raise ConfigError(f"{key}: {', '.join(repeated)} listed more than once")
    return tuple(value)


def _one_of(choices: tuple[str, ...]) -> Validator:
    def validate(key: str, value: object) -> str:
        if value not in choices:
            raise ConfigError(
                f"{key}: expected one of {', '.join(choices)}, got {_describe(value)}"
            )
        return str(value)

    return validate


def _stc_set_devices(key: str, value: object) -> str:
    if value not in STC_SET_DEVICES_MODES:
        known = ", ".join(STC_SET_DEVICES_MODES)
        raise ConfigError(f"{key}: expected one of {known}, got {_describe(value)}")
    return str(value)


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    return value


def _replicas(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{key}: expected a whole number 1-{MAX_REPLICAS}, got {_describe(value)}"
        )
    if not 1 <= value <= MAX_REPLICAS:
        raise ConfigError(
            f"{key}: must be 1 (no sharing) to {MAX_REPLICAS}, got {value} "
            f"(each replica is a device the kubelet lists and checkpoints)"
        )
    return value


def _index_pattern(key: str, value: object) -> str:
    text = _string(key, value)
    try:
        compiled = re.compile(text)
    except re.error as error:
        raise ConfigError(f"{key}: not a valid regular expression ({error}): {text!r}") from None
    if "index" not in compiled.groupindex:
        raise ConfigError(f"{key}: must capture the NPU index in a group named 'index': {text!r}")
    problem = _index_group_problem(text, compiled.groupindex["index"])
    if problem:
        raise ConfigError(f"{key}: the group 'index' {problem}: {text!r}")
    return text


# The re module's own parser (private, the same since Python 3.11): only it
# can tell whether a group may be skipped or match nothing. Taken as Any, as
# it has no type stubs.
_REGEX_PARSER: Any = importlib.import_module("re._parser")
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def _index_group_problem(pattern: str, group: int) -> str | None:
    """Why the index group would let a matching name go without an index.

    A node name the pattern matches with an empty index (``stc`` for
    ``stc(?P<index>[0-9]*)``), or with the group not taking part, has no NPU
    to belong to: such patterns are refused here, and scanning skips such
    names whatever the pattern (``core.devices.Naming``).
    """
    found = _find_group(_REGEX_PARSER.parse(pattern), group, optional=False)
    if found is None:
        return None  # cannot happen: the group exists
    optional, body = found
    if optional:
        return "is optional (in an alternative, or repeated zero times or more)"
    if body.getwidth()[0] == 0:
        return "can match an empty string"
    return None


def _find_group(items: Iterable[Any], group: int, *, optional: bool) -> tuple[bool, Any] | None:
    """(whether the match may skip it, its body) of capture group ``group``."""
    for op, arguments in items:
        kind = str(op)
        children: list[tuple[Any, bool]] = []
        if kind == "SUBPATTERN":
            if arguments[0] == group:
                return optional, arguments[3]
            children = [(arguments[3], optional)]
        elif kind in _REPEATS:
            children = [(arguments[2], optional or arguments[0] == 0)]
        elif kind == "BRANCH":
            children = [(branch, True) for branch in arguments[1]]
        elif kind == "GROUPREF_EXISTS":
            children = [(branch, True) for branch in arguments[1:] if branch is not None]
        elif kind == "ATOMIC_GROUP":
            children = [(arguments, optional)]
        elif kind in {"ASSERT", "ASSERT_NOT"}:
            children = [(arguments[1], optional or kind == "ASSERT_NOT")]
        for child, child_optional in children:
            found = _find_group(child, group, optional=child_optional)
            if found is not None:
                return found
    return None


def _string_list(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {_describe(value)}")
    items = tuple(_string(f"{key}[{position}]", item) for position, item in enumerate(value))
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"{key}: listed twice: {', '.join(repeated)}")
    return items


def _required_members(key: str, value: object) -> tuple[str, ...]:
    names = _string_list(key, value)
    for position, name in enumerate(names):
        if name.count(INDEX) != 1:
            raise ConfigError(
                f"{key}[{position}]: must contain {INDEX} once, where the NPU index goes "
                f"(e.g. stc{INDEX}ctrl), got {name!r}"
            )
    return names


_PCI_ID = re.compile(r"0x[0-9a-f]{4}")


def _pci_vendors(key: str, value: object) -> tuple[str, ...]:
    vendors = _string_list(key, value)
    if not vendors:
        raise ConfigError(f"{key}: must list at least one PCI vendor ID, e.g. 0x23e2")
    for position, vendor in enumerate(vendors):
        if not _PCI_ID.fullmatch(vendor):
            raise ConfigError(
                f"{key}[{position}]: a PCI vendor ID is 0x and 4 lower-case hex digits "
                f"(as sysfs writes it, e.g. 0x23e2), got {vendor!r}"
            )
    return vendors


def _drivers(key: str, value: object) -> tuple[str, ...]:
    drivers = _string_list(key, value)
    if not drivers:
        raise ConfigError(f"{key}: must list at least one kernel driver name, e.g. stc")
    for position, driver in enumerate(drivers):
        if "/" in driver or driver in {".", ".."} or not driver.isprintable():
            raise ConfigError(f"{key}[{position}]: not a kernel driver name: {driver!r}")
    return drivers


def _check_required_members(discovery: DiscoveryConfig) -> None:
    """Each required member name must be a member of its own NPU by the patterns
    (checked for two indices, so a name that ignores {index} is caught)."""
    npu = re.compile(discovery.npu_pattern)
    member = re.compile(discovery.member_pattern)
    for position, template in enumerate(discovery.required_members):
        key = f"discovery.requiredMembers[{position}]"
        for index in (0, 17):
            name = template.replace(INDEX, str(index))
            match = member.fullmatch(name)
            if npu.fullmatch(name):
                raise ConfigError(f"{key}: {name!r} is an NPU's own node by npuPattern")
            if match is None or match.group("index") != str(index):
                raise ConfigError(
                    f"{key}: {name!r} is not a member of NPU {index} by memberPattern "
                    f"{discovery.member_pattern!r}"
                )


def _expiry_seconds(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number of seconds, got {_describe(value)}")
    if value < MIN_NFD_EXPIRY_SECONDS:
        raise ConfigError(
            f"{key}: must be at least {MIN_NFD_EXPIRY_SECONDS} (seconds; nfd-worker may read "
            f"the file only once a minute), got {value}"
        )
    return value


def _nfd_models(key: str, value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{key}: expected a mapping of PCI device ID to model name, got {_describe(value)}"
        )
    models = []
    for device, model in value.items():
        if not isinstance(device, str) or not _PCI_ID.fullmatch(device):
            raise ConfigError(
                f"{key}: a PCI device ID is 0x and 4 lower-case hex digits "
                f"(as sysfs writes it, e.g. 0x0100), got {_describe(device)}"
            )
        if not isinstance(model, str) or not nfd.is_label_value(model):
            raise ConfigError(
                f"{key}.{device}: a model name must be a label value (at most 63 of "
                f"[A-Za-z0-9-_.], alphanumeric at both ends), got {_describe(model)}"
            )
        models.append((device, model))
    return tuple(models)


def _relative_path(key: str, value: object) -> str:
    text = _string(key, value)
    if text.startswith("/") or "\0" in text or posixpath.normpath(text) != text or ".." in text:
        raise ConfigError(
            f"{key}: must be a normalized relative path inside the directory, got {text!r}"
        )
    return text


def _count(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number, got {_describe(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be from {low} to {high}, got {value}")
    return value


def _seconds(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of seconds, got {_describe(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be from {low:g} to {high:g} seconds, got {value}")
    return float(value)


def _signal_action(key: str, value: object) -> str:
    if value not in SIGNAL_ACTIONS:
        raise ConfigError(
            f"{key}: expected one of {', '.join(SIGNAL_ACTIONS)}, got {_describe(value)}"
        )
    return str(value)


_VENDOR_PROBE: dict[str, tuple[Validator, str]] = {
    "enabled": (_boolean, "enabled"),
    "tool": (_absolute_path, "tool"),
    "libraryPath": (
        lambda key, value: value if value == "" else _absolute_path(key, value),
        "library_path",
    ),
    "intervalSeconds": (lambda key, value: _seconds(key, value, 1, 3600), "interval_seconds"),
    "timeoutSeconds": (lambda key, value: _seconds(key, value, 0.1, 600), "timeout_seconds"),
    "concurrency": (lambda key, value: _count(key, value, 1, 64), "concurrency"),
    "clusters": (lambda key, value: _count(key, value, 1, 64), "clusters"),
}
_SIGNAL_POLICY: dict[str, tuple[Validator, str]] = {
    "policy": (_signal_action, "action"),
    "failThreshold": (lambda key, value: _count(key, value, 1, 1000), "fail_threshold"),
    "recoverThreshold": (lambda key, value: _count(key, value, 1, 1000), "recover_threshold"),
}


def _health(raw: object) -> HealthConfig:
    """The health section: vendorProbe, and signals by name (each optional;
    a signal left out keeps its default policy)."""
    if raw is None:
        return HealthConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"health: expected a mapping, got {_describe(raw)}")
    _check_keys("health.", raw, {"vendorProbe", "signals"})
    probe = VendorProbeConfig(
        **_section_values("health.vendorProbe", raw.get("vendorProbe"), _VENDOR_PROBE)  # type: ignore[arg-type]
    )
    if probe.timeout_seconds > probe.interval_seconds:
        raise ConfigError(
            f"health.vendorProbe.timeoutSeconds: {probe.timeout_seconds:g} is longer than "
            f"intervalSeconds {probe.interval_seconds:g}"
        )
    signals = _default_signals()
    raw_signals = raw.get("signals")
    if raw_signals is not None:
        if not isinstance(raw_signals, Mapping):
            raise ConfigError(f"health.signals: expected a mapping, got {_describe(raw_signals)}")
        _check_keys("health.signals.", raw_signals, set(PROBE_SIGNALS))
        for name, section in raw_signals.items():
            values = _section_values(f"health.signals.{name}", section, _SIGNAL_POLICY)
            signals[name] = SignalPolicy(**{**vars(signals[name]), **values})
    return HealthConfig(vendor_probe=probe, signals=signals)


def _describe(value: object) -> str:  # noqa: PLR0911 (one return per kind reads best)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


Validator = Callable[[str, object], object]

# The whole schema: file key -> (validator, dataclass field). Nested sections
# are their own tables, so unknown keys are found at every level.
_SECTIONS: dict[str, dict[str, tuple[Validator, str]]] = {
    "hpe": {
        "mode": (_hpe_mode, "mode"),
        "hostPath": (_absolute_path, "host_path"),
        "containerPath": (_absolute_path, "container_path"),
    },
    "discovery": {
        "npuPattern": (_index_pattern, "npu_pattern"),
        "memberPattern": (_index_pattern, "member_pattern"),
        "requiredMembers": (_required_members, "required_members"),
        "pciVendors": (_pci_vendors, "pci_vendors"),
        "drivers": (_drivers, "drivers"),
    },
    "cdi": {
        "specDir": (_absolute_path, "spec_dir"),
    },
    "sharing": {
        "replicas": (_replicas, "replicas"),
        "renameShared": (_boolean, "rename_shared"),
        "failRequestsGreaterThanOne": (_boolean, "fail_requests_greater_than_one"),
    },
    "dra": {
        "stateDir": (_absolute_path, "state_dir"),
        "sliceIntervalSeconds": (
            lambda key, value: _seconds(key, value, MIN_SLICE_INTERVAL, MAX_SLICE_INTERVAL),
            "slice_interval",
        ),
    },
    "metrics": {
        "enabled": (_boolean, "enabled"),
    },
    "nfd": {
        "enabled": (_boolean, "enabled"),
        "featureFile": (_absolute_path, "feature_file"),
        "expirySeconds": (_expiry_seconds, "expiry_seconds"),
        "models": (_nfd_models, "models"),
        "hpeVersionFile": (_relative_path, "hpe_version_file"),
    },
}
_TOP_LEVEL: dict[str, tuple[Validator, str]] = {
    "mode": (_one_of(MODES), "mode"),
    "registration": (_one_of(REGISTRATIONS), "registration"),
    "pluginRegistryDir": (_absolute_path, "plugin_registry_dir"),
    "resourceName": (_resource_name, "resource_name"),
    "deviceListStrategy": (_device_list_strategy, "device_list_strategy"),
    "stcSetDevices": (_stc_set_devices, "stc_set_devices"),
}


def _check_keys(prefix: str, mapping: Mapping[Any, Any], known: set[str]) -> None:
    for key in mapping:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")


def _section_values(
    name: str, raw: object, table: dict[str, tuple[Validator, str]]
) -> dict[str, object]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {_describe(raw)}")
    _check_keys(f"{name}.", raw, set(table))
    return {
        attribute: validate(f"{name}.{key}", raw[key])
        for key, (validate, attribute) in table.items()
        if key in raw
    }


def parse_config(raw: object) -> Config:
    """Build a Config from a parsed YAML document (None = empty file = defaults)."""
    if raw is None:
        return Config()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"top level: expected a mapping, got {_describe(raw)}")
    _check_keys("", raw, set(_TOP_LEVEL) | set(_SECTIONS) | {"health"})
    top = {
        attribute: validate(key, raw[key])
        for key, (validate, attribute) in _TOP_LEVEL.items()
        if key in raw
    }
    hpe = HpeConfig(**_section_values("hpe", raw.get("hpe"), _SECTIONS["hpe"]))  # type: ignore[arg-type]
    discovery = DiscoveryConfig(
        **_section_values("discovery", raw.get("discovery"), _SECTIONS["discovery"])  # type: ignore[arg-type]
    )
    _check_required_members(discovery)
    health = _health(raw.get("health"))
    cdi = CdiConfig(**_section_values("cdi", raw.get("cdi"), _SECTIONS["cdi"]))  # type: ignore[arg-type]
    sharing = SharingConfig(**_section_values("sharing", raw.get("sharing"), _SECTIONS["sharing"]))  # type: ignore[arg-type]
    dra = DraConfig(**_section_values("dra", raw.get("dra"), _SECTIONS["dra"]))  # type: ignore[arg-type]
    if top.get("mode") == "dra":
        # The effective value (for the log and a round trip): DRA plugins
        # have no other way to register.
        top.setdefault("registration", "plugin-watcher")
    metrics = MetricsConfig(**_section_values("metrics", raw.get("metrics"), _SECTIONS["metrics"]))  # type: ignore[arg-type]
    nfd_config = NfdConfig(**_section_values("nfd", raw.get("nfd"), _SECTIONS["nfd"]))  # type: ignore[arg-type]
    config = Config(
        hpe=hpe,
        discovery=discovery,
        health=health,
        cdi=cdi,
        sharing=sharing,
        dra=dra,
        metrics=metrics,
        nfd=nfd_config,
        **top,  # type: ignore[arg-type]
    )
    _check_combination(config, raw)
    return config


def _check_combination(config: Config, raw: Mapping[Any, Any]) -> None:
    """Rules across keys: each value alone was valid."""
    advertised = config.advertised_resource
    problem = extended_resource_name_problem(advertised)
    if problem:
        raise ConfigError(
            f"sharing.renameShared: the shared resource {advertised!r} "
            f"(resourceName + {SHARED_SUFFIX!r}) is not a valid resource name: {problem}"
        )
    if config.mode == "dra" and raw.get("registration") == "kubelet-socket":
        raise ConfigError(
            "registration: kubelet-socket is for mode device-plugin; mode dra always "
            "registers through the kubelet's plugin watcher (leave registration unset)"
        )
    if config.mode == "dra" and config.sharing.shared:
        # Replicas are device plugin IDs; under DRA, pods share an NPU by
        # sharing one ResourceClaim.
        raise ConfigError(
            "sharing.replicas: replicas > 1 is for mode device-plugin; with mode dra, "
            "pods share an NPU by referencing one ResourceClaim"
        )
    if config.mode == "dra":
        problem = cdi_kind_problem(config.resource_name)
        if problem:
            raise ConfigError(
                f"mode: dra names devices by the CDI kind {config.resource_name!r} "
                f"(the resourceName), which CDI refuses: {problem}"
            )
    elif config.uses_cdi:
        problem = cdi_kind_problem(config.resource_name)
        if problem:
            raise ConfigError(
                f"deviceListStrategy: cdi-cri names devices by the CDI kind "
                f"{config.resource_name!r} (the resourceName), which CDI refuses: {problem}"
            )
    if config.nfd.enabled:
        problem = nfd.label_name_problem(config.resource_name)
        if problem:
            raise ConfigError(f"resourceName: with nfd.enabled, {problem}")
