"""Builds every image the real-cluster e2e needs, locally, from the real Dockerfiles.

Contract (what the e2e harness relies on)
-----------------------------------------
Entry point, as root on Debian 12, with the repository's venv (it needs pyyaml):

    .venv/bin/python ci/e2e/images/build.py OUT_DIR           build, then smoke-check
    .venv/bin/python ci/e2e/images/build.py --check OUT_DIR   smoke-check only

Exit 0 when every image is in OUT_DIR and the smoke check passed; otherwise 1
with a one-line reason (and the tail of the failing step's log) on stderr.
It installs what it lacks with apt-get (buildah, runc, debootstrap,
busybox-static, gcc, libc6-dev, gnupg, ca-certificates) and says so. No
registry is needed: every base image is a local stand-in, made from a
debootstrap root fs. It prints one line per step with its duration; the full
output of every step is in OUT_DIR/logs/.

OUT_DIR/images.txt has one line per image, ``ROLE NAME TARBALL`` (TARBALL
relative to OUT_DIR, a docker-archive for ``ctr -n k8s.io images import``;
NAME fully qualified, as containerd lists it):

    agent         <image.repository>:<image.tag, or the chart's appVersion>,
                  built from images/plugin/Dockerfile
    pause         registry.k8s.io/pause:3.10 (PAUSE_IMAGE below: containerd's
                  sandbox image must be pinned to it)
    test          <test.image.repository>:<test.image.tag>, busybox for `helm test`
    pod-mapped    the image images/pod-mapped/example-pod*.yaml run
    pod-unmapped  the image images/pod-unmapped/example-pod*.yaml run

Every name is read from the repository at build time. From Python (pytest):
``from ci.e2e.images import build``, then ``build.read_manifest(OUT_DIR)``,
``build.smoke_problems(OUT_DIR)`` (a list, empty when all is well),
``build.PAUSE_IMAGE``.

Environment:
    STC_E2E_CACHE   cache dir (default /var/cache/stc-npu-e2e): the debootstrap
                    root fs, the vendor stand-in packages and the recipes of
                    the images kept in buildah's storage between runs
    STC_E2E_MIRROR  Debian mirror for debootstrap (default http://deb.debian.org/debian)

The agent image is rebuilt from the working tree on every run. Everything
else is rebuilt only when what it is made of changes: the root fs and the
stand-in bases (recipe), pause (pause.c), busybox (the Debian package), the
workload images (their directory, base and build args). buildah's storage
stays tidy: working containers are removed, and an image that lost its name
to a new build is deleted. One build per cache runs at a time (a lock).

Stand-ins, and how they differ from the real thing
--------------------------------------------------
* ``debian:12-slim``: a ``debootstrap --variant=minbase bookworm`` root fs,
  slimmed like the official image (no docs, man pages, locales; the official
  image's apt settings). Its apt sources list bookworm main only (no -updates,
  no -security).
* ``python:3.11-slim-bookworm``: the above plus Debian's python3 (3.11.2,
  in /usr/bin; the official image has its own CPython build in /usr/local),
  python3-venv, ca-certificates, links /usr/local/bin/python{,3}, and pip
  and setuptools in /usr/local from the wheels python3-venv ships (Debian
  disables ensurepip for its system Python; pip 23.0.1, no ``wheel``
  package). Debian's EXTERNALLY-MANAGED marker is removed: the official
  image has none, and the Dockerfile uninstalls pip from the system Python.
  Of the official image's ENV only LANG is set.
* The agent build needs this machine's pip settings and CA trust store to
  reach the package index. They are bind-mounted read-only into its RUN
  steps (``buildah bud --volume``), never copied: no image, base or built,
  contains them. buildah leaves the mount points behind, empty (an empty
  /etc/pip.conf, empty directories); the smoke check tells those from
  settings.
* images/pod-unmapped needs the vendor's packages (HPE_URI, HPE_REPO_DEB,
  TENSORTURBO_WHEEL), which cannot be fetched here. Every instruction of its
  Dockerfile runs as written against stand-in packages made here and served
  from a file:// HPE_URI: a signed local apt repository package holding an
  ``hpe-simple`` that installs a placeholder /usr/local/hpe (a ``stcc`` that
  only says it is a stand-in), and a TensorTurbo wheel with only a version.
  What differs is their content: no real HPE or TensorTurbo is in the image
  (and the empty mount point of the stand-ins' directory is).
"""

from __future__ import annotations

