"""Installs the stack's programs into a per-user cache, keyed by version, once per machine.

Kafka's jars and the Apicurio Registry distribution come from Maven Central through Maven
(infra/pom.xml); MinIO is built from source with `go install`. Each install goes to a temporary
directory beside its final place and is renamed into place only when complete, under a file
lock, so an interrupted or concurrent install never leaves a half-filled directory that looks
done. Also finds a JDK new enough for each service. Starts nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.errors import StackError

POM = Path(__file__).resolve().parent.parent / "pom.xml"

# MinIO tags its releases RELEASE.<date> (not semver), and the Go module proxy resolves them only
# by commit, as pseudo-versions. Each pinned release maps to (module version, full commit id).
MINIO_MODULE_VERSIONS: dict[str, tuple[str, str]] = {
    "RELEASE.2025-09-07T16-13-09Z": (
        "v0.0.0-20250907161309-07c3a429bfed",
        "07c3a429bfed433e49018cb0f78a52145d4bedeb",
    ),
}

Progress = Callable[[str], None]


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Make `final` by filling a fresh temporary sibling and renaming it into place."""
    if final.is_dir():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # someone else finished it while we waited
            return final
        for leftover in final.parent.glob(f".{final.name}.*"):
            if leftover.is_dir():  # from an install that was killed; we hold the lock now
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            fill(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is plain user files
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    exe = shutil.which(argv[0])
    if exe is None:
        raise StackError(f"{what} needs `{argv[0]}` on PATH, and it is not installed")
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise StackError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        raise StackError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n" + "\n".join(output)
        )


def kafka_libs(cache_dir: Path, version: str, progress: Progress) -> Path:
    """Directory of the kafka_2.13 jar and everything it needs at run time."""

    def fill(tmp: Path) -> None:
        progress(f"fetching Kafka {version} jars with Maven")
        _run(
            [
                "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                "-DincludeTypes=jar", f"-Dkafka.version={version}",
                f"-DoutputDirectory={tmp / 'libs'}", f"-Dnextstate.work={tmp / 'mvn'}",
            ],
            f"fetching Kafka {version}",
        )
        shutil.rmtree(tmp / "mvn", ignore_errors=True)
        if not any((tmp / "libs").glob(f"kafka_2.13-{version}.jar")):
            raise StackError(f"Maven ran but left no kafka_2.13-{version}.jar in {tmp / 'libs'}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    return _install_dir(cache_dir / f"kafka-{version}", fill) / "libs"


def apicurio_app(cache_dir: Path, version: str, progress: Progress) -> Path:
    """The unpacked Apicurio Registry Quarkus application (holds quarkus-run.jar)."""

    def fill(tmp: Path) -> None:
        progress(f"fetching Apicurio Registry {version} with Maven")
        _run(
            [
                "mvn", "-q", "-B", "-f", str(POM), "dependency:unpack@apicurio",
                f"-Dapicurio.version={version}", f"-Dapicurio.dir={tmp / 'app'}",
                f"-Dnextstate.work={tmp / 'mvn'}",
            ],
            f"fetching Apicurio Registry {version}",
        )
        shutil.rmtree(tmp / "mvn", ignore_errors=True)
        if not (tmp / "app" / "quarkus-run.jar").is_file():
            raise StackError(
                f"io.apicurio:apicurio-registry-app:{version}:tar.gz:all unpacked without quarkus-run.jar"
            )

    cache_dir.mkdir(parents=True, exist_ok=True)
    return _install_dir(cache_dir / f"apicurio-{version}", fill) / "app"


def minio_binary(cache_dir: Path, release: str, progress: Progress) -> Path:
    """The `minio` server binary of a release, built once with `go install`."""
    module_version, commit = MINIO_MODULE_VERSIONS.get(release, (release, ""))

    def fill(tmp: Path) -> None:
        progress(f"building MinIO {release} with go install (takes a few minutes, once)")
        ldflags = [f"-X github.com/minio/minio/cmd.ReleaseTag={release}"]
        stamp = re.fullmatch(r"RELEASE\.(\d{4}-\d\d-\d\d)T(\d\d)-(\d\d)-(\d\d)Z", release)
        if stamp:
            ldflags.append(f"-X github.com/minio/minio/cmd.Version={stamp[1]}T{stamp[2]}:{stamp[3]}:{stamp[4]}Z")
            ldflags.append(f"-X github.com/minio/minio/cmd.CopyrightYear={stamp[1][:4]}")
        if commit:
            ldflags.append(f"-X github.com/minio/minio/cmd.CommitID={commit}")
            ldflags.append(f"-X github.com/minio/minio/cmd.ShortCommitID={commit[:12]}")
        _run(
            ["go", "install", "-trimpath", "-ldflags", " ".join(ldflags), f"github.com/minio/minio@{module_version}"],
            f"building MinIO {release}",
            env={"GOBIN": str(tmp), "CGO_ENABLED": "0"},
            cwd=tmp,
        )
        if not (tmp / "minio").is_file():
            raise StackError(f"go install github.com/minio/minio@{module_version} left no binary in {tmp}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    return _install_dir(cache_dir / f"minio-{release}", fill) / "minio"


def _java_version(home: Path) -> int | None:
    """Feature version (17, 21, 25, ...) of the JDK or JRE at `home`, or None if it is not one."""
    if not (home / "bin" / "java").is_file():
        return None
    text = ""
    try:
        text = (home / "release").read_text()
    except OSError:
        try:
            text = subprocess.run(
                [str(home / "bin" / "java"), "-version"], capture_output=True, text=True, timeout=30
            ).stderr
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r'(?:JAVA_VERSION=|version )"(\d+)(?:\.(\d+))?', text)
    if not match:
        return None
    major = int(match[1])
    return int(match[2]) if major == 1 and match[2] else major


@dataclass(frozen=True)
class Java:
    executable: Path
    version: int


def find_java(minimum: int, configured: Path | None, needed_by: str) -> Java:
    """A `java` of at least `minimum`, the newest one found.

    StackSettings.java_home wins when given; otherwise JAVA_HOME, /usr/lib/jvm/* and the `java`
    on PATH are searched.
    """
    if configured is not None:
        version = _java_version(configured)
        if version is None or version < minimum:
            raise StackError(
                f"{needed_by} needs Java {minimum} or newer, but the configured java_home "
                f"{configured} holds {'no java' if version is None else f'Java {version}'}"
            )
        return Java(configured / "bin" / "java", version)
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        candidates.extend(sorted(p for p in jvm_root.iterdir() if p.is_dir()))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent.parent)
    found: dict[Path, int] = {}
    for home in candidates:
        version = _java_version(home)
        if version is not None:
            found.setdefault(home.resolve(), version)
    usable = [(version, home) for home, version in found.items() if version >= minimum]
    if not usable:
        seen = ", ".join(f"{home} (Java {v})" for home, v in found.items()) or "none"
        raise StackError(
            f"{needed_by} needs Java {minimum} or newer; JDKs found: {seen}. Install a JDK "
            f"{minimum}+ (e.g. Temurin) and point NEXTSTATE_STACK__JAVA_HOME at it"
        )
    version, home = max(usable)
    return Java(home / "bin" / "java", version)
