"""A real single-node Kubernetes v1.36 cluster on this machine, and its teardown.

Every component (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, containerd, kubelet) runs in a network namespace of its own
(a veth pair into it, pods on a bridge CNI network inside it), entered with
`nsenter --net`, not `ip netns exec`, which remounts /sys and hides the cgroup
v1 mounts from the kubelet. Only addresses of that namespace and loopback
receive traffic.

Every change to the host is written to the state file BEFORE it is made
(process pids with their start times, the sysctls' old values, the netns,
cgroups, device nodes, directories), so `down` can undo what an earlier,
killed run left. `down` is idempotent and never raises for a part that is
already gone; it reports what it could not undo.

    python -m ci.e2e.cluster up      # bring the node up (after cleaning leftovers)
    python -m ci.e2e.cluster down    # undo everything recorded in the state file
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ci.e2e import transcript

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".tools" / "bin"  # kubectl, helm3, helm4 (ci/install-helm.sh)
E2E_BIN = REPO / ".tools" / "e2e" / "bin"  # kube*, containerd, shim, ctr, kubelet-1.23
OUT_DIR = REPO / "build" / "e2e"  # transcript, figures, component logs
LOG_DIR = OUT_DIR / "logs"

BASE = Path("/var/lib/stc-npu-e2e")  # persistent data of the node
RUN = Path("/run/stc-npu-e2e")  # sockets
STATE_FILE = BASE / "state.json"

NETNS = "stc-npu-e2e"
NETNS_PATH = Path("/run/netns") / NETNS
HOST_VETH, NODE_VETH = "stce2e-host", "stce2e-node"
HOST_IP, NODE_IP = "10.213.0.1", "10.213.0.2"
POD_SUBNET = "10.214.0.0/24"
SERVICE_RANGE = "10.96.0.0/24"
# The `kubernetes` Service (the first IP of SERVICE_RANGE, in the apiserver's
# certificate): pods reach the API server there (KUBERNETES_SERVICE_HOST).
KUBERNETES_SERVICE_IP = "10.96.0.1"
NODE_NAME = "stc-e2e-node"
APISERVER = f"https://{NODE_IP}:6443"
CGROUP_NAME = "stc-npu-e2e"  # the kubelet's cgroupRoot, in every v1 hierarchy
CGROUP_FS = Path("/sys/fs/cgroup")
CONTAINERD_SOCK = RUN / "containerd.sock"
# containerd's only CDI spec dir (the defaults /etc/cdi and /var/run/cdi are
# shared with anything else on the host): the CDI scenario's cdi.specDir.
CDI_SPEC_DIR = RUN / "cdi"
# The kubelet's device-plugin dir is fixed at this path (v1.23 and v1.36
# alike; --root-dir does not move it). containerd and the kubelet run in a
# mount namespace of the node's own where a private dir is bind-mounted
# there, so the host's path stays untouched. The namespace lives as long as
# NODE_MNTNS is bind-mounted; its mounts (pods' rootfs, volumes) vanish with it.
KUBELET_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
PLUGIN_DIR = BASE / "device-plugins"  # what the node sees at KUBELET_PLUGIN_DIR
NODE_MNTNS = RUN / "ns" / "mnt"
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # fixed in every kubelet
# The kubelet changes these at start (protectKernelDefaults false); teardown
# puts back the values read before.
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# The major number of the simulated NPUs' device nodes (240-254: local use).
DEVICE_MAJOR = 240
# The namespace of the v1.23 kubelet's static pods (their logs go to the
# fixed /var/log/pods/<namespace>_<name>_<uid>).
STATIC_POD_NAMESPACE = "stc-npu-e2e"
# Labels that make the chart's default affinity place the agent on the node.
NODE_LABELS = "streamcomputing.com/npu.present=true"


class E2EError(RuntimeError):
    """A step of the cluster harness failed; the message says which and why."""


# --- state file ---------------------------------------------------------


def load_state() -> dict[str, Any]:
    if STATE_FILE.exists():
        state: dict[str, Any] = json.loads(STATE_FILE.read_text())
        return state
    return {}


def save_state(state: dict[str, Any]) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(STATE_FILE)


def record(key: str, value: Any) -> None:
    """Append ``value`` to the list ``key`` of the state file, at once."""
    state = load_state()
    items = state.setdefault(key, [])
    if value not in items:
        items.append(value)
    save_state(state)


def unrecord(key: str, value: Any) -> None:
    state = load_state()
    if value in state.get(key, []):
        state[key].remove(value)
        save_state(state)


# --- processes ----------------------------------------------------------


def start_time_of(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None if gone.

    Kept with the pid so that a pid reused by another process after a reboot
    or a long pause is never signalled.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def is_running(pid: int, start: str | None) -> bool:
    current = start_time_of(pid)
    if current is None:
        return False
    # A zombie is not running; its start time still matches.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status != "Z" and (start is None or current == start)


_children: dict[int, subprocess.Popen[bytes]] = {}


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    netns: bool = True,
    mntns: bool = False,
    env: dict[str, str] | None = None,
    log_name: str | None = None,
) -> int:
    """Start ``argv`` (inside the node's netns and, with ``mntns``, its mount
    namespace), output to LOG_DIR/NAME.log.

    nsenter execs the command, so the pid recorded is the component's own.
    A new session keeps a Ctrl-C at the terminal away from the components:
    teardown stops them in order.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{log_name or name}.log"
    prefix = ["nsenter", *([f"--net={NETNS_PATH}"] if netns else [])]
    prefix += [f"--mount={NODE_MNTNS}"] if mntns else []
    prefix = [*prefix, "--"] if len(prefix) > 1 else []
    with log_path.open("ab") as log:
        log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        log.flush()
        child = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _children[child.pid] = child
    start = start_time_of(child.pid)
    record("processes", {"name": name, "pid": child.pid, "start": start})
    return child.pid


