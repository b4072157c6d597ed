"""Dockerfiles under images/: parsed by BuildKit's parser, held to our lint
rules, and the plugin image's install steps run for real.

No Docker engine is needed. The lint works on the parser's instructions plus
the raw text (the parser drops comments, and a ``# reason:`` comment is how a
Dockerfile explains an exception).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import yaml
from packaging.requirements import Requirement

import stc_npu_agent

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
PLUGIN_DOCKERFILE = IMAGES / "plugin" / "Dockerfile"
PLUGIN_DOCKERIGNORE = IMAGES / "plugin" / "Dockerfile.dockerignore"
EXPECTED_DOCKERFILES = {"plugin/Dockerfile", "pod-mapped/Dockerfile", "pod-unmapped/Dockerfile"}


# --------------------------------------------------------------------------
# The lint


@dataclass
class Stage:
    base: str  # the FROM argument after global ARG expansion
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    rule: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: [{self.rule}] {self.message}"


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand(word: str, env: dict[str, str]) -> str:
    """``$X`` and ``${X}`` as BuildKit expands them in FROM and ARG defaults;
    an unknown name stays as it is, so the lint can report it."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)


def split_stages(commands: list[dockerfile.Command]) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in commands:
        if command.cmd == "FROM":
            value = list(command.value)
            name = value[2] if len(value) >= 3 and value[1].upper() == "AS" else None
            stages.append(Stage(expand(value[0], global_args), name, [command]))
        elif stages:
            stages[-1].commands.append(command)
        elif command.cmd == "ARG":
            key, _, default = command.value[0].partition("=")
            global_args[key] = expand(default, global_args)
    return stages