import argparse
import ast
import base64
import fcntl
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
MANIFEST = "images.txt"
DEFAULT_CACHE = "/var/cache/stc-npu-e2e"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# buildah's Recommends stay on: its runtime (runc) and network stack are among them.
APT_PACKAGES = (
    "buildah",
    "runc",
    "debootstrap",
    "busybox-static",
    "gcc",
    "libc6-dev",  # gcc -static needs libc.a
    "gnupg",  # signs the vendor stand-in's apt repository
    "ca-certificates",
)
# What the official Debian images configure (debuerreotype's slimify and apt
# settings), so the stand-in bases behave and weigh like them.
SLIM_DPKG_CONFIG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
APT_CONFIG = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENDOR_VERSION = "0.0.0"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class BuildError(Exception):
    """A step failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Image:
    role: str
    name: str
    tarball: str


# --------------------------------------------------------------------------
# Names, read from the repository at build time


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise BuildError(f"{path}: cannot read it: {error}") from error


def _dig(data: Any, dotted: str, where: Path) -> str:
    node = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise BuildError(f"{where}: no {dotted}")
        node = node[key]
    return "" if node is None else str(node)


def agent_image_name(chart: Path) -> str:
    """The agent image the chart runs by default: image.repository with
    image.tag, or the chart's appVersion when the tag is empty."""
    values_path, chart_path = chart / "values.yaml", chart / "Chart.yaml"
    values = _load_yaml(values_path)
    if _dig(values, "image.digest", values_path):
        raise BuildError(f"{values_path}: image.digest is set; a local build cannot match a digest")
    tag = _dig(values, "image.tag", values_path) or _dig(
        _load_yaml(chart_path), "appVersion", chart_path
    )
    return f"{_dig(values, 'image.repository', values_path)}:{tag}"


def chart_test_image_name(chart: Path) -> str:
    values_path = chart / "values.yaml"
    values = _load_yaml(values_path)
    repository = _dig(values, "test.image.repository", values_path)
    return f"{repository}:{_dig(values, 'test.image.tag', values_path)}"


def example_pod_image(directory: Path) -> str:
    """The one image every example pod in DIRECTORY runs."""
    names: set[str] = set()
    for path in sorted(directory.glob("example-pod*.yaml")):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as error:
            raise BuildError(f"{path}: cannot read it: {error}") from error
        for document in documents:
            spec = (document or {}).get("spec") or {}
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                names.add(str(container["image"]))
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise BuildError(f"{directory}: example pods must name exactly one image, found {found}")
    return names.pop()


_ARG = re.compile(r"^ARG\s+(\w+)(?:=(\S*))?\s*$", re.IGNORECASE)
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def dockerfile_arg_default(dockerfile: Path, arg: str) -> str:
    """The default of a global ARG (one before the first FROM), with earlier
    global ARGs expanded as the builder does."""
    values: dict[str, str] = {}
    for line in dockerfile.read_text().splitlines():
        if re.match(r"^FROM\s", line, re.IGNORECASE):
            break
        match = _ARG.match(line.strip())
        if match and match.group(2) is not None:
            values[match.group(1)] = _VAR.sub(
                lambda m: values.get(m.group(1) or m.group(2), m.group(0)), match.group(2)
            )
    if arg not in values:
        raise BuildError(f"{dockerfile}: no global ARG {arg} with a default")
    return values[arg]


def qualified(name: str) -> str:
    """NAME as containerd and buildah store it: docker.io/library/ for short names."""
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


def agent_version(repo: Path) -> str:
    path = repo / "agent" / "src" / "stc_npu_agent" / "__init__.py"
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise BuildError(f"{path}: no __version__")


# --------------------------------------------------------------------------
# Running things


CONTAINER_PREFIX = "stc-npu-e2e-"


