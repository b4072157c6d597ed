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
        "probe-address",
        "STC_NPU_PROBE_ADDRESS",
        None,
        "HOST:PORT for the HTTP probes /healthz and /readyz (off unless set)",
    ),
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
    for flag in FLAGS:
        default = os.environ.get(flag.env, flag.default)
        shown = flag.default if flag.default is not None else "unset"
        parser.add_argument(
            f"--{flag.name}",
            default=default,
            choices=flag.choices,
            help=f"{flag.help} [env {flag.env}, default {shown}]",
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
    return run_agent(args, config)


def run_agent(args: argparse.Namespace, config: Config) -> int:
    from stc_npu_agent.agent import run  # noqa: PLC0415  (keeps --help/--version light)

    return run(
        kubelet_dir=args.kubelet_dir,
        dev_dir=args.dev_dir,
        sys_dir=args.sys_dir,
        config=config,
        probe_address=args.probe_address,
    )


if __name__ == "__main__":
    sys.exit(main())