def stop_process(pid: int, start: str | None, *, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps it when it is our child."""
    if is_running(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_running(pid, start) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if is_running(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while is_running(pid, start):
                _reap(pid)
                time.sleep(0.05)
    _reap(pid)
    state = load_state()
    state["processes"] = [p for p in state.get("processes", []) if p["pid"] != pid]
    save_state(state)


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def stop_named(name: str) -> None:
    for proc in list(load_state().get("processes", [])):
        if proc["name"] == name:
            stop_process(proc["pid"], proc["start"])


# --- small helpers ------------------------------------------------------


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure raise with its output."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        env=env,
        check=False,
    )
    if check and result.returncode != 0:
        raise E2EError(
            f"`{' '.join(argv)}` exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result


def wait_for(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout: float = 120,
    interval: float = 0.2,
) -> float:
    """Poll ``condition`` until true; returns the seconds it took.

    Timeouts are generous on purpose (2 shared cores); they bound a hang,
    they assert no speed.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return time.monotonic() - started
        if time.monotonic() > deadline:
            raise E2EError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def tool(name: str) -> str:
    """A pinned tool of ours (kubectl, helm3, helm4, ctr, kubelet...)."""
    for directory in (E2E_BIN, TOOLS_BIN):
        if (directory / name).exists():
            return str(directory / name)
    raise E2EError(f"{name} not found in {E2E_BIN} or {TOOLS_BIN}: run `make e2e` to set up")


def tool_env() -> dict[str, str]:
    """The environment for components: our containerd shim first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{E2E_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


# --- preflight ----------------------------------------------------------


def preflight_problems() -> list[str]:
    """Why the e2e cannot run on this machine (empty: it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("it must run as root (it runs a kubelet and makes device nodes)")
    if not (CGROUP_FS / "devices" / "devices.list").exists():
        problems.append(
            f"no cgroup v1 devices hierarchy at {CGROUP_FS}/devices "
            "(the e2e checks the devices cgroup of the pods, cgroup v1)"
        )
    if not (REPO.parent / "shared" / "k8s").is_dir():
        problems.append(
            f"no {REPO.parent / 'shared' / 'k8s'} (the Kubernetes binaries beside the repo)"
        )
    if not Path("/proc/self/ns/net").exists():
        problems.append("no network namespaces (/proc/self/ns/net missing)")
    return problems


# --- PKI ----------------------------------------------------------------


def make_pki(pki: Path) -> None:
    """A CA and the client/server certificates of the node, with openssl.

    EC P-256 keys: a few milliseconds each, accepted by every component.
    """
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key)])
    run(
        [
            "openssl", "req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca_crt),
            "-days", "7", "-subj", "/CN=stc-npu-e2e-ca",
        ]
    )  # fmt: skip
    certs: dict[str, tuple[str, str]] = {
        # name: (subject, extensions)
        "apiserver": (
            "/CN=kube-apiserver",
            "extendedKeyUsage=serverAuth\nsubjectAltName="
            f"IP:{NODE_IP},IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost",
        ),
        "apiserver-kubelet-client": (
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "extendedKeyUsage=clientAuth",
        ),
        "admin": ("/O=system:masters/CN=stc-e2e-admin", "extendedKeyUsage=clientAuth"),
        "kubelet": (
            f"/O=system:nodes/CN=system:node:{NODE_NAME}",
            "extendedKeyUsage=clientAuth",
        ),
        "controller-manager": ("/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth"),
        "scheduler": ("/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth"),
    }
    for name, (subject, extensions) in certs.items():
        key, csr, crt = pki / f"{name}.key", pki / f"{name}.csr", pki / f"{name}.crt"
        ext = write(pki / f"{name}.ext", extensions + "\n")
        run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)])
        run(["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject])
        run(
            [
                "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt),
                "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(crt),
                "-days", "7", "-extfile", str(ext),
            ]
        )  # fmt: skip
    sa_key = pki / "sa.key"
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(sa_key)])
    run(["openssl", "ec", "-in", str(sa_key), "-pubout", "-out", str(pki / "sa.pub")])