@contextmanager
def working_container(base: str) -> Iterator[str]:
    """A buildah working container from BASE (an image or "scratch"),
    removed whatever happens; its name says which process made it, so that
    a later build can remove it after a kill."""
    pull = [] if base == "scratch" else ["--pull=never"]
    name = f"{CONTAINER_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    created = subprocess.run(
        ["buildah", "from", "--name", name, *pull, base],
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        raise BuildError(f"buildah from {base}: {created.stderr.strip()}")
    container = created.stdout.strip().splitlines()[-1]
    try:
        yield container
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def buildah_running() -> bool:
    """Whether any buildah process runs on this machine."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "buildah":
                return True
        except OSError:
            continue  # the process ended meanwhile
    return False


def remove_stale_containers(images: set[str]) -> list[str]:
    """Removes what a killed build left behind: our named working containers
    whose process is gone, and `buildah bud` containers of IMAGES when no
    buildah runs (none of ours does while the cache lock is held)."""
    listed = subprocess.run(
        ["buildah", "containers", "--json"], capture_output=True, text=True, check=False
    )
    removed = []
    idle = not buildah_running()
    for container in json.loads(listed.stdout or "[]") or []:
        name = str(container.get("containername", ""))
        if name.startswith(CONTAINER_PREFIX):
            pid = name.removeprefix(CONTAINER_PREFIX).split("-")[0]
            stale = pid.isdigit() and not Path(f"/proc/{pid}").exists()
        else:
            stale = idle and container.get("imagename") in images
        if stale:
            subprocess.run(["buildah", "rm", name], capture_output=True, check=False)
            removed.append(name)
    return removed


class Builder:
    def __init__(self, repo: Path, out_dir: Path, cache: Path) -> None:
        self.repo = repo
        self.out_dir = out_dir
        self.cache = cache
        self.logs = out_dir / "logs"
        self.retired: list[str] = []  # ids of images replaced under the same name

    def say(self, text: str) -> None:
        print(f"[images] {text}", flush=True)

    def run(self, args: Sequence[str], log: str, env: dict[str, str] | None = None) -> str:
        """Runs ARGS, its output appended to logs/LOG; returns stdout."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{log}.log"
        with log_path.open("a") as stream:
            stream.write(f"$ {shlex.join(args)}\n")
            stream.flush()
            result = subprocess.run(
                args, stdout=subprocess.PIPE, stderr=stream, text=True, check=False, env=env
            )
            stream.write(result.stdout)
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            raise BuildError(
                f"{shlex.join(args[:2])} failed (exit {result.returncode}), log {log_path}:\n{tail}"
            )
        return result.stdout

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        started = time.monotonic()
        self.say(f"{text} ...")
        yield
        self.say(f"{text}: done in {time.monotonic() - started:.1f} s")

    # buildah -----------------------------------------------------------

    def image_id(self, name: str) -> str | None:
        result = subprocess.run(
            ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            return None
        return result.stdout.strip() or None

    def commit(self, container: str, name: str, log: str) -> str:
        old = self.image_id(name)
        self.run(["buildah", "commit", "--quiet", "--rm", container, name], log)
        return self.replaced(name, old)

    def replaced(self, name: str, old: str | None) -> str:
        new = self.image_id(name)
        if new is None:
            raise BuildError(f"{name}: not in buildah's storage after the build")
        if old and old != new:
            self.retired.append(old)
        return new

    def remove_retired(self) -> None:
        """Deletes the images that lost their name to a new build (children first)."""
        for image in reversed(self.retired):
            subprocess.run(["buildah", "rmi", image], capture_output=True, check=False)
        self.retired.clear()

    # cache stamps ------------------------------------------------------

    def _stamp(self, name: str) -> Path:
        return self.cache / "images" / (re.sub(r"[^\w.-]", "_", name) + ".json")

    def cached(self, name: str, recipe: str) -> str | None:
        """The id of NAME if it was built from RECIPE and is still in storage."""
        try:
            stamp = json.loads(self._stamp(name).read_text())
        except (OSError, ValueError):
            return None
        image = self.image_id(name)
        if stamp.get("recipe") == recipe and image and stamp.get("id") == image:
            return image
        return None

    def remember(self, name: str, recipe: str, image: str) -> None:
        path = self._stamp(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"recipe": recipe, "id": image}) + "\n")

    def export(self, role: str, name: str) -> Image:
        tarball = f"{role}.tar"
        (self.out_dir / tarball).unlink(missing_ok=True)
        self.run(
            [
                "buildah",
                "push",
                "--quiet",
                name,
                f"docker-archive:{self.out_dir / tarball}:{qualified(name)}",
            ],
            f"export-{role}",
        )
        return Image(role, qualified(name), tarball)


