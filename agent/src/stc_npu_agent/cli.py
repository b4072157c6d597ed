"""Command line: flags (each also an environment variable), logging, start-up.

``stc-npu-agent`` with no subcommand runs the agent in the foreground.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stc_npu_agent import __version__
from stc_npu_agent.core.config import Config, ConfigError
from stc_npu_agent.settings import load_config

log = logging.getLogger("stc_npu_agent")

EXIT_BAD_INPUT = 2
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Flag:
    name: str
    env: str
    default: str | None
    help: str
    choices: tuple[str, ...] | None = None


# One table for flags and their environment variables, so --help, the env
# names and the defaults cannot drift apart. A flag on the command line wins.
FLAGS = (
    Flag(
        "kubelet-dir",
        "STC_NPU_KUBELET_DIR",
        "/var/lib/kubelet/device-plugins",
        "the kubelet's device plugin directory (kubelet.sock and plugin sockets)",
    ),
    Flag("dev-dir", "STC_NPU_DEV_DIR", "/dev", "where to look for NPU device nodes"),
    Flag("sys-dir", "STC_NPU_SYS_DIR", "/sys", "sysfs root, for NUMA node and PCI vendor"),
    Flag("config", "STC_NPU_CONFIG", None, "YAML config file (optional; defaults otherwise)"),
    Flag("log-level", "STC_NPU_LOG_LEVEL", "info", "log level", LOG_LEVELS),
    Flag("log-format", "STC_NPU_LOG_FORMAT", "text", "log format", LOG_FORMATS),
    Flag(
        "hpe-dir",
        "STC_NPU_HPE_DIR",
        None,
        "where this process sees the host's hpe.hostPath, to check it exists in mapped mode "
        "(default: hpe.hostPath itself)",
    ),
    Flag(
        "node-name",
        "STC_NPU_NODE_NAME",
        None,
        "this node's Kubernetes name: the DRA driver's pool (default: the host name)",
    ),
    Flag(
        "kube-api-server",
        "STC_NPU_KUBE_API_SERVER",
        None,
        "mode dra: the Kubernetes API server's URL, used without credentials (a local or "
        "test server; default: in-cluster, with the pod's ServiceAccount token)",
    ),
    Flag(
        "probe-address",
        "STC_NPU_PROBE_ADDRESS",
        None,
        "HOST:PORT for the HTTP probes /healthz, /readyz and /status (and /metrics with "
        "metrics.enabled); ':PORT' listens on every IPv4 and IPv6 address; not 9836, the "
        "vendor's npu-exporter (off unless set)",
    ),
)


def _add_flags(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    for flag in FLAGS:
        shown = flag.default if flag.default is not None else "unset"
        parser.add_argument(
            f"--{flag.name}",
            # The subcommand's copy must not overwrite values given before it.
            default=os.environ.get(flag.env, flag.default) if with_defaults else argparse.SUPPRESS,
            choices=flag.choices,
            help=f"{flag.help} [env {flag.env}, default {shown}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stc-npu-agent",
        description=(
            "Kubernetes device plugin for Stream Computing NPUs. "
            "With no subcommand, runs the agent in the foreground."
        ),
    )
    parser.add_argument("--version", action="version", version=f"stc-npu-agent {__version__}")
    _add_flags(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    diagnose = commands.add_parser(
        "diagnose",
        help="print what the agent sees on this node (NPUs, health, kubelet, registration)",
        description=(
            "Print the NPUs found with their nodes, NUMA node, PCI vendor and health, the "
            "kubelet socket, whether the agent is registered, and optionally the exact "
            "Allocate answer for IDs. Exit 0: no problems; 1: problems found; 2: bad input."
        ),
    )
    _add_flags(diagnose, with_defaults=False)
    diagnose.add_argument("--json", action="store_true", help="machine-readable output")
    diagnose.add_argument(
        "--allocate",
        action="append",
        default=[],
        metavar="ID",
        help="show the Allocate response a container would get for ID (repeatable)",
    )
    return parser


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC core logs connection details (GOAWAY on every kubelet restart) at
    # info level on its own; the agent says what matters in its own lines.
    # Set before grpc is imported; an operator's GRPC_VERBOSITY still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Environment values bypass argparse's own choices check: check them here.
    for flag in FLAGS:
        value = getattr(args, flag.name.replace("-", "_"))
        if flag.choices and value not in flag.choices:
            parser.error(f"--{flag.name} / {flag.env}: {value!r} is not one of {flag.choices}")
    if args.probe_address:
        from stc_npu_agent.probes import parse_address  # noqa: PLC0415

        try:
            parse_address(args.probe_address)
        except ValueError as error:
            parser.error(f"--probe-address / STC_NPU_PROBE_ADDRESS: {error}")
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"stc-npu-agent: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "diagnose":
        return run_diagnose(args, config)
    return run_agent(args, config)


def run_agent(args: argparse.Namespace, config: Config) -> int:
    from stc_npu_agent.agent import run  # noqa: PLC0415  (keeps --help/--version light)

    api = None
    if config.mode == "dra":
        # Only mode dra loads the API client (device-plugin mode never calls the API).
        from stc_npu_agent.kubeapi import (  # noqa: PLC0415
            KubeApi,
            in_cluster_config,
            server_config,
        )
        from stc_npu_agent.slices import ApiError  # noqa: PLC0415

        try:
            kube = (
                server_config(args.kube_api_server) if args.kube_api_server else in_cluster_config()
            )
        except ApiError as error:
            print(f"stc-npu-agent: mode dra: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        api = KubeApi(kube)

    return run(
        kubelet_dir=args.kubelet_dir,
        dev_dir=args.dev_dir,
        sys_dir=args.sys_dir,
        config=config,
        probe_address=args.probe_address,
        hpe_dir=args.hpe_dir or config.hpe.host_path,
        node_name=args.node_name or "",
        api=api,
    )


def run_diagnose(args: argparse.Namespace, config: Config) -> int:
    from stc_npu_agent.diagnose import Paths  # noqa: PLC0415
    from stc_npu_agent.diagnose import run_diagnose as diagnose  # noqa: PLC0415

    paths = Paths(
        kubelet_dir=Path(args.kubelet_dir),
        dev_dir=Path(args.dev_dir),
        sys_dir=Path(args.sys_dir),
        hpe_dir=Path(args.hpe_dir or config.hpe.host_path),
        probe_address=args.probe_address,
    )
    return diagnose(paths, config, args.allocate, args.json)


if __name__ == "__main__":
    sys.exit(main())