def kubeconfig(path: Path, pki: Path, user: str) -> Path:
    """A kubeconfig (JSON is YAML) for the client certificate ``user``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "e2e",
                "cluster": {"server": APISERVER, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }
    return write(path, json.dumps(config, indent=2), 0o600)


# --- configuration files -------------------------------------------------


def containerd_config(base: Path) -> str:
    """containerd 2.x config: private dirs everywhere, the pinned pause image.

    restrict_oom_score_adj: this VM's bounding set lacks CAP_SYS_RESOURCE, so
    runc cannot set the kubelet's oom_score_adj of -998 without it. The pin
    keeps containerd from pulling its own default pause image (nothing can be
    pulled here). NRI off and private shim/CDI dirs keep it off shared paths.
    """
    return f"""\
version = 3
root = "{base}/containerd/root"
state = "{RUN}/containerd/state"
temp = "{base}/containerd/tmp"

[grpc]
  address = "{CONTAINERD_SOCK}"

[ttrpc]
  address = "{CONTAINERD_SOCK}.ttrpc"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  # Pod netns files under our state dir, not the host's shared /run/netns.
  netns_mounts_under_state_dir = true
  enable_cdi = true
  cdi_spec_dirs = ["{CDI_SPEC_DIR}"]
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{base}/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:3.10"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{RUN}/containerd/shim"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/containerd/opt"
"""


def cni_config(base: Path) -> str:
    """A bridge network inside the node's netns; no masquerade, no iptables.
    Pods route only the Service range, through the bridge, where the node's
    DNAT (route_kubernetes_service) takes the `kubernetes` Service's IP to
    the API server; nothing else outside the pod network is reachable."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "stc-npu-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "stce2e-cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": SERVICE_RANGE}],
                        "dataDir": str(base / "cni" / "ipam"),
                    },
                }
            ],
        },
        indent=2,
    )


def kubelet_config(base: Path, pki: Path) -> str:
    """KubeletConfiguration of the v1.36 node (JSON is YAML)."""
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroup v1 here: 1.35+ refuses it unless told; the driver must match
        # containerd's (SystemdCgroup = false).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        # Pods' cgroups under a tree of our own, removed at teardown.
        "cgroupRoot": f"/{CGROUP_NAME}",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "failSwapOn": False,
        "podLogsDir": str(base / "pod-logs"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        # A test VM's disk may be fuller than the default thresholds allow.
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        # Node status every 2 s (default 10 s): capacity changes reach the API
        # sooner, so the waits in the tests are shorter. The figures say so.
        "nodeStatusUpdateFrequency": "2s",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "resolvConf": str(write(base / "resolv.conf", "nameserver 127.0.0.1\n")),
    }
    return json.dumps(config, indent=2)