def final_chain(stages: list[Stage]) -> list[Stage]:
    """The last stage, preceded by the stages it is built FROM (USER and
    HEALTHCHECK are inherited along that chain)."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [stages[-1]]
    while chain[0].base in by_name and by_name[chain[0].base] not in chain:
        chain.insert(0, by_name[chain[0].base])
    return chain


def comment_above(lines: list[str], line: int) -> str:
    """The comment block directly above 1-based ``line`` (no blank line between)."""
    block: list[str] = []
    index = line - 2
    while index >= 0 and lines[index].lstrip().startswith("#"):
        block.insert(0, lines[index].lstrip())
        index -= 1
    return "\n".join(block)


def has_reason(lines: list[str], line: int) -> bool:
    return re.search(r"^#\s*reason:\s*\S", comment_above(lines, line), re.MULTILINE) is not None


def run_text(command: dockerfile.Command) -> str:
    return " ".join(command.value)


def mounts(command: dockerfile.Command) -> list[dict[str, str]]:
    found = []
    for flag in command.flags:
        if flag.startswith("--mount="):
            options = (part.partition("=") for part in flag.removeprefix("--mount=").split(","))
            found.append({key: value for key, _, value in options})
    return found


# One shell command of a RUN line: && || ; | and newlines separate them.
_SEGMENTS = re.compile(r"&&|\|\||;|\||\n")
_APT_INSTALL = re.compile(r"\bapt(?:-get)?\s+(?:-\S+\s+)*install\b")
_APT_LISTS_CLEANED = re.compile(r"\brm\s+(?:-\S+\s+)*/var/lib/apt/lists")
_PIP_DOWNLOADS = {"install", "wheel", "download"}
# pip's global options that take a value as the next word.
_PIP_VALUE_OPTIONS = {"--python", "--log", "--proxy", "--cache-dir", "--cert", "--timeout"}
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@)", re.IGNORECASE)
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|CREDENTIAL|PRIVATE_?KEY", re.I)
_USERINFO = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
_ROOT_USERS = {"0", "root"}


def pip_subcommand(segment: str) -> str | None:
    """``install`` for ``python -m pip --python /v/bin/python install x``,
    ``"$VENV/bin/pip" install x`` or ``pip3 install x``; None if no pip."""
    words = [word.strip("\"'") for word in segment.split()]
    starts = [i for i, word in enumerate(words) if re.fullmatch(r"(?:.*/)?pip3?", word)]
    if not starts:
        return None
    index = starts[0] + 1
    while index < len(words) and words[index].startswith("-"):
        takes_value = words[index] in _PIP_VALUE_OPTIONS
        index += 2 if takes_value else 1
    return words[index] if index < len(words) else None


def check_base(stage: Stage, names: set[str]) -> Iterator[Finding]:
    line = stage.commands[0].start_line
    image = stage.base
    if image == "scratch" or image in names:
        return
    if "$" in image:
        yield Finding("base-pinned", line, f"{image!r}: unresolved build arg (give it a default)")
        return
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        yield Finding("base-pinned", line, f"{image!r} has no tag")
    elif last.rsplit(":", 1)[1] == "latest":
        yield Finding("base-pinned", line, f"{image!r} uses the moving tag 'latest'")


def check_add(command: dockerfile.Command) -> Iterator[Finding]:
    for source in command.value[:-1]:
        if _URL.match(source):
            yield Finding("add-url", command.start_line, f"ADD {source}: RUN a checked download")


def check_variables(command: dockerfile.Command) -> Iterator[Finding]:
    pairs = (
        [item.partition("=")[::2] for item in command.value]
        if command.cmd == "ARG"
        else list(zip(command.value[::2], command.value[1::2], strict=True))
    )
    for name, value in pairs:
        if _SECRET_NAME.search(name) or _USERINFO.search(value):
            message = f"{command.cmd} {name}: use a BuildKit secret"
            yield Finding("no-secrets", command.start_line, message)


def check_run(command: dockerfile.Command) -> Iterator[Finding]:
    line = command.start_line
    text = run_text(command)
    segments = _SEGMENTS.split(text)
    installs = [s for s in segments if _APT_INSTALL.search(s)]
    for segment in installs:
        if "--no-install-recommends" not in segment:
            yield Finding("apt-recommends", line, "apt-get install without --no-install-recommends")
    if installs and not _APT_LISTS_CLEANED.search(text):
        yield Finding("apt-lists", line, "apt-get install without rm -rf /var/lib/apt/lists")
    pip_cache_mounted = any(
        m.get("type") == "cache" and ".cache/pip" in m.get("target", "") for m in mounts(command)
    )
    for segment in segments:
        if pip_subcommand(segment) in _PIP_DOWNLOADS and not (
            "--no-cache-dir" in segment or pip_cache_mounted
        ):
            yield Finding("pip-cache", line, "pip without --no-cache-dir (or a cache mount)")
    if re.search(r"\bsed\b.*sources\.list", text):
        yield Finding("apt-mirror", line, "hard-coded apt mirror: use a configured base image")


def check_command(command: dockerfile.Command) -> Iterator[Finding]:
    if command.cmd == "ADD":
        yield from check_add(command)
    elif command.cmd in {"ARG", "ENV"}:
        yield from check_variables(command)
    elif command.cmd == "RUN":
        yield from check_run(command)


def check_final_stage(chain: list[Stage], lines: list[str]) -> Iterator[Finding]:
    commands = [c for stage in chain for c in stage.commands]
    first_line = chain[-1].commands[0].start_line
    users = [c for c in commands if c.cmd == "USER"]
    if not users:
        yield Finding("user", first_line, "no USER: the image runs as root without a reason")
    else:
        last = users[-1]
        uid = last.value[0].partition(":")[0]
        if uid in _ROOT_USERS:
            if not has_reason(lines, last.start_line):
                yield Finding("user", last.start_line, "USER root needs a '# reason:' comment")
        elif not uid.isdigit():
            yield Finding("user", last.start_line, "use a numeric uid: runAsNonRoot checks it")
    checks = [c for c in commands if c.cmd == "HEALTHCHECK"]
    reason_anywhere = any(
        re.match(r"#\s*reason:.*HEALTHCHECK", line.strip()) for line in lines if line
    )
    if not checks and not reason_anywhere:
        yield Finding("healthcheck", first_line, "no HEALTHCHECK and no '# reason:' for it")
    elif (
        checks
        and checks[-1].value[0].upper() == "NONE"
        and not has_reason(lines, checks[-1].start_line)
    ):
        yield Finding("healthcheck", checks[-1].start_line, "HEALTHCHECK NONE needs a reason")


def lint_commands(commands: list[dockerfile.Command], text: str) -> list[Finding]:
    lines = text.splitlines()
    stages = split_stages(commands)
    if not stages:
        return [Finding("from", 1, "no FROM")]
    names: set[str] = set()
    findings: list[Finding] = []
    for stage in stages:
        findings.extend(check_base(stage, names))
        if stage.name:
            names.add(stage.name)
        for command in stage.commands:
            findings.extend(check_command(command))
    findings.extend(check_final_stage(final_chain(stages), lines))
    return findings


def lint_text(text: str) -> list[Finding]:
    return lint_commands(list(dockerfile.parse_string(text)), text)


def lint_file(path: Path) -> list[Finding]:
    return lint_commands(list(dockerfile.parse_file(str(path))), path.read_text())


# --------------------------------------------------------------------------
# The repository's Dockerfiles


def repo_dockerfiles() -> list[Path]:
    return sorted(p for p in IMAGES.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def test_the_expected_dockerfiles_exist() -> None:
    found = {p.relative_to(IMAGES).as_posix() for p in repo_dockerfiles()}
    assert found >= EXPECTED_DOCKERFILES


@pytest.mark.parametrize("path", repo_dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfile_parses_and_passes_the_lint(path: Path) -> None:
    commands = list(dockerfile.parse_file(str(path)))
    assert commands[0].cmd in {"ARG", "FROM"}
    assert [str(f) for f in lint_file(path)] == []


@pytest.mark.parametrize("path", repo_dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfile_is_multi_stage_or_copies_nothing(path: Path) -> None:
    stages = split_stages(list(dockerfile.parse_file(str(path))))
    copies = [c for s in stages for c in s.commands if c.cmd in {"COPY", "ADD"}]
    # A single-stage image must not pull a build context in: whatever it would
    # copy is then in the final image, with its build tools.
    assert len(stages) >= 2 or not copies


def _plugin_stages() -> list[Stage]:
    return split_stages(list(dockerfile.parse_file(str(PLUGIN_DOCKERFILE))))


def test_plugin_image_metadata() -> None:
    runtime = _plugin_stages()[-1]
    labels: dict[str, str] = {}
    args: dict[str, str] = {}
    envs: dict[str, str] = {}
    entrypoint: list[str] = []
    for command in runtime.commands:
        if command.cmd == "LABEL":
            labels.update(zip(command.value[::2], command.value[1::2], strict=True))
        elif command.cmd == "ARG":
            key, _, default = command.value[0].partition("=")
            args[key] = default
        elif command.cmd == "ENV":
            envs.update(zip(command.value[::2], command.value[1::2], strict=True))
        elif command.cmd == "ENTRYPOINT":
            assert command.json, "exec form, so signals reach the agent"
            entrypoint = list(command.value)
    assert entrypoint == ["stc-npu-agent"]
    assert args["VERSION"] == stc_npu_agent.__version__
    labels = {key: value.strip('"') for key, value in labels.items()}
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("${SOURCE}")
    assert args["SOURCE"].startswith("https://")
    assert envs["PYTHONDONTWRITEBYTECODE"] == "1"


def test_plugin_sets_no_bytecode_before_the_install() -> None:
    # Set only after the venv RUN, the variable let pip's imports of the base
    # image's standard library (shipped without .pyc) leave ~190 .pyc files,
    # 5.4 MB, in the agent's layer.
    runtime = _plugin_stages()[-1]
    order = [
        c.cmd
        if c.cmd != "ENV"
        else ("NOBYTECODE" if "PYTHONDONTWRITEBYTECODE" in c.value else "ENV")
        for c in runtime.commands
        if c.cmd in {"ENV", "RUN"}
    ]
    assert "NOBYTECODE" in order
    assert order.index("NOBYTECODE") < order.index("RUN")


def test_plugin_size_comment_is_the_measured_one() -> None:
    # 154 MB after the bytecode fix, measured with buildah (159 MB before).
    text = PLUGIN_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^# Size: 154 MB uncompressed for linux/amd64", text, re.MULTILINE)
    assert "linux/arm64" in text


def test_plugin_image_source_is_the_project_home() -> None:
    # The image's OCI source label, the chart's home and sources, and the Argo
    # CD example all point at one repository.
    args = {
        c.value[0].partition("=")[0]: c.value[0].partition("=")[2]
        for c in _plugin_stages()[-1].commands
        if c.cmd == "ARG"
    }
    chart = yaml.safe_load((REPO / "chart" / "stc-npu" / "Chart.yaml").read_text("utf-8"))
    app = yaml.safe_load((REPO / "examples" / "argocd-application.yaml").read_text("utf-8"))
    assert args["SOURCE"] == chart["home"]
    assert chart["sources"] == [chart["home"]]
    assert app["spec"]["source"]["repoURL"].removesuffix(".git") == chart["home"]


def test_agent_build_requires_a_setuptools_that_knows_spdx_licenses() -> None:
    # project.license as an SPDX string needs setuptools 77+; with less, a
    # build without isolation fails.
    pyproject = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text("utf-8"))
    assert isinstance(pyproject["project"]["license"], str)
    (setuptools,) = [
        Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert not setuptools.specifier.contains("76.9"), setuptools
    assert setuptools.specifier.contains("77.0.0")


def test_plugin_runtime_stage_takes_no_build_context() -> None:
    build, runtime = _plugin_stages()[-2:]
    assert build.base == runtime.base, "the venv's interpreter link needs the same base"
    assert [c for c in runtime.commands if c.cmd in {"COPY", "ADD"}] == []
    sources = [m for c in runtime.commands for m in mounts(c) if m.get("type") == "bind"]
    assert sources, "the wheels come in through a bind mount from the build stage"
    assert all(m.get("from") == build.name for m in sources)


# --------------------------------------------------------------------------
# The lint can fail: one small bad Dockerfile per rule

GOOD = """\
# syntax=docker/dockerfile:1
ARG BASE=debian:12-slim
FROM ${BASE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc \\
    && rm -rf /var/lib/apt/lists/*
FROM ${BASE}
RUN python3 -m pip install --no-cache-dir pyyaml
USER 1000:1000
# reason: Kubernetes ignores HEALTHCHECK.
HEALTHCHECK NONE
"""

BAD = {
    "untagged base": ("base-pinned", "FROM debian\nUSER 1000\nHEALTHCHECK CMD true\n"),
    "latest base": ("base-pinned", "FROM debian:latest\nUSER 1000\nHEALTHCHECK CMD true\n"),
    "latest via arg": (
        "base-pinned",
        "ARG B=registry:5000/debian:latest\nFROM ${B}\nUSER 1000\nHEALTHCHECK CMD true\n",
    ),
    "arg without default": ("base-pinned", "ARG B\nFROM ${B}\nUSER 1\nHEALTHCHECK CMD true\n"),
    "add url": (
        "add-url",
        "FROM debian:12\nADD https://example.com/x.tgz /x\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "apt recommends": (
        "apt-recommends",
        "FROM debian:12\nRUN apt-get update && apt-get install -y curl"
        " && rm -rf /var/lib/apt/lists/*\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "apt recommends in the second install": (
        "apt-recommends",
        "FROM debian:12\nRUN apt-get install -y --no-install-recommends a && apt-get install b"
        " && rm -rf /var/lib/apt/lists/*\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "apt lists kept": (
        "apt-lists",
        "FROM debian:12\nRUN apt-get update && apt-get install -y --no-install-recommends curl\n"
        "RUN rm -rf /var/lib/apt/lists/*\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "pip cache": (
        "pip-cache",
        "FROM python:3.11-slim\nRUN pip install pyyaml\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "pip cache via python -m": (
        "pip-cache",
        "FROM python:3.11-slim\nRUN python -m pip --python /v/bin/python install x\n"
        "USER 1\nHEALTHCHECK CMD true\n",
    ),
    "root without reason": ("user", "FROM debian:12\nUSER root\nHEALTHCHECK CMD true\n"),
    "uid 0 without reason": ("user", "FROM debian:12\nUSER 0:0\nHEALTHCHECK CMD true\n"),
    "no user": ("user", "FROM debian:12\nHEALTHCHECK CMD true\n"),
    "non-numeric user": ("user", "FROM debian:12\nUSER app\nHEALTHCHECK CMD true\n"),
    "reason not directly above": (
        "user",
        "FROM debian:12\n# reason: needs root\n\nUSER 0\nHEALTHCHECK CMD true\n",
    ),
    "no healthcheck": ("healthcheck", "FROM debian:12\nUSER 1000\n"),
    "healthcheck none without reason": (
        "healthcheck",
        "FROM debian:12\nUSER 1\nHEALTHCHECK NONE\n",
    ),
    "secret arg": (
        "no-secrets",
        "FROM debian:12\nARG REPO_TOKEN\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "credentials in a url": (
        "no-secrets",
        "FROM debian:12\nENV URI=https://bob:hunter2@example.com/\nUSER 1\nHEALTHCHECK CMD true\n",
    ),
    "mirror rewrite": (
        "apt-mirror",
        "FROM debian:12\nRUN sed -i s/deb.debian.org/mirror.example/ /etc/apt/sources.list\n"
        "USER 1\nHEALTHCHECK CMD true\n",
    ),
}


def test_a_good_dockerfile_has_no_findings() -> None:
    assert lint_text(GOOD) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_rule_fires(case: str) -> None:
    rule, text = BAD[case]
    assert rule in {f.rule for f in lint_text(text)}


def test_root_with_a_reason_and_healthcheck_reason_pass() -> None:
    text = (
        "FROM debian:12\n# reason: owns a root-only socket\nUSER 0\n# reason: HEALTHCHECK unused\n"
    )
    assert lint_text(text) == []


def test_a_pip_cache_mount_stands_for_no_cache_dir() -> None:
    text = GOOD.replace(
        "RUN python3 -m pip install --no-cache-dir pyyaml",
        "RUN --mount=type=cache,target=/root/.cache/pip python3 -m pip wheel -w /w pyyaml",
    )
    assert lint_text(text) == []


def test_the_user_and_healthcheck_of_a_parent_stage_count() -> None:
    text = "FROM debian:12 AS base\nUSER 1000\nHEALTHCHECK CMD true\nFROM base\nRUN true\n"
    assert lint_text(text) == []


def test_a_lint_finding_names_its_line() -> None:
    (finding,) = lint_text("FROM debian:12\nUSER 1\nHEALTHCHECK CMD true\nADD http://x/y /y\n")
    assert (finding.rule, finding.line) == ("add-url", 4)


# --------------------------------------------------------------------------
# The plugin's build context (.dockerignore semantics as BuildKit applies them)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(cleaned)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its
    parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return not excluded


def plugin_context_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules(PLUGIN_DOCKERIGNORE.read_text())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("agent/pyproject.toml", True),
        ("agent/src/stc_npu_agent/__init__.py", True),
        ("agent/src/stc_npu_agent/v1beta1/api.proto", True),
        ("agent/src/stc_npu_agent/__pycache__/cli.cpython-311.pyc", False),
        ("agent/src/stc_npu_agent.egg-info/PKG-INFO", False),
        ("agent/build/lib/stc_npu_agent/cli.py", False),
        ("agent/.mypy_cache/3.11/x.json", False),
        (".venv/bin/python", False),
        (".git/HEAD", False),
        ("chart/stc-npu/values.yaml", False),
        ("images/plugin/Dockerfile", False),
        ("tests/images/test_dockerfiles.py", False),
        ("Makefile", False),
    ],
)
def test_plugin_build_context_is_the_agent_only(path: str, expected: bool) -> None:
    assert in_context(path, plugin_context_rules()) is expected


def test_plugin_copies_only_what_the_context_holds() -> None:
    rules = plugin_context_rules()
    for stage in _plugin_stages():
        for command in stage.commands:
            if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
                for source in command.value[:-1]:
                    assert in_context(source.rstrip("/"), rules), source


def build_context(destination: Path) -> Path:
    """The files of the working tree that the plugin build would send."""
    rules = plugin_context_rules()
    for path in sorted((REPO / "agent").rglob("*")):
        relative = path.relative_to(REPO).as_posix()
        if path.is_file() and in_context(relative, rules):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return destination


# --------------------------------------------------------------------------
# The plugin's install steps, run as the Dockerfile runs them

_ENV_QUOTES = re.compile(r'^"(.*)"$')


class StepRunner:
    """Runs the RUN, COPY, WORKDIR, ARG and ENV instructions of a Dockerfile on
    this machine. The image's absolute paths are mapped to temporary
    directories; a RUN that mentions an unmapped absolute path, or an
    instruction this runner does not model, fails the test rather than
    being skipped, so the Dockerfile cannot drift away from what is tested."""

    ABSOLUTE = re.compile(r"(?:^|[\s=\"'])(/[\w.-]+)")

    def __init__(
        self,
        paths: dict[str, Path],
        context: Path,
        base_bin: Path,
        *,
        build_args: dict[str, str] | None = None,
        skip_run: Callable[[str], bool] = lambda text: False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.paths = paths
        self.context = context
        self.base_bin = base_bin
        self.build_args = build_args or {}
        self.skip_run = skip_run
        self.skipped: list[str] = []
        self.extra_env = extra_env or {}
        self.env: dict[str, str] = {}
        self.cwd = context

    def map(self, text: str) -> str:
        for image_path in sorted(self.paths, key=len, reverse=True):
            text = text.replace(image_path, str(self.paths[image_path]))
        return text

    def run_stage(self, stage: Stage) -> None:
        self.env = {}
        for command in stage.commands[1:]:
            handler = getattr(self, f"do_{command.cmd.lower()}", None)
            if command.cmd in {"LABEL", "USER", "HEALTHCHECK", "ENTRYPOINT", "CMD"}:
                continue
            assert handler is not None, f"line {command.start_line}: {command.cmd} not modelled"
            handler(command)

    def do_arg(self, command: dockerfile.Command) -> None:
        key, has_default, default = command.value[0].partition("=")
        if key in self.build_args:
            self.env[key] = self.build_args[key]
        elif has_default:
            self.env[key] = default

    def do_env(self, command: dockerfile.Command) -> None:
        for key, value in zip(command.value[::2], command.value[1::2], strict=True):
            self.env[key] = expand(self.map(_ENV_QUOTES.sub(r"\1", value)), self.env)

    def do_workdir(self, command: dockerfile.Command) -> None:
        self.cwd = Path(self.map(command.value[0]))
        self.cwd.mkdir(parents=True, exist_ok=True)

    def do_copy(self, command: dockerfile.Command) -> None:
        assert not command.flags, "COPY --from/--chown is not modelled"
        *sources, destination = command.value
        target = self.cwd / destination if not destination.startswith("/") else None
        assert target is not None, "COPY to an absolute path: map it"
        for source in sources:
            shutil.copytree(self.context / source, target, dirs_exist_ok=True)

    def do_run(self, command: dockerfile.Command) -> None:
        for mount in mounts(command):
            if mount.get("type") == "bind":
                # A bind mount of a path from an earlier stage: both sides map
                # to the same temporary directory.
                assert mount["source"] == mount["target"], mount
                assert mount["source"] in self.paths, f"map {mount['source']}"
            elif mount.get("type") == "secret":
                # A BuildKit secret, at its default place unless a target is given.
                target = mount.get("target", f"/run/secrets/{mount['id']}")
                assert target in self.paths, f"map {target}"
            else:
                # The pip cache mount: pip's own cache on this machine.
                assert mount.get("type") == "cache", mount
        text = run_text(command)
        if self.skip_run(text):
            self.skipped.append(text)
            return
        rest = text
        for image_path in self.paths:
            rest = rest.replace(image_path, "MAPPED")
        unmapped = self.ABSOLUTE.findall(rest)
        assert unmapped == [], f"line {command.start_line}: map these paths: {unmapped}"
        host_path = f"{self.base_bin}{os.pathsep}{os.environ['PATH']}"
        env = {
            **os.environ,
            **self.extra_env,
            **self.env,
            "PATH": self.env.get("PATH", "${PATH}").replace("${PATH}", host_path),
        }
        env.pop("PYTHONHOME", None)
        self.last = subprocess.run(
            ["sh", "-ec", self.map(text)],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        result = self.last
        assert result.returncode == 0, f"line {command.start_line}:\n{result.stdout}{result.stderr}"


def test_plugin_install_steps_give_a_working_agent(tmp_path: Path) -> None:
    # The base image's Python, with pip as the image has it: a throwaway venv,
    # because the Dockerfile removes pip from it at the end.
    base = tmp_path / "base-python"
    subprocess.run([sys.executable, "-m", "venv", str(base)], check=True, timeout=60)
    root = tmp_path / "root"
    paths = {
        "/src": root / "src",
        "/wheels": root / "wheels",
        "/opt/stc-npu-agent": root / "opt" / "stc-npu-agent",
    }
    runner = StepRunner(paths, build_context(tmp_path / "context"), base / "bin")
    build, runtime = _plugin_stages()[-2:]
    runner.run_stage(build)
    assert list(paths["/wheels"].glob("stc_npu_agent-*.whl"))
    runner.run_stage(runtime)

    # The ENTRYPOINT's name, looked up on the image's PATH, is the agent.
    image_path = runner.env["PATH"].split(os.pathsep)
    agent = Path(image_path[0]) / "stc-npu-agent"
    assert agent.is_file()
    result = subprocess.run(
        [str(agent), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stc-npu-agent {stc_npu_agent.__version__}"

    # Nothing of the toolchain in the final image: no pip in the agent's venv,
    # none left in the base Python, no wheels or sources under the venv.
    venv = paths["/opt/stc-npu-agent"]
    assert not (venv / "bin" / "pip").exists()
    site = next(venv.glob("lib/python*/site-packages"))
    # The agent's own modules are compiled at install, on purpose (read-only
    # root filesystem at run time), although PYTHONDONTWRITEBYTECODE is set.
    assert runner.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert list((site / "stc_npu_agent").glob("__pycache__/cli.*.pyc"))
    assert list(site.glob("pip")) == []
    assert list(site.glob("setuptools")) == []
    base_probe = subprocess.run(
        [str(base / "bin" / "python"), "-c", "import pip"], capture_output=True, check=False
    )
    assert base_probe.returncode != 0, "the runtime stage should remove pip from the base Python"


# --------------------------------------------------------------------------
# The unmapped image's download and key steps, against a fake package server

UNMAPPED_DOCKERFILE = IMAGES / "pod-unmapped" / "Dockerfile"
# A throwaway signing key, standing in for the vendor's hpe.pub.
TEST_KEY_FINGERPRINT = "96A44E65FECE709B6D2D1B03B97F2144E5A654D8"
TEST_KEY = """\
-----BEGIN PGP PUBLIC KEY BLOCK-----

mDMEawsOMxYJKwYBBAHaRw8BAQdAD0btbm6+2Zor3SeKp2p5XVyXgm6+4ZCH/H3x
KAZLAUe0J3N0Yy1ucHUgdGVzdCBrZXkgPHRlc3RAZXhhbXBsZS5pbnZhbGlkPoiQ
BBMWCAA4FiEElqROZf7OcJttLRsDuX8hROWmVNgFAmsLDjMCGwMFCwkIBwIGFQoJ
CAsCBBYCAwECHgECF4AACgkQuX8hROWmVNjEQQD9GM7Y6XehYsQLgOavfOvioX/0
n9fK5fm7kM3XThkHjUIA/3Fp6eR26Iim24RC1vPgrqkrKZCrveieHVJ3ue3HAKIK
=T/0v
-----END PGP PUBLIC KEY BLOCK-----
"""
NEEDS_TOOLS = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("curl", "gpg", "dpkg-deb", "pgrep")),
    reason="needs curl, gpg and dpkg-deb, as the image's fetch stage has",
)


