"""`make e2e`: set up, build the images, run tests/e2e on a real cluster,
ALWAYS tear down, and print every measured figure in one block.

    python -m ci.e2e.run

When the machine cannot run it (not root, no cgroup v1 fs, no ../shared/k8s)
it says exactly why and exits 1; with STC_E2E=skip it says so and exits 0.
It never passes silently.

One run at a time per machine (the node's paths, netns and cgroups are
fixed): a second `make e2e` waits for the first. ``STC_E2E_SELECT`` runs
only some scenarios while working on them (pytest arguments, e.g.
``tests/e2e/test_1d_dra.py``); CI runs them all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from ci.e2e import cluster, transcript
from ci.e2e.cluster import E2E_BIN, OUT_DIR, REPO

SHARED = REPO.parent / "shared"
LOCK_FILE = Path("/run/lock/stc-npu-e2e.lock")
SELECT_ENV = "STC_E2E_SELECT"
IMAGES_DIR = OUT_DIR / "images"
IMAGES_CACHE = Path(os.environ.get("STC_E2E_CACHE", "/var/cache/stc-npu-e2e"))
# Debian packages the node needs (the image builder installs its own).
# containerd itself comes from ../shared/containerd (2.x, with CDI), not Debian.
APT_PACKAGES = (
    "etcd-server",
    "runc",
    "containernetworking-plugins",
    "iproute2",
    "openssl",
    "util-linux",
    "xz-utils",
)
# The binaries of ../shared, unpacked into E2E_BIN: (source, names, sha256 of
# each unpacked binary as their README pins it).
KUBE_SHA256 = "ee6148dcbd334ccb86b42b816cbab536cedb90ed213698bd73956563ced490d9"
KUBELET_123_SHA256 = "3c585718f346e9972b60d644f0812f7b0d7483d9e9ad2f6b1cf0674be85f032b"
CONTAINERD_SHA256 = {
    "containerd": "d024e323e2f0b2db764393c4229822549925348ad6605a7826aca0c468293c7d",
    "containerd-shim-runc-v2": "72ed68e09c171725ec363e521c7148a0001868173625134f293be36bd9f13bf9",
    "ctr": "6a578f788e23ba080b0b82caeb3db53ff2c2cf6af292357b69f056cb8f582195",
}
KUBE_COMMANDS = ("kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_pinned(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def install_packages() -> bool:
    """apt-get install the missing packages only; True when it installed any."""
    missing = [
        package
        for package in APT_PACKAGES
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    ]
    if not missing:
        transcript.say(f"  Debian packages present: {' '.join(APT_PACKAGES)}")
        return False
    transcript.say(f"  installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cluster.run(["apt-get", "update", "-q"], timeout=600, env=env)
    cluster.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=1200,
        env=env,
    )
    return True


def unpack_xz(source: Path, target: Path, sha256: str) -> None:
    with target.open("wb") as out:
        subprocess.run(["xz", "-dc", str(source)], stdout=out, check=True)
    if sha256_of(target) != sha256:
        target.unlink()
        raise cluster.E2EError(f"{source}: unpacked binary's sha256 is not the pinned {sha256}")
    target.chmod(0o755)


def unpack_binaries() -> bool:
    """The binaries of ../shared into E2E_BIN, checked against their pinned
    sha256; True when anything had to be unpacked (a cold run)."""
    E2E_BIN.mkdir(parents=True, exist_ok=True)
    unpacked = False
    kube = E2E_BIN / "kube"
    if not has_pinned(kube, KUBE_SHA256):
        unpack_xz(SHARED / "k8s" / "kube-v1.36.2-linux-amd64.xz", kube, KUBE_SHA256)
        unpacked = True
    for command in KUBE_COMMANDS:
        link = E2E_BIN / command
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to("kube")  # the binary dispatches on the name it is called by
    old = E2E_BIN / "kubelet-1.23"
    if not has_pinned(old, KUBELET_123_SHA256):
        unpack_xz(SHARED / "k8s" / "kubelet-v1.23.1-linux-amd64.xz", old, KUBELET_123_SHA256)
        unpacked = True
    if not all(has_pinned(E2E_BIN / n, sha) for n, sha in CONTAINERD_SHA256.items()):
        archive = SHARED / "containerd" / "containerd-v2.3.4-linux-amd64.tar.xz"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in CONTAINERD_SHA256:
                    source = tar.extractfile(member)
                    assert source is not None
                    with (E2E_BIN / name).open("wb") as out:
                        shutil.copyfileobj(source, out)
                    (E2E_BIN / name).chmod(0o755)
        for name, sha in CONTAINERD_SHA256.items():
            if not has_pinned(E2E_BIN / name, sha):
                raise cluster.E2EError(f"{archive}: {name}'s sha256 is not the pinned {sha}")
        unpacked = True
    return unpacked


def build_images() -> None:
    # Its own progress lines go straight to our stdout.
    subprocess.run(
        [sys.executable, str(REPO / "ci" / "e2e" / "images" / "build.py"), str(IMAGES_DIR)],
        timeout=1800,
        check=True,
    )
    for line in (IMAGES_DIR / "images.txt").read_text().splitlines():
        transcript.say(f"  image {line}")


class Interrupted:
    """SIGINT/SIGTERM while the tests run: forwarded to pytest (which tears
    its fixtures down), remembered so the run ends non-zero after cleanup."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.signal: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        else:
            raise KeyboardInterrupt(f"signal {signum}")