# --- the node -----------------------------------------------------------


def route_kubernetes_service() -> None:
    """What kube-proxy would do for the one Service the node needs: the
    `kubernetes` Service's IP:443 to the API server, for pods (prerouting)
    and the node's own processes (output). nft, not iptables: one ruleset,
    whatever iptables flavour the host has. The rules live in the node's
    netns and go with it at teardown."""
    dnat = f"ip daddr {KUBERNETES_SERVICE_IP} tcp dport 443 dnat to {NODE_IP}:6443"
    ruleset = f"""\
table ip {NETNS} {{
  chain prerouting {{ type nat hook prerouting priority -100; {dnat}; }}
  chain output {{ type nat hook output priority -100; {dnat}; }}
}}
"""
    run(["ip", "netns", "exec", NETNS, "nft", "-f", "-"], input_text=ruleset)


def make_node_mount_namespace() -> None:
    """A persistent mount namespace where KUBELET_PLUGIN_DIR is PLUGIN_DIR.

    The namespace is kept by a bind mount of its nsfs file, which needs a
    private mount above it (as `ip netns` does for /run/netns). The mount
    point KUBELET_PLUGIN_DIR must exist on the host: the dirs we create for
    it are recorded and removed at teardown.
    """
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    missing = [d for d in (KUBELET_PLUGIN_DIR.parent, KUBELET_PLUGIN_DIR) if not d.exists()]
    for directory in missing:
        record("dirs", str(directory))
        directory.mkdir()
    holder = NODE_MNTNS.parent
    holder.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(holder), str(holder)])
    run(["mount", "--make-private", str(holder)])
    NODE_MNTNS.touch()
    run(["unshare", f"--mount={NODE_MNTNS}", "--propagation", "private", "true"])
    run(
        [
            "nsenter", f"--mount={NODE_MNTNS}", "--",
            "mount", "--bind", str(PLUGIN_DIR), str(KUBELET_PLUGIN_DIR),
        ]
    )  # fmt: skip