def fake_package_server(root: Path) -> dict[str, str]:
    """A directory served over file:// with a repository .deb holding hpe.pub
    where the vendor's puts it, and a wheel; returns the build args."""
    package = root / "deb"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: hpe-repo-test\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <test@example.invalid>\nDescription: test repository\n"
    )
    (package / "var" / "hpe-repo-test").mkdir(parents=True)
    (package / "var" / "hpe-repo-test" / "hpe.pub").write_text(TEST_KEY)
    server = root / "server"
    server.mkdir()
    deb = "hpe-repo-test_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(package), str(server / deb)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    wheel = "tb_test-1.0-py3-none-any.whl"
    (server / wheel).write_bytes(b"not really a wheel")
    return {"HPE_URI": server.as_uri(), "HPE_REPO_DEB": deb, "TENSORTURBO_WHEEL": wheel}


def run_unmapped_fetch(tmp_path: Path, build_args: dict[str, str]) -> StepRunner:
    stage = next(s for s in split_stages(list(dockerfile.parse_file(str(UNMAPPED_DOCKERFILE)))))
    assert stage.name == "fetch"
    paths = {
        "/pkg": tmp_path / "pkg",
        "/tmp/hpe-repo": tmp_path / "hpe-repo",
        "/run/secrets/netrc": tmp_path / "secrets" / "netrc",
    }
    (tmp_path / "tmp").mkdir()
    runner = StepRunner(
        paths,
        tmp_path,
        tmp_path / "no-base-python",
        build_args=build_args,
        # The only step not run here: installing curl and gnupg with apt.
        skip_run=lambda text: text.startswith("apt-get update"),
        extra_env={"TMPDIR": str(tmp_path / "tmp")},
    )
    runner.run_stage(stage)
    # The step's gpg calls use --no-autostart: no agent may be left behind.
    agents = subprocess.run(["pgrep", "-f", f"gpg-agent --homedir {tmp_path}"], check=False)
    assert agents.returncode == 1, "a gpg-agent was started"
    return runner