def run_tests(interrupted: Interrupted) -> int:
    env = dict(os.environ, STC_E2E_IMAGES=str(IMAGES_DIR))
    env[transcript.START_ENV] = str(transcript.started_at())
    child = subprocess.Popen(
        [
            sys.executable, "-m", "pytest",
            *(os.environ.get(SELECT_ENV, "").split() or ["tests/e2e"]),
            "-p", "no:cacheprovider", "-q", "-rfEX",
            # -s: the transcript's lines go out as they happen.
            "-s",
        ],
        cwd=REPO,
        env=env,
        # Its own session: a Ctrl-C reaches it once, through the handler.
        start_new_session=True,
    )  # fmt: skip
    interrupted.child = child
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def one_run_per_machine() -> TextIO:
    """Wait for any other run on this machine; the open lock file."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = LOCK_FILE.open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"make e2e: another run holds {LOCK_FILE}; waiting for it", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def summary(total: float, cold: bool, outcome: str) -> None:
    figures = transcript.read_figures(OUT_DIR / "figures.jsonl")
    transcript.say("=" * 72)
    transcript.say(f"SUMMARY: {outcome}; total {total:.1f} s ({'cold' if cold else 'warm'} run)")
    for figure in figures:
        note = f"  ({figure['note']})" if figure.get("note") else ""
        value = float(str(figure["value"]))
        transcript.say(f"  {figure['name']:<62} {value:7.2f} {figure['unit']}{note}")
    transcript.say(
        f"  {'make e2e total (' + ('cold' if cold else 'warm') + ')':<62} {total:7.2f} s"
    )
    transcript.say(f"transcript: {OUT_DIR / 'transcript.log'}; component logs: {cluster.LOG_DIR}")
    transcript.say("=" * 72)


def main() -> int:
    started = time.monotonic()
    problems = cluster.preflight_problems()
    if problems:
        reasons = "\n".join(f"  - {p}" for p in problems)
        if os.environ.get("STC_E2E") == "skip":
            print(f"make e2e: SKIPPED (STC_E2E=skip); it cannot run here:\n{reasons}")
            return 0
        print(
            f"make e2e: cannot run on this machine:\n{reasons}\n"
            "Run it as root on a Linux machine with cgroup v1 and ../shared beside the "
            "repository, or set STC_E2E=skip to skip it on purpose.",
            file=sys.stderr,
        )
        return 1
    lock = one_run_per_machine()  # noqa: F841 (held until this process exits)
    for old in (OUT_DIR / "transcript.log", OUT_DIR / "figures.jsonl"):
        old.unlink(missing_ok=True)
    shutil.rmtree(cluster.LOG_DIR, ignore_errors=True)
    transcript.configure(OUT_DIR / "transcript.log", OUT_DIR / "figures.jsonl")
    interrupted = Interrupted()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    cold = not IMAGES_CACHE.exists()
    outcome = "FAILED"
    try:
        with transcript.step("leftovers of an earlier run"):
            for problem in cluster.down():
                transcript.say(f"  could not undo: {problem}")
        with transcript.step("Debian packages"):
            cold |= install_packages()
        with transcript.step("binaries from ../shared (sha256 checked)"):
            cold |= unpack_binaries()
        with transcript.step("images (ci/e2e/images/build.py)"):
            build_images()
        with transcript.step("pytest tests/e2e"):
            code = run_tests(interrupted)
        outcome = "PASSED" if code == 0 else f"FAILED (pytest exit {code})"
    except KeyboardInterrupt:
        outcome = "INTERRUPTED"
    except Exception as error:
        transcript.say(f"  error: {error}"[:2000])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the teardown must finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with transcript.step("final teardown (state file)"):
            left = cluster.down()
        for problem in left:
            transcript.say(f"  could not undo: {problem}")
        if left:
            outcome += "; teardown incomplete"
        if interrupted.signal is not None:
            outcome = f"INTERRUPTED (signal {interrupted.signal}); " + outcome
        summary(time.monotonic() - started, cold, outcome)
    return 0 if outcome == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