def recipe_of(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# Host tools


def ensure_packages(builder: Builder) -> None:
    missing = [
        package
        for package in APT_PACKAGES
        if subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        != "install ok installed"
    ]
    if not missing:
        builder.say("host packages present: " + " ".join(APT_PACKAGES))
        return
    with builder.step("installing " + " ".join(missing) + " with apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        builder.run(["apt-get", "update"], "apt", env=env)
        builder.run(["apt-get", "install", "-y", *missing], "apt", env=env)


# --------------------------------------------------------------------------
# The root fs and the stand-in bases


def minbase_rootfs(builder: Builder) -> tuple[Path, str]:
    """A slimmed `debootstrap --variant=minbase bookworm` root fs (cached)."""
    mirror = os.environ.get("STC_E2E_MIRROR", DEFAULT_MIRROR)
    recipe = recipe_of("minbase", SUITE, mirror, SLIM_DPKG_CONFIG, json.dumps(APT_CONFIG))
    rootfs = builder.cache / f"rootfs-{SUITE}-minbase"
    stamp = rootfs.with_suffix(".recipe")
    if stamp.exists() and stamp.read_text().strip() == recipe and rootfs.is_dir():
        builder.say(f"cached root fs {rootfs}")
        return rootfs, recipe
    with builder.step(f"debootstrap --variant=minbase {SUITE} (cached afterwards)"):
        work = rootfs.with_name(rootfs.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(rootfs, ignore_errors=True)
        builder.run(["debootstrap", "--variant=minbase", SUITE, str(work), mirror], "debootstrap")
        slim(work)
        work.rename(rootfs)
        stamp.write_text(recipe + "\n")
    return rootfs, recipe


def slim(rootfs: Path) -> None:
    """What makes the official image 'slim', and leaves no trace of this host."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG_CONFIG)
    for name, text in APT_CONFIG.items():
        (rootfs / "etc/apt/apt.conf.d" / name).write_text(text)
    for pattern in ("usr/share/groff/*", "usr/share/info/*", "usr/share/linda/*",
                    "usr/share/lintian/overrides/*", "usr/share/locale/*", "usr/share/man/*",
                    "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*", "var/log/*.log", "var/log/apt/*"):  # fmt: skip
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock":
                path.unlink()
    for doc in (rootfs / "usr/share/doc").glob("*"):
        for path in doc.iterdir() if doc.is_dir() and not doc.is_symlink() else ():
            if path.name != "copyright":
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    # debootstrap copies these from the host; a container runtime provides its own.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / name).unlink(missing_ok=True)


def debian_standin(builder: Builder, name: str) -> str:
    rootfs, rootfs_recipe = minbase_rootfs(builder)
    recipe = recipe_of("debian", rootfs_recipe, BASE_PATH)
    image = builder.cached(name, recipe)
    if image:
        builder.say(f"cached stand-in {name}")
        return image
    with (
        builder.step(f"stand-in {name} from the root fs"),
        working_container("scratch") as container,
    ):
        mountpoint = builder.run(["buildah", "mount", container], "debian-standin").strip()
        builder.run(["cp", "-a", f"{rootfs}/.", mountpoint], "debian-standin")
        builder.run(["buildah", "umount", container], "debian-standin")
        builder.run(
            ["buildah", "config", "--env", f"PATH={BASE_PATH}", "--cmd", '["bash"]', container],
            "debian-standin",
        )
        image = builder.commit(container, name, "debian-standin")
    builder.remember(name, recipe, image)
    return image


PYTHON_STANDIN_SCRIPT = """\
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends ca-certificates python3 python3-venv
rm -rf /var/lib/apt/lists/*
rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
# Debian disables ensurepip for its system Python; pip installs itself from
# the wheels python3-venv brings along (into /usr/local, Debian's scheme).
set -- /usr/share/python-wheels/pip-*.whl
python3 "$1/pip" install --no-index --no-cache-dir "$1" /usr/share/python-wheels/setuptools-*.whl
test -x /usr/local/bin/pip
ln -s /usr/bin/python3 /usr/local/bin/python3
ln -s /usr/bin/python3 /usr/local/bin/python
find /usr/local/lib -name __pycache__ -prune -exec rm -rf {} +
python --version
python -m pip --version
"""


def python_standin(builder: Builder, name: str, debian: str) -> None:
    debian_image = debian_standin(builder, debian)
    recipe = recipe_of("python", debian_image, PYTHON_STANDIN_SCRIPT)
    if builder.cached(name, recipe):
        builder.say(f"cached stand-in {name}")
        return
    with (
        builder.step(f"stand-in {name}: {debian} + Debian's python3, pip in /usr/local"),
        working_container(debian) as container,
    ):
        builder.run(
            ["buildah", "run", container, "--", "sh", "-c", PYTHON_STANDIN_SCRIPT],
            "python-standin",
        )
        builder.run(
            ["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', container],
            "python-standin",
        )
        image = builder.commit(container, name, "python-standin")
    builder.remember(name, recipe, image)


# --------------------------------------------------------------------------
# pause and busybox


def pause_image(builder: Builder) -> None:
    source = HERE / "pause.c"
    gcc = builder.run(["gcc", "--version"], "pause").splitlines()[0]
    recipe = recipe_of("pause", source.read_bytes(), gcc)
    if builder.cached(PAUSE_IMAGE, recipe):
        builder.say(f"cached {PAUSE_IMAGE}")
        return
    with (
        builder.step(f"{PAUSE_IMAGE} from pause.c (gcc -static)"),
        tempfile.TemporaryDirectory() as tmp,
        working_container("scratch") as container,
    ):
        binary = Path(tmp) / "pause"
        builder.run(
            ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(binary), str(source)],
            "pause",
        )
        builder.run(["buildah", "copy", container, str(binary), "/pause"], "pause")
        entrypoint = ["--entrypoint", '["/pause"]', "--user", "65535:65535"]
        builder.run(["buildah", "config", *entrypoint, container], "pause")
        image = builder.commit(container, PAUSE_IMAGE, "pause")
    builder.remember(PAUSE_IMAGE, recipe, image)


def busybox_image(builder: Builder, name: str) -> None:
    version = builder.run(
        ["dpkg-query", "-W", "-f", "${Version}", "busybox-static"], "busybox"
    ).strip()
    recipe = recipe_of("busybox", version)
    if builder.cached(name, recipe):
        builder.say(f"cached {name} (busybox-static {version})")
        return
    with (
        builder.step(f"{name} from Debian's busybox-static {version}"),
        tempfile.TemporaryDirectory() as tmp,
        working_container("scratch") as container,
    ):
        rootfs = Path(tmp)
        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root"):
            (rootfs / directory).mkdir(parents=True)
        (rootfs / "tmp").mkdir(mode=0o1777)
        (rootfs / "tmp").chmod(0o1777)
        shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
        applets = builder.run(["/bin/busybox", "--list-full"], "busybox").split()
        for applet in applets:
            link = rootfs / applet
            if not link.exists():
                link.symlink_to("/bin/busybox")
        (rootfs / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
        )
        (rootfs / "etc/group").write_text("root:x:0:\nnobody:x:65534:\n")
        builder.run(["buildah", "copy", container, f"{rootfs}/.", "/"], "busybox")
        builder.run(["buildah", "config", "--cmd", '["sh"]', container], "busybox")
        image = builder.commit(container, name, "busybox")
    builder.remember(name, recipe, image)


# --------------------------------------------------------------------------
# Builds from the repository's Dockerfiles


def host_pip_settings(builder: Builder) -> list[str]:
    """`--volume` options that give every RUN step this machine's pip settings
    and CA trust store, read-only: a pip.conf made from `pip config list` at
    /etc/pip.conf, and every file or directory those settings name, at the
    same path. Nothing of it lands in a layer."""
    listing = builder.run([sys.executable, "-m", "pip", "config", "list"], "pip-config")
    text, paths = pip_mounts(listing, os.path.exists)
    config = builder.cache / "pip.conf"
    config.write_text(text)
    volumes = [f"{config}:/etc/pip.conf:ro", *(f"{path}:{path}:ro" for path in paths)]
    return [option for volume in volumes for option in ("--volume", volume)]


def pip_mounts(listing: str, exists: Callable[[str], bool]) -> tuple[str, list[str]]:
    """From `pip config list` output: one pip.conf holding every setting (the
    environment's PIP_* ones too), and the host paths those settings name
    that EXISTS, outermost only. A file:// index counts with its parent: a
    local simple index links to its files beside it. Without a `cert`
    setting, pip would trust only its own bundle: it gets the system's."""
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        option = key.rpartition(".")[2]
        if option and value:
            settings[option] = ast.literal_eval(value) if value[0] in "'\"" else value
    if "cert" not in settings and exists(SYSTEM_CA_BUNDLE):
        settings["cert"] = SYSTEM_CA_BUNDLE
    text = "[global]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(settings.items()))
    paths: set[str] = set()
    for value in settings.values():
        for word in value.split():
            path = word
            if word.startswith("file://"):
                path = os.path.dirname(word.removeprefix("file://").rstrip("/"))
            if path.startswith("/") and exists(path):
                paths.add(path)
    outermost = [
        path for path in sorted(paths) if not any(path.startswith(other + "/") for other in paths)
    ]
    return text, outermost


def bud(
    builder: Builder,
    *,
    dockerfile: Path,
    context: Path,
    name: str,
    log: str,
    build_args: dict[str, str],
    volumes: list[str],
) -> None:
    """`buildah bud` of a repository Dockerfile as written. --layers=false and
    --no-cache: buildah 1.28 leaves a `--mount=type=bind,from=STAGE` empty
    when STAGE comes from its layer cache and the mounting step does not."""
    old = builder.image_id(name)
    args = [
        "buildah", "bud", "--pull=never", "--layers=false", "--no-cache",
        "--file", str(dockerfile), "--tag", name, *volumes,
    ]  # fmt: skip
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    builder.run([*args, str(context)], log)
    builder.replaced(name, old)


def git_revision(repo: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=40"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def agent_image(builder: Builder, volumes: list[str]) -> str:
    name = agent_image_name(builder.repo / "chart" / "stc-npu")
    dockerfile = builder.repo / "images" / "plugin" / "Dockerfile"
    version = agent_version(builder.repo)
    with builder.step(f"{name} from images/plugin/Dockerfile (VERSION={version})"):
        bud(
            builder,
            dockerfile=dockerfile,
            context=builder.repo,
            name=name,
            log="agent",
            build_args={"VERSION": version, "REVISION": git_revision(builder.repo)},
            volumes=volumes,
        )
    return name


def tree_digest(*roots: Path) -> str:
    """What the files under ROOTS hold, by relative path."""
    parts: list[str | bytes] = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            parts += [str(path.relative_to(root)), path.read_bytes()]
    return recipe_of(*parts)


def workload_image(
    builder: Builder,
    role: str,
    *,
    base_id: str,
    build_args: dict[str, str],
    volumes: list[str],
    inputs: Sequence[Path] = (),
) -> str:
    """An example workload image, rebuilt when its directory, base image,
    build args or INPUTS change (all it is made of)."""
    directory = builder.repo / "images" / role
    name = example_pod_image(directory)
    recipe = recipe_of(role, base_id, json.dumps(build_args), tree_digest(directory, *inputs))
    if builder.cached(name, recipe):
        builder.say(f"cached {name}: images/{role} unchanged")
        return name
    with builder.step(f"{name} from images/{role}/Dockerfile"):
        bud(
            builder,
            dockerfile=directory / "Dockerfile",
            context=directory,
            name=name,
            log=role,
            build_args=build_args,
            volumes=volumes,
        )
    image = builder.image_id(name)
    if image:
        builder.remember(name, recipe, image)
    return name


# --------------------------------------------------------------------------
# The vendor's packages for images/pod-unmapped, stood in for

VENDOR_MOUNT = "/stc-npu-e2e-vendor"
STCC_STANDIN = """#!/bin/sh
echo "stcc: stand-in of the e2e image build, not Stream Computing's compiler" >&2
exit 1
"""


def _deb(builder: Builder, root: Path, out: Path) -> None:
    builder.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], "vendor")


def _control(package: str, description: str, extra: str = "") -> str:
    return (
        f"Package: {package}\nVersion: {VENDOR_VERSION}\nArchitecture: amd64\n"
        f"Maintainer: stc-npu e2e <e2e@stc-npu.invalid>\n{extra}"
        f"Description: {description}\n"
    )


def _packages_stanza(deb: Path, control: str) -> str:
    data = deb.read_bytes()
    return (
        control.rstrip("\n")
        + f"\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        + f"MD5sum: {hashlib.md5(data).hexdigest()}\n"  # noqa: S324 (apt's index field)
        + f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def _wheel(path: Path, distribution: str) -> None:
    """A pure-data wheel: a `tensorturbo` module that says it is a stand-in."""
    files = {
        "tensorturbo/__init__.py": (
            f'"""Stand-in of the e2e image build, not TensorTurbo."""\n'
            f'__version__ = "{VENDOR_VERSION}"\nSTAND_IN = True\n'
        ),
        f"{distribution}-{VENDOR_VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {VENDOR_VERSION}\n"
            "Summary: stand-in of the e2e image build\n"
        ),
        f"{distribution}-{VENDOR_VERSION}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: stc-npu-e2e\nRoot-Is-Purelib: false\n"
            "Tag: cp311-cp311-linux_x86_64\n"
        ),
    }
    record = f"{distribution}-{VENDOR_VERSION}.dist-info/RECORD"
    lines = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            lines.append(f"{name},sha256={digest.decode()},{len(data)}")
            archive.writestr(name, data)
        archive.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    path.write_bytes(buffer.getvalue())


def vendor_standins(builder: Builder, release: str) -> dict[str, str]:
    """The build args of images/pod-unmapped, pointing at stand-in packages in
    a file:// HPE_URI (cached; the volume option goes with them)."""
    repo_package = f"hpe-repo-debian{release}-e2e"
    repo_deb = f"{repo_package}_{VENDOR_VERSION}_amd64.deb"
    distribution = f"tb_debian{release}"
    wheel = f"{distribution}-{VENDOR_VERSION}-cp311-cp311-linux_x86_64.whl"
    makers: list[Callable[..., object]] = [_vendor_build, _deb, _control, _packages_stanza, _wheel]
    code = [inspect.getsource(maker) for maker in makers]
    recipe = recipe_of("vendor", release, VENDOR_VERSION, STCC_STANDIN, *code)
    store = builder.cache / "vendor"
    stamp = store / "recipe"
    if not (stamp.exists() and stamp.read_text().strip() == recipe):
        with builder.step("stand-ins of the vendor's HPE repository package and wheel"):
            shutil.rmtree(store, ignore_errors=True)
            store.mkdir(parents=True)
            _vendor_build(
                builder,
                store,
                repo_package=repo_package,
                repo_deb=repo_deb,
                distribution=distribution,
                wheel=wheel,
            )
            stamp.write_text(recipe + "\n")
    else:
        builder.say("cached vendor stand-in packages")
    return {
        "HPE_URI": f"file://{VENDOR_MOUNT}",
        "HPE_REPO_DEB": repo_deb,
        "TENSORTURBO_WHEEL": wheel,
    }


def _vendor_build(
    builder: Builder,
    store: Path,
    *,
    repo_package: str,
    repo_deb: str,
    distribution: str,
    wheel: str,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gnupg = work / "gnupg"
        gnupg.mkdir(mode=0o700)
        gpg = ["gpg", "--batch", "--homedir", str(gnupg), "--pinentry-mode", "loopback"]
        uid = "stc-npu e2e stand-in <e2e@stc-npu.invalid>"
        builder.run(
            [*gpg, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
            "vendor",
        )
        # hpe-simple: a placeholder HPE under /usr/local/hpe.
        simple = work / "hpe-simple"
        (simple / "DEBIAN").mkdir(parents=True)
        (simple / "usr/local/hpe/bin").mkdir(parents=True)
        (simple / "usr/local/hpe/lib").mkdir(parents=True)
        (simple / "usr/local/hpe/bin/stcc").write_text(STCC_STANDIN)
        (simple / "usr/local/hpe/bin/stcc").chmod(0o755)
        (simple / "usr/local/hpe/VERSION").write_text(f"stand-in {VENDOR_VERSION}\n")
        simple_control = _control("hpe-simple", "stand-in of the vendor's HPE user space")
        (simple / "DEBIAN/control").write_text(simple_control)
        # The repository package: a flat apt repository signed with hpe.pub.
        repository = f"var/hpe-repo-e2e-{VENDOR_VERSION}"
        root = work / "hpe-repo"
        pool = root / repository
        pool.mkdir(parents=True)
        (root / "DEBIAN").mkdir()
        (root / "etc/apt/sources.list.d").mkdir(parents=True)
        simple_deb = pool / f"hpe-simple_{VENDOR_VERSION}_amd64.deb"
        _deb(builder, simple, simple_deb)
        packages = _packages_stanza(simple_deb, simple_control)
        (pool / "Packages").write_text(packages)
        digest = hashlib.sha256(packages.encode()).hexdigest()
        (pool / "Release").write_text(
            "Origin: stc-npu e2e\nLabel: hpe stand-in\nSuite: stable\nCodename: e2e\n"
            "Architectures: amd64\nDate: Thu, 01 Jan 2026 00:00:00 UTC\n"
            f"SHA256:\n {digest} {len(packages.encode())} Packages\n"
        )
        signer = ["--local-user", uid, "--output", str(pool / "InRelease")]
        builder.run(
            [*gpg, *signer, "--clearsign", str(pool / "Release")],
            "vendor",
        )
        builder.run([*gpg, "--armor", "--output", str(pool / "hpe.pub"), "--export"], "vendor")
        (root / "etc/apt/sources.list.d/hpe-repo-e2e.list").write_text(
            f"deb file:/{repository} ./\n"
        )
        (root / "DEBIAN/control").write_text(
            _control(repo_package, "stand-in of the vendor's local HPE apt repository")
        )
        _deb(builder, root, store / repo_deb)
        _wheel(store / wheel, distribution)


# --------------------------------------------------------------------------
# Manifest and smoke check


def write_manifest(out_dir: Path, images: list[Image]) -> None:
    text = "".join(f"{i.role} {i.name} {i.tarball}\n" for i in images)
    (out_dir / MANIFEST).write_text(text)


def read_manifest(out_dir: Path) -> list[Image]:
    images = []
    for number, line in enumerate((out_dir / MANIFEST).read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) != 3:
            raise BuildError(f"{out_dir / MANIFEST}:{number}: want ROLE NAME TARBALL: {line!r}")
        images.append(Image(*fields))
    return images


def _inspect(name: str) -> dict[str, Any]:
    result = subprocess.run(
        ["buildah", "inspect", "--type", "image", name], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return {}
    config: dict[str, Any] = json.loads(result.stdout).get("OCIv1", {}).get("config", {})
    return config


def _run_in(name: str, *command: str) -> subprocess.CompletedProcess[str]:
    with working_container(name) as container:
        return subprocess.run(
            ["buildah", "run", container, "--", *command],
            capture_output=True,
            text=True,
            check=False,
        )


@contextmanager
def _mounted(name: str) -> Iterator[Path]:
    """The root fs of image NAME, read from a throwaway working container."""
    with working_container(name) as container:
        mountpoint = subprocess.run(
            ["buildah", "mount", container], capture_output=True, text=True, check=True
        ).stdout.strip()
        yield Path(mountpoint)


def _host_leaks(root: Path) -> list[str]:
    """What of this machine's pip settings and trust store, or of pip, an
    image holds. Empty /etc/pip.conf and directories are the mount points of
    the build's --volume options (buildah leaves them), not settings."""
    leaks = []
    config = root / "etc/pip.conf"
    if config.is_file() and config.stat().st_size:
        leaks.append("a non-empty /etc/pip.conf")
    for directory in ("etc/xdg/pip", "root/.config/pip", "root/.pip"):
        if any(path.is_file() and path.stat().st_size for path in (root / directory).rglob("*")):
            leaks.append(f"pip settings in /{directory}")
    host_bundle = Path(SYSTEM_CA_BUNDLE)
    image_bundle = root / SYSTEM_CA_BUNDLE.lstrip("/")
    if (
        host_bundle.is_file()
        and image_bundle.is_file()
        and image_bundle.read_bytes() == host_bundle.read_bytes()
    ):
        leaks.append("this machine's CA bundle")
    if list(root.glob("usr/local/lib/python3*/*-packages/pip")) or list(
        root.glob("opt/*/lib/python3*/site-packages/pip")
    ):
        leaks.append("pip (the Dockerfile uninstalls it)")
    return leaks


def smoke_problems(out_dir: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the images of OUT_DIR (empty: nothing): every
    tarball exists, the agent image has the Dockerfile's ENTRYPOINT and USER,
    runs `stc-npu-agent --version` with the package's version, and holds no
    pip and none of this machine's pip settings."""
    problems = []
    images = {image.role: image for image in read_manifest(out_dir)}
    for role in ("agent", "pause", "test", "pod-mapped", "pod-unmapped"):
        if role not in images:
            problems.append(f"{out_dir / MANIFEST}: no {role} image")
    for image in images.values():
        if not (out_dir / image.tarball).is_file():
            problems.append(f"{image.role}: no tarball {out_dir / image.tarball}")
    if "agent" in images:
        name = images["agent"].name
        config = _inspect(name)
        if config.get("Entrypoint") != ["stc-npu-agent"]:
            problems.append(f"{name}: entrypoint {config.get('Entrypoint')}, want [stc-npu-agent]")
        if config.get("User") != "0:0":
            problems.append(f"{name}: user {config.get('User')!r}, want '0:0'")
        want = f"stc-npu-agent {agent_version(repo)}"
        ran = _run_in(name, "stc-npu-agent", "--version")
        if ran.stdout.strip() != want:
            problems.append(f"{name}: --version said {ran.stdout.strip() or ran.stderr!r}")
        with _mounted(name) as root:
            problems += [f"{name}: {leak}" for leak in _host_leaks(root)]
    return problems


# --------------------------------------------------------------------------


@contextmanager
def cache_lock(builder: Builder) -> Iterator[None]:
    """One build at a time per cache: two would replace each other's images."""
    with (builder.cache / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            builder.say(f"waiting for another build using {builder.cache}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(repo: Path, out_dir: Path, cache: Path) -> list[Image]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "logs", ignore_errors=True)
    builder = Builder(repo, out_dir, cache)
    started = time.monotonic()
    ensure_packages(builder)
    with cache_lock(builder):
        try:
            images = build_all(builder)
        finally:
            builder.remove_retired()
    builder.say(f"all images built in {time.monotonic() - started:.1f} s: {out_dir / MANIFEST}")
    return images


def build_all(builder: Builder) -> list[Image]:
    repo, cache = builder.repo, builder.cache
    python_base = dockerfile_arg_default(repo / "images/plugin/Dockerfile", "PYTHON_IMAGE")
    debian_bases = {
        dockerfile_arg_default(repo / f"images/{role}/Dockerfile", "BASE_IMAGE")
        for role in ("pod-mapped", "pod-unmapped")
    }
    if len(debian_bases) != 1:
        raise BuildError(f"workload Dockerfiles differ in BASE_IMAGE: {sorted(debian_bases)}")
    debian_base = qualified(debian_bases.pop())
    removed = remove_stale_containers({qualified(python_base), debian_base})
    if removed:
        builder.say(f"removed working containers a killed build left: {' '.join(removed)}")
    python_standin(builder, qualified(python_base), debian_base)
    pause_image(builder)
    test_name = chart_test_image_name(repo / "chart" / "stc-npu")
    busybox_image(builder, test_name)
    volumes = host_pip_settings(builder)
    names = {"agent": agent_image(builder, volumes), "pause": PAUSE_IMAGE, "test": test_name}
    base_id = builder.image_id(debian_base) or ""
    names["pod-mapped"] = workload_image(
        builder, "pod-mapped", base_id=base_id, build_args={}, volumes=[]
    )
    release = dockerfile_arg_default(repo / "images/pod-unmapped/Dockerfile", "DEBIAN_RELEASE")
    names["pod-unmapped"] = workload_image(
        builder,
        "pod-unmapped",
        base_id=base_id,
        build_args=vendor_standins(builder, release),
        volumes=["--volume", f"{cache / 'vendor'}:{VENDOR_MOUNT}:ro"],
        inputs=[cache / "vendor"],
    )
    with builder.step(f"docker-archive tarballs in {builder.out_dir}"):
        images = [builder.export(role, name) for role, name in names.items()]
    write_manifest(builder.out_dir, images)
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", type=Path, help="where the tarballs and images.txt go")
    parser.add_argument("--check", action="store_true", help="only smoke-check a finished build")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: working containers are removed, a running
    # buildah is killed (subprocess.run does that when interrupted).
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))
    if os.geteuid() != 0:
        print("build.py: must run as root (buildah, debootstrap, apt-get)", file=sys.stderr)
        return 2
    out_dir = args.out_dir.resolve()
    try:
        if not args.check:
            build(REPO, out_dir, Path(os.environ.get("STC_E2E_CACHE", DEFAULT_CACHE)))
        problems = smoke_problems(out_dir)
    except BuildError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"build.py: smoke check: {problem}", file=sys.stderr)
    if not problems:
        print(f"[images] smoke check passed ({out_dir / MANIFEST})", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