class Cluster:
    """The v1.36 node. ``up`` records each change before making it; ``down``
    (a module function, driven by the state file alone) undoes them."""

    def __init__(self) -> None:
        self.pki = BASE / "pki"
        self.admin_kubeconfig = BASE / "admin.kubeconfig"
        self.kubelet_root = BASE / "kubelet"
        # The kubelet's plugin watcher's dir (under --root-dir, unlike the
        # device-plugin dir).
        self.plugin_registry_dir = self.kubelet_root / "plugins_registry"

    # -- clients --

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [tool("kubectl"), f"--kubeconfig={self.admin_kubeconfig}", *args],
            check=check,
            timeout=timeout,
            input_text=input_text,
        )

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, helm: str, *args: str, check: bool = True, timeout: float = 300) -> Any:
        """Run ``helm`` (helm3 or helm4) against the node."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.admin_kubeconfig)
        # Helm's caches and config stay in our output dir, not in ~/.
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env[var] = str(OUT_DIR / "helm" / sub)
        return run([tool(helm), *args], check=check, timeout=timeout, env=env)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            [tool("ctr"), f"--address={CONTAINERD_SOCK}", "-n", "k8s.io", *args],
            check=check,
            timeout=300,
        )

    # -- up --

    def up(self, images: Sequence[Path] = ()) -> None:
        problems = preflight_problems()
        if problems:
            raise E2EError("cannot run the e2e here: " + "; ".join(problems))
        down()  # whatever an earlier, killed run left
        with transcript.step("host: dirs, sysctls, cgroups, network namespace"):
            self._prepare_host()
        with transcript.step("pki (openssl) and configs"):
            make_pki(self.pki)
            for user in ("admin", "kubelet", "controller-manager", "scheduler"):
                kubeconfig(BASE / f"{user}.kubeconfig", self.pki, user)
            write(BASE / "containerd.toml", containerd_config(BASE))
            write(BASE / "cni" / "net.d" / "10-stc-npu-e2e.conflist", cni_config(BASE))
            write(BASE / "kubelet.yaml", kubelet_config(BASE, self.pki))
        with transcript.step("etcd and kube-apiserver"):
            self._start_etcd()
            self._start_apiserver()
        with transcript.step("kube-controller-manager, kube-scheduler, containerd"):
            self._start_controllers()
            self._start_containerd()
        if images:
            with transcript.step(f"import {len(images)} image(s) into containerd"):
                for image in images:
                    self.ctr("images", "import", str(image))
        with transcript.step("kubelet v1.36 and node Ready"):
            self.start_kubelet()
            self.wait_node_ready()

    def _prepare_host(self) -> None:
        state = load_state()
        # Read the sysctls before anything can change them.
        state["sysctls"] = {name: sysctl_path(name).read_text().strip() for name in KUBELET_SYSCTLS}
        save_state(state)
        for directory in (BASE, RUN, LOG_DIR):
            directory.mkdir(parents=True, exist_ok=True)
        # A fresh node each run; containerd's root (the image store) is kept.
        for stale in ("kubelet", "kubelet-pki", "pod-logs", "cni", "etcd", "device-plugins", "pki"):
            shutil.rmtree(BASE / stale, ignore_errors=True)
        record("dirs", str(RUN))
        CDI_SPEC_DIR.mkdir(exist_ok=True)  # goes with RUN
        # The CNI library keeps a cache in /var/lib/cni, and every kubelet links
        # container logs from the fixed /var/log/containers: removed only if we
        # made them (our links in there go at teardown in any case).
        for shared in ("/var/lib/cni", str(CONTAINER_LOG_LINKS)):
            if not Path(shared).exists():
                record("dirs", shared)
        # The kubelet's cgroupRoot must exist in every hierarchy it uses.
        # The kubelet also makes it in the cgroup v2 (unified) hierarchy: it is
        # recorded for removal everywhere.
        for hierarchy in sorted(CGROUP_FS.iterdir()):
            if not (hierarchy / "cgroup.procs").exists():
                continue
            record("cgroups", str(hierarchy / CGROUP_NAME))
            (hierarchy / CGROUP_NAME).mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    value = (hierarchy / knob).read_text().strip()
                    (hierarchy / CGROUP_NAME / knob).write_text(value)
        if not NETNS_PATH.parent.exists():
            record("made_netns_dir", "/run/netns")  # `ip netns add` makes it a mount
        record("netns", NETNS)
        run(["ip", "netns", "add", NETNS])
        run(["ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NODE_VETH])
        run(["ip", "link", "set", NODE_VETH, "netns", NETNS])
        run(["ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_VETH])
        run(["ip", "link", "set", HOST_VETH, "up"])
        run(["ip", "-n", NETNS, "addr", "add", f"{NODE_IP}/30", "dev", NODE_VETH])
        run(["ip", "-n", NETNS, "link", "set", NODE_VETH, "up"])
        run(["ip", "-n", NETNS, "link", "set", "lo", "up"])
        route_kubernetes_service()
        make_node_mount_namespace()

    def _start_etcd(self) -> None:
        start_process(
            "etcd",
            [
                "etcd", "--name=e2e", f"--data-dir={BASE / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=e2e=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ],
        )  # fmt: skip

    def _start_apiserver(self) -> None:
        pki = self.pki
        start_process(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                "--bind-address=0.0.0.0",  # inside the netns: its loopback and veth only
                f"--advertise-address={NODE_IP}",
                "--secure-port=6443",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                # exec and logs reach the kubelet by IP: no DNS in the netns.
                "--kubelet-preferred-address-types=InternalIP",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                # The vendor probe's agent runs privileged; without this flag
                # (its default is false; kubeadm sets it) the API server
                # refuses the DaemonSet: "privileged: Forbidden: disallowed
                # by cluster policy". Other pods stay confined by the
                # scenarios' own checks and Pod Security labels.
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        wait_for(
            lambda: self.kubectl("get", "--raw=/readyz", check=False, timeout=10).returncode == 0,
            "kube-apiserver /readyz",
            timeout=180,
            interval=0.5,
        )

    def _start_controllers(self) -> None:
        start_process(
            "kube-controller-manager",
            [
                tool("kube-controller-manager"),
                f"--kubeconfig={BASE / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={BASE / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={BASE / 'controller-manager.kubeconfig'}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--profiling=false",
            ],
        )
        start_process(
            "kube-scheduler",
            [
                tool("kube-scheduler"),
                f"--kubeconfig={BASE / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={BASE / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={BASE / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--profiling=false",
            ],
        )

    def _start_containerd(self) -> None:
        start_process(
            "containerd",
            [tool("containerd"), f"--config={BASE / 'containerd.toml'}"],
            mntns=True,
            env=tool_env(),
        )
        wait_for(
            lambda: self.ctr("version", check=False).returncode == 0,
            "containerd to answer",
            timeout=60,
        )

    def start_kubelet(self) -> int:
        """Start the kubelet (again); returns its pid."""
        return start_process(
            "kubelet",
            [
                tool("kubelet"),
                f"--config={BASE / 'kubelet.yaml'}",
                f"--kubeconfig={BASE / 'kubelet.kubeconfig'}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={BASE / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={NODE_LABELS}",
                "--v=2",
            ],
            mntns=True,
            env=tool_env(),
        )

    def stop_kubelet(self) -> None:
        stop_named("kubelet")

    def kubelet_pid(self) -> int:
        """The pid of the running v1.36 kubelet (from the state file)."""
        for proc in load_state().get("processes", []):
            if proc["name"] == "kubelet" and is_running(proc["pid"], proc["start"]):
                return int(proc["pid"])
        raise LookupError("the kubelet is not running")

    def node(self) -> Any:
        return self.kubectl_json("get", "node", NODE_NAME)

    def node_ready(self) -> bool:
        conditions = self.node()["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def wait_node_ready(self, timeout: float = 180) -> float:
        return wait_for(self.node_ready, f"node {NODE_NAME} Ready", timeout=timeout, interval=0.5)

    def resource(self, resource: str, field: str = "allocatable") -> int:
        """The node's capacity or allocatable of ``resource`` (0 when absent)."""
        return int(self.node()["status"].get(field, {}).get(resource, "0"))