@NEEDS_TOOLS
def test_unmapped_fetch_stage_downloads_and_exports_the_key(tmp_path: Path) -> None:
    build_args = fake_package_server(tmp_path)
    runner = run_unmapped_fetch(tmp_path, build_args)
    assert len(runner.skipped) == 1
    assert "--no-install-recommends ca-certificates curl gnupg" in runner.skipped[0]
    pkg = tmp_path / "pkg"
    assert (pkg / build_args["HPE_REPO_DEB"]).is_file()
    assert (pkg / build_args["TENSORTURBO_WHEEL"]).read_bytes() == b"not really a wheel"
    keyring = pkg / "hpe-repo-keyring.gpg"
    assert not keyring.read_bytes().startswith(b"-----"), "apt wants a binary keyring here"
    shown = subprocess.run(
        ["gpg", "--with-colons", "--show-keys", str(keyring)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert f"fpr:::::::::{TEST_KEY_FINGERPRINT}:" in shown.stdout


@NEEDS_TOOLS
def test_unmapped_fetch_stage_works_with_a_netrc_secret_mounted(tmp_path: Path) -> None:
    build_args = fake_package_server(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "netrc").write_text("machine example.invalid login u password p\n")
    run_unmapped_fetch(tmp_path, build_args)
    assert (tmp_path / "pkg" / build_args["HPE_REPO_DEB"]).is_file()


@NEEDS_TOOLS
def test_unmapped_fetch_stage_demands_the_package_uri(tmp_path: Path) -> None:
    build_args = fake_package_server(tmp_path)
    del build_args["HPE_URI"]
    with pytest.raises(AssertionError, match="pass --build-arg HPE_URI"):
        run_unmapped_fetch(tmp_path, build_args)