# --- teardown -----------------------------------------------------------


def mounts_under(prefixes: Sequence[Path]) -> list[str]:
    """Mount points under any of ``prefixes``, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(p) or point.startswith(f"{p}/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def shim_pids() -> list[int]:
    """containerd shims of OUR containerd (their command line names our socket)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"containerd-shim-runc-v2")
            and any(str(CONTAINERD_SOCK).encode() in arg for arg in cmdline)
        ):
            pids.append(int(entry.name))
    return pids


def _remove_cgroup_tree(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: str(p).count("/"), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
    root.rmdir()


class _Undo:
    """Runs undo actions, collecting (never raising) what fails."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as error:  # teardown goes on; the error is reported
            self.problems.append(f"{what}: {error}")


def _stop_everything(undo: _Undo, processes: list[dict[str, Any]]) -> None:
    """The kubelets first (so they restart nothing), containerd's pods and
    tasks while containerd still runs, then every other process, last first,
    and the shims of our containerd."""
    for proc in [p for p in processes if p["name"].startswith("kubelet")]:
        undo(f"stop {proc['name']}", partial(stop_process, proc["pid"], proc["start"]))
    if any(p["name"] == "containerd" and is_running(p["pid"], p["start"]) for p in processes):
        undo("containerd cleanup", _clean_containerd)
    for proc in reversed(load_state().get("processes", [])):
        undo(f"stop {proc['name']}", partial(stop_process, proc["pid"], proc["start"]))
    for pid in shim_pids():
        undo(f"kill shim {pid}", partial(stop_process, pid, None, timeout=5))


def _delete_network(undo: _Undo, state: dict[str, Any]) -> None:
    if NETNS not in state.get("netns", []):
        return
    if NETNS_PATH.exists():
        undo("delete netns", lambda: run(["ip", "netns", "delete", NETNS]))
    # The host end of the veth goes with its peer (asynchronously); this
    # covers a half-made pair.
    if Path(f"/sys/class/net/{HOST_VETH}").exists():
        undo("delete veth", lambda: run(["ip", "link", "delete", HOST_VETH], check=False))
    if "/run/netns" in state.get("made_netns_dir", []) and not any(NETNS_PATH.parent.iterdir()):
        undo("remove /run/netns", lambda: run(["umount", str(NETNS_PATH.parent)], check=False))
        undo("remove /run/netns", NETNS_PATH.parent.rmdir)


def _remove_container_log_links() -> None:
    """Our kubelets' links in /var/log/containers: those pointing into BASE
    (v1.36's podLogsDir) or to the pod log dirs of our static pods."""
    if not CONTAINER_LOG_LINKS.is_dir():
        return
    for link in CONTAINER_LOG_LINKS.iterdir():
        if link.is_symlink():
            target = os.readlink(link)
            if target.startswith((f"{BASE}/", f"/var/log/pods/{STATIC_POD_NAMESPACE}_")):
                link.unlink()


def _clear_base() -> None:
    """Everything of BASE but containerd's image store (the warm-run cache)
    and the state file."""
    if BASE.is_dir():
        for child in BASE.iterdir():
            if child.name not in ("containerd", STATE_FILE.name):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


def down(extra_undo: Sequence[Callable[[], None]] = ()) -> list[str]:
    """Undo everything the state file records; returns what could not be undone.

    Order: extra actions (a test's own), processes, mounts (the node's mount
    namespace with all its mounts goes with its holder), cgroups, the netns,
    device nodes and directories we made, and last the sysctls the kubelet
    changed. A second call finds nothing left to do.
    """
    state = load_state()
    if not state:
        return []
    undo = _Undo()
    for action in extra_undo:
        undo("extra teardown", action)
    _stop_everything(undo, state.get("processes", []))
    for point in mounts_under([BASE, RUN]):
        undo(f"umount {point}", partial(run, ["umount", "-l", point]))
    for cgroup in load_state().get("cgroups", []):
        undo(f"remove cgroup {cgroup}", partial(_remove_cgroup_tree, Path(cgroup)))
    _delete_network(undo, state)
    for node in state.get("device_nodes", []):
        undo(f"remove {node}", partial(_remove_device_node, Path(node)))
    for directory in reversed(state.get("dirs", [])):
        undo(f"remove {directory}", partial(shutil.rmtree, directory, ignore_errors=True))
    undo("remove container log links", _remove_container_log_links)
    undo("clear " + str(BASE), _clear_base)
    for name, value in state.get("sysctls", {}).items():
        undo(f"restore {name}", partial(sysctl_path(name).write_text, value + "\n"))
    if undo.problems:
        state = load_state()
        state["problems"] = undo.problems
        save_state(state)
    else:
        STATE_FILE.unlink(missing_ok=True)
    return undo.problems


def _remove_device_node(path: Path) -> None:
    """Remove a device node we made; never anything else at that path."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == DEVICE_MAJOR:
        path.unlink()


def _clean_containerd() -> None:
    """Stop and delete every pod sandbox, task and container in k8s.io."""
    cluster = Cluster()
    for line in cluster.ctr("tasks", "ls", "-q", check=False).stdout.split():
        cluster.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False)
    time.sleep(0.5)
    for line in cluster.ctr("tasks", "ls", "-q", check=False).stdout.split():
        cluster.ctr("tasks", "delete", "-f", line, check=False)
    for line in cluster.ctr("containers", "ls", "-q", check=False).stdout.split():
        cluster.ctr("containers", "delete", line, check=False)
    for line in cluster.ctr("sandboxes", "ls", "-q", check=False).stdout.split():
        cluster.ctr("sandboxes", "rm", "-f", line, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["down"]:
        transcript.configure(OUT_DIR / "transcript.log", OUT_DIR / "figures.jsonl")
        with transcript.step("teardown (from the state file)"):
            problems = down()
        for problem in problems:
            transcript.say(f"  could not undo: {problem}")
        return 1 if problems else 0
    if args == ["up"]:
        transcript.configure(OUT_DIR / "transcript.log", OUT_DIR / "figures.jsonl")
        Cluster().up()
        return 0
    print("usage: python -m ci.e2e.cluster up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
