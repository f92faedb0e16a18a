"""Builder for the testbed reference OS disk image.

The testbed reference OS is a miniature embedded-Linux OS made from Debian
bookworm packages, used to exercise the testbed itself. Its recipe lives in
``images/`` at the top of the repository:

* ``images/packages.txt``       packages installed into the root filesystem
* ``images/hooks/essential.sh`` mmdebstrap hook run while packages install
* ``images/hooks/customize.sh`` turns the installed packages into the OS
* ``images/rootfs/``            files copied into the root filesystem
* ``images/boot/``              GRUB configuration and the default config.json

:func:`build` turns the recipe into a raw GPT disk image with five
partitions (resin-boot, resin-rootA, resin-rootB, resin-state, resin-data)
without loop devices or mounts on the host: mmdebstrap installs the packages
into a directory (kept as a tarball, see below), ``customize.sh`` applies the
rest of the recipe to an unpacked copy, ``mkfs.ext4 -d`` and ``mkfs.vfat`` +
mtools build the filesystems as separate files and these are copied
(sparsely) into the disk image partitioned with ``sfdisk``.

Caches under ``<cache>`` (``$TESTBED_CACHE``, else ``~/.cache/testbed``):

* ``images/<hash>/``   finished images; the hash covers every file of the
  recipe, this module's source and the build options.
* ``base/<key>.tar``   the root filesystem right after package installation,
  keyed by the package list and how it is installed, reused for a week; a
  recipe tweak outside ``packages.txt`` only re-runs ``customize.sh``.
* ``apt-archives/``    downloaded .deb files, so a new base does not download
  again what an earlier one did.

Command line: ``python -m testbed.reference [--version X] [--cache-dir D]
[--force]`` prints progress and, last, the path of the image.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict

__all__ = [
    "BuildError",
    "BuildOptions",
    "IMAGE_NAME",
    "MissingToolError",
    "PARTITIONS",
    "Partition",
    "RECIPE_DIR",
    "build",
    "build_bundle",
    "check_host",
    "default_cache_dir",
    "image_hash",
    "main",
]

IMAGE_NAME = "testbed-ref-x86_64.img"
BUNDLE_NAME = "testbed-ref-x86_64.rootfs.ext4"
# The version of the update bundle built next to the default image.
BUNDLE_VERSION = "1.0.1"
BUNDLE_LABEL = "hostapp-bundle"
MANIFEST_NAME = "manifest.json"
BUILD_LOG_NAME = "build.log"
RECIPE_DIR = Path(__file__).resolve().parent.parent / "images"
# The benchmark's yardstick: a minimal Debian (minbase, systemd, udev, openssh-server) with the
# reference image's kernel, bootloader, firmware and layout. Its packages and hooks are its own;
# its boot files are the reference recipe's.
MINIMAL_RECIPE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "minimal-debian"
VARIANTS = {"reference": RECIPE_DIR, "minimal": MINIMAL_RECIPE_DIR}

SUITE = "bookworm"
ARCH = "amd64"
# The profile architecture (``arch:``) the default reference image boots on.
PROFILE_ARCH = "x86_64"
APT_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Not installed: documentation, manual pages and translations.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

# The packages are installed once per package list into a base tarball
# (<cache>/base/), reused by later builds for this long.
BASE_MAX_AGE = 7 * 24 * 3600
BASE_KEEP = 4

MIB = 1024 * 1024
SECTOR = 512
# Free space left in each root filesystem, relative to its content.
ROOT_HEADROOM = 0.30
# Filesystem metadata of a root filesystem (journal, inode tables, ...).
ROOT_METADATA = 48 * MIB

GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
GPT_LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

GPT_ROOT_AARCH64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"

GRUB_PLATFORM_DIR = Path("/usr/lib/grub/x86_64-efi")


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the reference image's architectures (the recipe is the same).

    ``grub_from_root``: GRUB's EFI modules come from the target's own root filesystem (Debian
    ships ``grub-efi-arm64-bin`` for arm64 only: it is installed into the arm64 root and its
    modules assembled by the host's ``grub-mkimage``). ``kernel_args``: the architecture's
    part of the kernel command line (the serial console and, on x86, the TSC as the clock).
    """

    profile_arch: str
    debian: str
    grub_target: str
    efi_loader: str
    root_type: str
    console_tty: str
    machine: str
    kernel_args: str
    grub_from_root: bool
    extra_packages: tuple[str, ...] = ()


ARCHES = {
    "x86_64": ArchSpec(
        profile_arch="x86_64",
        debian="amd64",
        grub_target="x86_64-efi",
        efi_loader="BOOTX64.EFI",
        root_type=GPT_ROOT_X86_64,
        console_tty="ttyS0",
        machine="qemux86-64",
        kernel_args="tsc=reliable clocksource=tsc mitigations=off console=ttyS0,115200",
        grub_from_root=False,
    ),
    "aarch64": ArchSpec(
        profile_arch="aarch64",
        debian="arm64",
        grub_target="arm64-efi",
        efi_loader="BOOTAA64.EFI",
        root_type=GPT_ROOT_AARCH64,
        console_tty="ttyAMA0",
        machine="generic-aarch64",
        kernel_args="mitigations=off console=ttyAMA0,115200",
        grub_from_root=True,
        extra_packages=("grub-efi-arm64-bin",),
    ),
}
# Names the command line accepts for --arch.
ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def image_name(arch: str = PROFILE_ARCH, table: str = "gpt") -> str:
    return f"testbed-ref-{arch}{'' if table == 'gpt' else '-' + table}.img"


def bundle_name(arch: str = PROFILE_ARCH) -> str:
    return f"testbed-ref-{arch}.rootfs.ext4"


# MBR partition types: FAT32 (LBA) for resin-boot, as a Raspberry Pi's firmware wants it; Linux.
MBR_FAT32 = "c"
MBR_LINUX = "83"
MBR_EXTENDED = "5"
GRUB_MODULES = (
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "search",
    "search_label",
    "search_fs_uuid",
    "search_fs_file",
    "loadenv",
    "normal",
    "linux",
    "configfile",
    "echo",
    "test",
    "serial",
    "terminal",
    "efi_gop",
    "boot",
    "ls",
    "cat",
    "reboot",
    "halt",
)
GRUBENV_DEFAULTS = (("resin_root_part", "A"), ("upgrade_available", "0"), ("bootcount", "0"))

_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}$")

Log = Callable[[str], object]


@dataclass(frozen=True)
class BuildOptions:
    """What varies between reference images built from the same recipe."""

    version: str = "1.0.0"
    arch: str = PROFILE_ARCH
    # "gpt", or "mbr": a Raspberry Pi's layout (resin-boot p1, the roots p2 and p3, an extended
    # container p4 holding resin-state p5 and resin-data p6).
    table: str = "gpt"
    # "reference", or "minimal": the benchmark's minimal Debian image (benchmarks/minimal-debian).
    variant: str = "reference"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown image variant {self.variant!r}: choose {' or '.join(VARIANTS)}")
        if self.table not in ("gpt", "mbr"):
            raise ValueError(f"unknown partition table {self.table!r}: choose gpt or mbr")
        if self.arch not in ARCHES:
            raise ValueError(f"unknown architecture {self.arch!r}: choose one of {', '.join(sorted(ARCH_NAMES))}")
        if not _VERSION_RE.match(self.version):
            raise ValueError(
                f"invalid version {self.version!r}: use letters, digits and . + ~ _ - "
                "(at most 64 characters, starting with a letter or digit)"
            )


@dataclass(frozen=True)
class Partition:
    """One partition of the reference image; ``size`` of None means computed."""

    label: str
    fstype: str
    type_guid: str
    size: int | None


class _LaidOut(TypedDict):
    """One partition as the image manifest records it (byte and sector offsets)."""

    number: int
    label: str
    fstype: str
    type: str
    start: int
    size: int
    start_sector: int
    size_sectors: int
    # The GPT partition UUID, known only once sfdisk has laid the table out.
    uuid: NotRequired[str | None]


def partitions(arch: str = PROFILE_ARCH) -> tuple[Partition, ...]:
    """The reference image's partitions; the roots carry the architecture's GPT root type."""
    root = ARCHES[arch].root_type
    return (
        Partition("resin-boot", "vfat", GPT_ESP, 40 * MIB),
        Partition("resin-rootA", "ext4", root, None),
        Partition("resin-rootB", "ext4", root, None),
        Partition("resin-state", "ext4", GPT_LINUX_DATA, 64 * MIB),
        Partition("resin-data", "ext4", GPT_LINUX_DATA, 1024 * MIB),
    )


PARTITIONS = partitions()

# Host tool -> Debian package that provides it.
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "chroot": "coreutils",
    "unshare": "util-linux",
    "tar": "tar",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "grub-mkimage": "grub-common",
    "grub-editenv": "grub-common",
    "openssl": "openssl",  # the CA certificates' hash links, made on the host (customize.sh)
}
_SBIN_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class BuildError(RuntimeError):
    """The reference image could not be built."""


class MissingToolError(BuildError):
    """A host tool needed for the build is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"missing host tool {tool!r}: install the Debian package {package!r} (apt-get install {package})"
        )
        self.tool = tool
        self.package = package


def default_cache_dir() -> Path:
    """``$TESTBED_CACHE`` or ``~/.cache/testbed``."""
    env = os.environ.get("TESTBED_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "testbed"


def recipe_dirs(options: BuildOptions) -> tuple[Path, Path]:
    """(the directory of packages.txt and hooks/, the directory of the boot files) of a build."""
    return VARIANTS[options.variant], RECIPE_DIR / "boot"


def image_hash(options: BuildOptions = BuildOptions(), recipe_dir: Path | None = None) -> str:
    """Hash naming the cache entry: recipe files, this module, the options."""
    recipe, boot = recipe_dirs(options)
    recipe = recipe_dir or recipe
    if not recipe.is_dir():
        raise BuildError(f"recipe directory {recipe} not found")
    digest = hashlib.sha256(b"testbed-ref image v1\0")
    # The reference recipe holds its boot files; another variant's hash takes them from it.
    files = [(path, path.relative_to(recipe)) for path in sorted(recipe.rglob("*"))]
    if not boot.is_relative_to(recipe):
        files += [(path, Path("boot") / path.relative_to(boot)) for path in sorted(boot.rglob("*"))]
    for path, rel in files:
        if "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        name = rel.as_posix().encode()
        if path.is_symlink():
            digest.update(b"L\0" + name + b"\0" + os.readlink(path).encode() + b"\0")
        elif path.is_file():
            executable = b"x" if os.access(path, os.X_OK) else b"-"
            data = path.read_bytes()
            digest.update(b"F\0" + name + b"\0" + executable + str(len(data)).encode() + b"\0")
            digest.update(data)
        elif path.is_dir():
            digest.update(b"D\0" + name + b"\0")
    digest.update(b"S\0" + Path(__file__).read_bytes())
    digest.update(b"O\0" + json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def check_arch(arch: str, profile_source: object) -> None:
    """A ConfigError unless the reference image runs on a device of architecture ``arch``."""
    from testbed.errors import ConfigError

    if arch not in ARCHES:
        raise ConfigError(
            f"{profile_source}: arch is {arch}, and testbed's reference image is built for "
            f"{', '.join(sorted(ARCHES))} only: give an image for {arch} with --image PATH"
        )


def build(
    options: BuildOptions = BuildOptions(),
    cache_dir: Path | None = None,
    log: Log = print,
    *,
    force: bool = False,
) -> Path:
    """Build (or find in the cache) the reference image; return its path.

    The image is ``<cache_dir>/images/<hash>/testbed-ref-x86_64.img`` with
    ``manifest.json`` and ``build.log`` beside it (the log of a failed build
    stays in ``<cache_dir>/images/<hash>.build.log``). A cached image is
    returned at once unless ``force`` is true. Concurrent builds (threads or
    processes) are serialised with a lock file in ``<cache_dir>/images``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache.absolute()
    digest = image_hash(options)
    images = cache / "images"
    final_dir = images / digest
    image = final_dir / image_name(options.arch, options.table)
    if image.is_file() and not force:
        return image

    check_host(options.arch)
    images.mkdir(parents=True, exist_ok=True)
    with _locked(images / ".lock", log):
        if image.is_file() and not force:
            log(f"reference image built meanwhile by another process: {image}")
            return image
        _remove_stale(images)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", suffix=".tmp", dir=images))
        # Outside the staging directory, so that it outlives a failed build.
        build_log = images / f"{digest}.{BUILD_LOG_NAME}"
        build_log.unlink(missing_ok=True)
        try:
            staging.chmod(0o755)
            _Builder(options, cache, staging, digest, log, build_log, force=force).run()
            os.replace(build_log, staging / BUILD_LOG_NAME)
            if final_dir.exists():
                old = images / f".{digest}.old.tmp"
                os.rename(final_dir, old)
                os.rename(staging, final_dir)
                _remove_tree(old)
            else:
                os.rename(staging, final_dir)
        finally:
            if staging.exists():
                _remove_tree(staging)
    log(f"reference image ready: {image}")
    return image


def build_bundle(
    options: BuildOptions = BuildOptions(version=BUNDLE_VERSION),
    cache_dir: Path | None = None,
    log: Log = print,
) -> Path:
    """Build (or find in the cache) a host OS update bundle; return its path.

    The bundle is the root filesystem (ext4) of the reference image built with ``options``
    (by default a newer version than the default image), the input of the image's
    ``hostapp-update -f``. It sits beside that image as ``testbed-ref-x86_64.rootfs.ext4``,
    sparse, read-only.
    """
    image = build(options, cache_dir=cache_dir, log=log)
    bundle = image.parent / bundle_name(options.arch)
    if bundle.is_file():
        return bundle
    manifest = json.loads((image.parent / MANIFEST_NAME).read_text())
    root = next(p for p in manifest["partitions"] if p["label"] == "resin-rootA")
    with _locked(image.parent.parent / ".lock", log):
        if bundle.is_file():
            return bundle
        partial = image.parent / f".{bundle.name}.tmp"
        with open(partial, "wb") as out:
            out.truncate(int(root["size"]))
            _sparse_region_copy(image, int(root["start"]), int(root["size"]), out.fileno())
        # Its own label: attached beside the disk it must not pass for a root partition.
        subprocess.run(
            [_which("tune2fs") or "tune2fs", "-L", BUNDLE_LABEL, str(partial)], check=True, capture_output=True
        )
        partial.chmod(0o444)
        os.replace(partial, bundle)
    log(f"update bundle ready: {bundle} (version {options.version})")
    return bundle


def _sparse_region_copy(src: Path, start: int, size: int, dst_fd: int) -> None:
    """Copy ``size`` bytes of ``src`` from ``start`` into ``dst_fd`` at 0, leaving holes."""
    with open(src, "rb") as handle:
        fd = handle.fileno()
        pos = start
        end = start + size
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            copied = 0
            while copied < hole - data:
                n = os.copy_file_range(fd, dst_fd, hole - data - copied, data + copied, data - start + copied)
                if n == 0:
                    raise BuildError(f"short copy from {src}")
                copied += n
            pos = hole


def check_host(arch: str = PROFILE_ARCH) -> None:
    """Raise :class:`BuildError` unless this host can build the image for ``arch``."""
    for tool, package in HOST_TOOLS.items():
        if _which(tool) is None:
            raise MissingToolError(tool, package)
    spec = ARCHES[arch]
    if not spec.grub_from_root and not (GRUB_PLATFORM_DIR / "linux.mod").is_file():
        raise MissingToolError(f"GRUB x86_64-efi modules ({GRUB_PLATFORM_DIR})", "grub-efi-amd64-bin")
    if spec.debian != _host_debian_arch():
        check_foreign(spec)
    if os.geteuid() != 0:
        raise BuildError(
            "building the reference image needs root (mmdebstrap root mode and root-owned files for mkfs.ext4 -d)"
        )


def _host_debian_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


def check_foreign(spec: ArchSpec) -> None:
    """A foreign root filesystem's package scripts run under qemu-user through binfmt_misc:
    mount it and register the interpreter (root only; the registration is the kernel's, for
    the host), or say how."""
    if _which("arch-test") is None:
        raise MissingToolError("arch-test", "arch-test")
    qemu = f"qemu-{spec.profile_arch}-static"
    if _which(qemu) is None:
        raise MissingToolError(qemu, "qemu-user-static")
    if not (BINFMT_DIR / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True)
    entry = BINFMT_DIR / f"qemu-{spec.profile_arch}"
    if not entry.exists():
        conf = Path(f"/usr/lib/binfmt.d/qemu-{spec.profile_arch}.conf")
        if not conf.is_file() or not (BINFMT_DIR / "register").exists():
            raise BuildError(
                f"building for {spec.debian} needs binfmt_misc with qemu-user-static: as root, "
                f"mount -t binfmt_misc binfmt_misc {BINFMT_DIR} and install qemu-user-static"
            )
        line = conf.read_text().strip().splitlines()[-1]
        # Debian's line names the binfmt wrapper of qemu-user-binfmt; the static emulator itself
        # serves as well (flag F: the kernel holds it open, so it works inside a chroot).
        fields = line.split(":")
        fields[-2] = str(_which(qemu))
        fields[-1] = "F"
        try:
            (BINFMT_DIR / "register").write_text(":".join(fields))
        except OSError as exc:
            raise BuildError(f"registering {qemu} with binfmt_misc failed ({exc}); run as root") from None
    done = subprocess.run(["arch-test", spec.debian], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"this host cannot run {spec.debian} binaries through qemu-user: {done.stdout.strip()}")


def _which(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    extra = [d for d in _SBIN_PATH if d not in path.split(os.pathsep)]
    return shutil.which(tool, path=os.pathsep.join([path, *extra]))


@contextlib.contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another reference image build ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(images: Path) -> None:
    """Drop temporary directories left by interrupted builds (lock held)."""
    for entry in images.glob(".*.tmp"):
        if entry.is_dir():
            _remove_tree(entry)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    mounts = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            target = line.split()[4].encode().decode("unicode_escape")
            if target.startswith(prefix):
                mounts.append(target)
    return mounts


def _remove_tree(path: Path) -> None:
    """rm -rf path, but never through a mount an interrupted mmdebstrap left."""
    for target in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], stderr=subprocess.DEVNULL, check=False)
    if _mounts_below(path):
        raise BuildError(f"{path} still has file systems mounted below it; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def _align(value: int, unit: int = MIB) -> int:
    return -(-value // unit) * unit


class _Runner:
    """Runs the build's commands with the build's PATH, each logged to build.log."""

    def __init__(self, build_log: Path, log: Log, tool_path: str) -> None:
        self.build_log = build_log
        self.log = log
        self.tool_path = tool_path

    def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        echo: Callable[[str], bool] | None = None,
    ) -> str:
        """Run argv, append its output to build.log and return it.

        Lines for which ``echo`` returns true are passed to ``log`` as they
        come. On failure the tail of the output is part of the exception.
        """
        full_env = dict(os.environ)
        full_env["PATH"] = self.tool_path
        full_env.setdefault("LC_ALL", "C.UTF-8")
        if env:
            full_env.update(env)
        with open(self.build_log, "a", encoding="utf-8") as blog:
            blog.write(f"\n$ {shlex.join(argv)}\n")
            blog.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                text=True,
                errors="replace",
            )
            if stdin is not None:
                assert proc.stdin is not None
                proc.stdin.write(stdin)
                proc.stdin.close()
            lines: list[str] = []
            assert proc.stdout is not None
            started = time.monotonic()
            try:
                for line in proc.stdout:
                    blog.write(f"[{time.monotonic() - started:6.1f}] {line}")
                    lines.append(line)
                    if echo is not None and echo(line):
                        self.log("  " + line.rstrip())
                code = proc.wait()
                blog.write(f"[{time.monotonic() - started:6.1f}] (exit {code})\n")
            except BaseException:
                # Interrupted: let the tool clean up (mmdebstrap unmounts
                # what it mounted in the chroot) before the tree is removed.
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        output = "".join(lines)
        if code != 0:
            tail = "".join(lines[-25:]).rstrip()
            raise BuildError(f"{Path(argv[0]).name} failed with exit code {code} (full log: {self.build_log}):\n{tail}")
        return output


class _DiskBuilder:
    """The image's filesystems and its partition table, from the customized root tree."""

    def __init__(
        self,
        run: Callable[..., str],
        log: Log,
        work: Path,
        staging: Path,
        rootfs: Path,
        recipe: Path,
        arch: str,
        table: str = "gpt",
    ):
        self.arch = arch
        self.table = table
        self.spec = ARCHES[arch]
        self.partitions = partitions(arch)
        self._run = run
        self.log = log
        self.work = work
        self.staging = staging
        self.rootfs = rootfs
        self.recipe = recipe

    def ext4(self, label: str, size: int, tree: Path | None, *, reserved: int | None = None) -> Path:
        out = self.work / f"{label}.ext4"
        with open(out, "wb") as handle:
            handle.truncate(size)
        argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "lazy_journal_init=1"]
        if reserved is not None:
            argv += ["-m", str(reserved)]
        if tree is not None:
            argv += ["-d", str(tree)]
        self.log(f"mkfs.ext4 {label} ({size // MIB} MiB)")
        self._run(argv + [str(out)])
        return out

    def state_tree(self) -> Path:
        """resin-state content: root-overlay/<path> for each path in /etc/state-binds."""
        tree = self.work / "state"
        overlay = tree / "root-overlay"
        overlay.mkdir(parents=True)
        listed = self.rootfs / "etc/state-binds"
        binds = listed.read_text().split() if listed.is_file() else []  # a minimal image has none
        for path in binds:
            if not path.startswith("/"):
                continue
            source = self.rootfs / path.lstrip("/")
            target = overlay / path.lstrip("/")
            if not source.exists():
                raise BuildError(f"{path} is listed in /etc/state-binds but missing from the root filesystem")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._run(["cp", "-a", str(source), str(target)])
        return tree

    def data_tree(self) -> Path:
        tree = self.work / "data"
        (tree / "containers").mkdir(parents=True)
        return tree

    def boot_filesystem(self) -> Path:
        """resin-boot: GRUB for EFI, its configuration and environment, config.json."""
        boot = self.recipe / "boot"
        grub = self.work / "grub"
        grub.mkdir()
        spec = self.spec
        efi = grub / spec.efi_loader
        self.log(f"grub-mkimage: EFI/BOOT/{spec.efi_loader} ({spec.grub_target})")
        # Debian ships arm64's GRUB modules for arm64 hosts only: they come from the target's root.
        platform = self.rootfs / "usr/lib/grub" / spec.grub_target if spec.grub_from_root else GRUB_PLATFORM_DIR
        if not (platform / "linux.mod").is_file():
            raise BuildError(f"GRUB {spec.grub_target} modules not found in {platform}")
        # The embedded configuration runs before GRUB's script parser is
        # loaded: plain commands only, no comments.
        early = grub / "early.cfg"
        early.write_text(
            "".join(
                line
                for line in (boot / "grub-early.cfg").read_text().splitlines(keepends=True)
                if line.strip() and not line.lstrip().startswith("#")
            )
        )
        self._run(
            [
                "grub-mkimage",
                "-O",
                spec.grub_target,
                "-d",
                str(platform),
                "-o",
                str(efi),
                "-p",
                "/EFI/BOOT",
                "-c",
                str(early),
                *GRUB_MODULES,
            ]
        )
        grubenv = grub / "grubenv"
        self._run(["grub-editenv", str(grubenv), "create"])
        self._run(["grub-editenv", str(grubenv), "set", *(f"{k}={v}" for k, v in GRUBENV_DEFAULTS)])

        out = self.work / "resin-boot.vfat"
        size = self.partitions[0].size
        assert size is not None
        # The kernel command line's architecture part: x86's is what the recipe's grub.cfg says.
        grub_cfg = grub / "grub.cfg"
        text = (boot / "grub.cfg").read_text()
        x86_args = ARCHES["x86_64"].kernel_args
        if x86_args not in text:
            raise BuildError(f"{boot / 'grub.cfg'}: the kernel command line no longer ends with {x86_args!r}")
        grub_cfg.write_text(text.replace(x86_args, spec.kernel_args))
        self._run(["mkfs.vfat", "-n", "resin-boot", "-C", str(out), str(size // 1024)])
        mtools = {"MTOOLS_SKIP_CHECK": "1"}
        image = f"{out}"
        self._run(["mmd", "-i", image, "::EFI", "::EFI/BOOT", "::system-connections"], env=mtools)
        for source, target in (
            (efi, f"::EFI/BOOT/{spec.efi_loader}"),
            (grub_cfg, "::EFI/BOOT/grub.cfg"),
            (grubenv, "::grubenv"),
            (boot / "config.json", "::config.json"),
        ):
            self._run(["mcopy", "-o", "-i", image, str(source), target], env=mtools)
        return out

    def assemble(self, sizes: dict[str, int], filesystems: dict[str, Path]) -> list[_LaidOut]:
        """Partition a sparse disk image and copy the filesystems into it."""
        image = self.staging / image_name(self.arch, self.table)
        if self.table == "mbr":
            return self._assemble_mbr(image, sizes, filesystems)
        start = MIB
        layout: list[_LaidOut] = []
        script = ["label: gpt", "unit: sectors", "first-lba: 2048", ""]
        for number, part in enumerate(self.partitions, 1):
            size = sizes[part.label]
            layout.append(
                {
                    "number": number,
                    "label": part.label,
                    "fstype": part.fstype,
                    "type": part.type_guid,
                    "start": start,
                    "size": size,
                    "start_sector": start // SECTOR,
                    "size_sectors": size // SECTOR,
                }
            )
            script.append(f'start={start // SECTOR}, size={size // SECTOR}, type={part.type_guid}, name="{part.label}"')
            start += size
        total = start + MIB  # room for the backup GPT
        with open(image, "wb") as handle:
            handle.truncate(total)
        self.log(f"sfdisk: GPT with {len(self.partitions)} partitions, {total // MIB} MiB image")
        self._run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)], stdin="\n".join(script) + "\n")
        table = json.loads(self._run(["sfdisk", "--json", str(image)]))["partitiontable"]["partitions"]
        for entry, row in zip(layout, table, strict=False):
            if row["start"] != entry["start_sector"] or row["size"] != entry["size_sectors"]:
                raise BuildError(f"sfdisk laid out {entry['label']} differently: {row}")
            entry["uuid"] = row.get("uuid")
        with open(image, "r+b") as dst:
            for entry in layout:
                src = filesystems[entry["label"]]
                _sparse_copy(src, dst.fileno(), entry["start"], entry["size"])
                src.unlink()
        return layout

    def _assemble_mbr(self, image: Path, sizes: dict[str, int], filesystems: dict[str, Path]) -> list[_LaidOut]:
        """A Raspberry Pi's MBR: resin-boot p1 (FAT32, bootable), resin-rootA p2, resin-rootB p3,
        an extended container p4, resin-state p5 and resin-data p6 (logical, each after its own
        extended boot record, 1 MiB apart)."""
        layout: list[_LaidOut] = []
        script = ["label: dos", "unit: sectors", ""]
        start = MIB
        primaries, logicals = self.partitions[:3], self.partitions[3:]
        for number, part in enumerate(primaries, 1):
            kind = MBR_FAT32 if part.fstype == "vfat" else MBR_LINUX
            layout.append(self._entry(number, part, kind, start, sizes[part.label]))
            boot = ", bootable" if number == 1 else ""
            script.append(f"start={start // SECTOR}, size={sizes[part.label] // SECTOR}, type={kind}{boot}")
            start += sizes[part.label]
        extended_start = start
        extended_size = sum(sizes[p.label] + MIB for p in logicals)
        script.append(f"start={extended_start // SECTOR}, size={extended_size // SECTOR}, type={MBR_EXTENDED}")
        start += MIB  # the first logical partition's extended boot record
        for number, part in enumerate(logicals, 5):
            layout.append(self._entry(number, part, MBR_LINUX, start, sizes[part.label]))
            script.append(f"start={start // SECTOR}, size={sizes[part.label] // SECTOR}, type={MBR_LINUX}")
            start += sizes[part.label] + MIB
        total = extended_start + extended_size
        with open(image, "wb") as handle:
            handle.truncate(total)
        self.log(f"sfdisk: MBR with {len(layout)} partitions (p4 extended), {total // MIB} MiB image")
        self._run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)], stdin="\n".join(script) + "\n")
        table = json.loads(self._run(["sfdisk", "--json", str(image)]))["partitiontable"]["partitions"]
        by_start = {row["start"]: row for row in table}
        for entry in layout:
            row = by_start.get(entry["start_sector"])
            if row is None or row["size"] != entry["size_sectors"] or not row["node"].endswith(str(entry["number"])):
                raise BuildError(f"sfdisk laid out {entry['label']} differently: {table}")
        with open(image, "r+b") as dst:
            for entry in layout:
                src = filesystems[entry["label"]]
                _sparse_copy(src, dst.fileno(), entry["start"], entry["size"])
                src.unlink()
        return layout

    @staticmethod
    def _entry(number: int, part: Partition, kind: str, start: int, size: int) -> _LaidOut:
        return {
            "number": number,
            "label": part.label,
            "fstype": part.fstype,
            "type": kind,
            "start": start,
            "size": size,
            "start_sector": start // SECTOR,
            "size_sectors": size // SECTOR,
        }


class _Builder:
    """One build, from the recipe to the image in ``staging``."""

    def __init__(
        self,
        options: BuildOptions,
        cache: Path,
        staging: Path,
        digest: str,
        log: Log,
        build_log: Path,
        *,
        force: bool = False,
    ):
        self.options = options
        self.force = force
        self.cache = cache
        self.staging = staging
        self.digest = digest
        self.log = log
        self.work = staging / "work"
        self.rootfs = self.work / "rootfs"
        self.apt_cache = cache / "apt-archives"
        self.build_log = build_log
        self.recipe, boot = recipe_dirs(options)
        tool_path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_PATH])
        self._run = _Runner(build_log, log, tool_path).run
        self.arch = options.arch
        self.spec = ARCHES[options.arch]
        self.disk = _DiskBuilder(
            self._run, log, self.work, staging, self.rootfs, boot.parent, options.arch, options.table
        )

    # -- steps ---------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        self.work.mkdir()
        self.log(f"building testbed reference OS {self.options.version} (recipe {self.recipe}, hash {self.digest})")
        base = self._base()
        self._customize(base)
        packages = self._installed_packages()
        self._prune_apt_cache(packages)
        kernel = self._kernel_version()

        disk = self.disk
        boot = disk.boot_filesystem()
        root_size = self._root_size()
        sizes = {p.label: (p.size if p.size is not None else root_size) for p in disk.partitions}
        filesystems = {
            "resin-boot": boot,
            "resin-rootA": disk.ext4("resin-rootA", sizes["resin-rootA"], self.rootfs, reserved=0),
            "resin-rootB": disk.ext4("resin-rootB", sizes["resin-rootB"], None, reserved=0),
            "resin-state": disk.ext4("resin-state", sizes["resin-state"], disk.state_tree()),
            "resin-data": disk.ext4("resin-data", sizes["resin-data"], disk.data_tree()),
        }
        layout = disk.assemble(sizes, filesystems)
        _remove_tree(self.work)

        seconds = round(time.monotonic() - started, 1)
        image = self.staging / image_name(self.arch, self.options.table)
        manifest = {
            "name": "testbed reference OS" if self.options.variant == "reference" else "minimal Debian",
            "image": image.name,
            "version": self.options.version,
            "options": dataclasses.asdict(self.options),
            "hash": self.digest,
            "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "build_seconds": seconds,
            "size": image.stat().st_size,
            "sector_size": SECTOR,
            "suite": SUITE,
            "architecture": self.spec.debian,
            "arch": self.arch,
            "kernel": kernel,
            "base": base.name,
            "partitions": layout,
            "packages": [{"name": n, "version": v} for n, v in sorted(packages.items())],
        }
        (self.staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        image.chmod(0o444)  # boot copy-on-write overlays of it, never the image
        self.log(f"built in {seconds} s")

    def _base_key(self) -> str:
        """Hash of what goes into the base tarball (not the rest of the recipe)."""
        digest = hashlib.sha256(b"testbed-ref base v1\0")
        for name in ("packages.txt", "hooks/essential.sh"):
            path = self.recipe / name
            digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
        digest.update(inspect.getsource(_Builder._bootstrap).encode())
        digest.update(
            json.dumps([SUITE, self.spec.debian, APT_SOURCES, DPKG_EXCLUDES, self.spec.extra_packages]).encode()
        )
        return digest.hexdigest()[:24]

    def _base(self) -> Path:
        """Tarball of the root filesystem with every package installed, cached."""
        bases = self.cache / "base"
        bases.mkdir(parents=True, exist_ok=True)
        tarball = bases / f"{self._base_key()}.tar"
        if tarball.is_file() and not self.force:
            age = time.time() - tarball.stat().st_mtime
            if age < BASE_MAX_AGE:
                self.log(f"packages: cached base {tarball} ({age / 3600:.1f} h old)")
                return tarball
        tree = self.work / "base"
        self._bootstrap(tree)
        self.log(f"packing {tarball.name}")
        partial = tarball.with_suffix(".tar.tmp")
        self._run(
            ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", str(partial), "."]
        )
        os.replace(partial, tarball)
        _remove_tree(tree)
        for old in sorted(bases.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)[BASE_KEEP:]:
            old.unlink(missing_ok=True)
        return tarball

    def _bootstrap(self, tree: Path) -> None:
        """mmdebstrap the package list into tree, through the .deb cache."""
        packages = [*_read_packages(self.recipe / "packages.txt", self.spec.debian), *self.spec.extra_packages]
        self.apt_cache.mkdir(parents=True, exist_ok=True)
        archives = '"$1"/var/cache/apt/archives'
        cache = shlex.quote(str(self.apt_cache))
        argv = [
            "mmdebstrap",
            "--mode=auto",
            "--variant=minbase",
            f"--architectures={self.spec.debian}",
            "--include=" + ",".join(packages),
            '--aptopt=Acquire::Retries "3"',
            # The build directory may sit in a home directory apt's sandbox
            # user cannot enter; download as root without warning about it.
            '--aptopt=APT::Sandbox::User "root"',
            *(f"--dpkgopt={rule}" for rule in DPKG_EXCLUDES),
            # A merged /usr from the start (mmdebstrap's own hook, as debootstrap does it): without
            # it apt satisfies init-system-helpers' "usrmerge | usr-is-merged" with usrmerge,
            # which brings perl (47 MB) and converts the tree in a perl script, under emulation
            # on a foreign-architecture build.
            *([f"--hook-dir={MERGED_USR_HOOKS}"] if MERGED_USR_HOOKS.is_dir() else []),
            # Keep downloaded packages: the cache is filled from and to them.
            "--skip=download/empty",
            "--skip=essential/unlink",
            f"--setup-hook=mkdir -p {archives} && "
            f"{{ cp -al {cache}/. {archives}/ 2>/dev/null || cp -a {cache}/. {archives}/; }}",
            *(
                [f'--essential-hook={shlex.quote(str(self.recipe / "hooks" / "essential.sh"))} "$1"']
                if (self.recipe / "hooks" / "essential.sh").is_file()
                else []
            ),
            f"--customize-hook=for deb in {archives}/*.deb; do "
            f'[ -e {cache}/"${{deb##*/}}" ] || cp -al "$deb" {cache}/ 2>/dev/null '
            f'|| cp -a "$deb" {cache}/; done',
            SUITE,
            str(tree),
            *APT_SOURCES,
        ]
        cached = len(list(self.apt_cache.glob("*.deb")))
        self.log(f"mmdebstrap: {SUITE} minbase + {len(packages)} packages ({cached} .deb files in {self.apt_cache})")
        started = time.monotonic()
        self._run(argv, echo=lambda line: line.startswith(("I: ", "W: ", "E: ")))
        self.log(f"mmdebstrap done in {time.monotonic() - started:.0f} s")

    def _customize(self, base: Path) -> None:
        """Unpack the base and apply the recipe (hooks/customize.sh) to it.

        customize.sh runs commands chrooted into the tree; they get a /proc
        of their own in a private mount and PID namespace, which vanishes
        with them: nothing is mounted on the host.
        """
        self.rootfs.mkdir()
        self._run(
            ["tar", "-C", str(self.rootfs), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base)]
        )
        null = self.rootfs / "dev/null"
        if not null.is_char_device():
            raise BuildError(f"{base} has no /dev/null device node")
        self.log("customize.sh: applying the recipe")
        self._run(
            [
                "unshare",
                "--mount",
                "--propagation=private",
                "--pid",
                "--fork",
                f"--mount-proc={self.rootfs / 'proc'}",
                "sh",
                str(self.recipe / "hooks" / "customize.sh"),
                str(self.rootfs),
            ],
            env={
                "TESTBED_RECIPE": str(self.recipe),
                "TESTBED_VERSION": self.options.version,
                "TESTBED_MACHINE": self.spec.machine,
                "TESTBED_CONSOLE": self.spec.console_tty,
            },
        )

    def _installed_packages(self) -> dict[str, str]:
        status = (self.rootfs / "var/lib/dpkg/status").read_text(errors="replace")
        packages: dict[str, str] = {}
        for stanza in status.split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" ")
            )
            if fields.get("Status", "").endswith(" installed") and "Package" in fields:
                packages[fields["Package"]] = fields.get("Version", "")
        return packages

    def _prune_apt_cache(self, packages: dict[str, str]) -> None:
        """Drop cached .deb files of packages this build installed in another version."""
        wanted = {f"{name}_{version.replace(':', '%3a')}_" for name, version in packages.items()}
        for deb in self.apt_cache.glob("*.deb"):
            name = deb.name.split("_", 1)[0]
            if name in packages and not any(deb.name.startswith(w) for w in wanted if w.startswith(name + "_")):
                deb.unlink(missing_ok=True)

    def _kernel_version(self) -> str:
        kernel = self.rootfs / "boot/vmlinuz"
        if not kernel.is_symlink() or not (self.rootfs / "boot/initrd.img").exists():
            raise BuildError("the root filesystem has no /boot/vmlinuz and /boot/initrd.img")
        return os.readlink(kernel).removeprefix("vmlinuz-")

    def _root_size(self) -> int:
        content = _tree_usage(self.rootfs)
        size = _align(int(content * (1 + ROOT_HEADROOM)) + ROOT_METADATA)
        self.log(f"root filesystem: {content / MIB:.0f} MiB of content, partitions of {size // MIB} MiB")
        return size


def _read_packages(path: Path, debian_arch: str = ARCH) -> list[str]:
    """The package list; ``@ARCH@`` stands for the Debian architecture (the kernel's flavour)."""
    packages = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().replace("@ARCH@", debian_arch)
        if line:
            packages.extend(line.split())
    if not packages:
        raise BuildError(f"no packages listed in {path}")
    return packages


def _tree_usage(root: Path) -> int:
    """Bytes allocated by the files under root (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total


def _sparse_copy(src: Path, dst_fd: int, offset: int, limit: int) -> None:
    """Copy the data regions of src into dst_fd at offset, leaving holes."""
    size = src.stat().st_size
    if size > limit:
        raise BuildError(f"{src.name} ({size} bytes) does not fit its partition ({limit} bytes)")
    with open(src, "rb") as handle:
        fd = handle.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            length = hole - data
            copied = 0
            while copied < length:
                n = os.copy_file_range(fd, dst_fd, length - copied, data + copied, offset + data + copied)
                if n == 0:
                    raise BuildError(f"short copy from {src}")
                copied += n
            pos = hole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.reference",
        description="Build the testbed reference OS disk image (cached) and print its path.",
    )
    parser.add_argument(
        "--version", default=None, help=f"OS version (default {BuildOptions.version}, {BUNDLE_VERSION} with --bundle)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache directory (default $TESTBED_CACHE or ~/.cache/testbed)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
    parser.add_argument(
        "--arch",
        default=PROFILE_ARCH,
        choices=sorted(ARCH_NAMES),
        help=f"the architecture to build for (default {PROFILE_ARCH}; arm64 through qemu-user-static)",
    )
    parser.add_argument(
        "--table",
        default="gpt",
        choices=["gpt", "mbr"],
        help="the partition table (mbr: a Raspberry Pi's, with resin-state and resin-data in an extended container)",
    )
    parser.add_argument(
        "--variant",
        default="reference",
        choices=sorted(VARIANTS),
        help="minimal: the benchmark's minimal Debian image (same kernel, bootloader and layout)",
    )
    parser.add_argument(
        "--bundle",
        action="store_true",
        help="build the update bundle (root filesystem) of that version instead, and print its path",
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        version = args.version or (BUNDLE_VERSION if args.bundle else BuildOptions.version)
        options = BuildOptions(version=version, arch=ARCH_NAMES[args.arch], table=args.table, variant=args.variant)
        if args.bundle:
            image = build_bundle(options, cache_dir=args.cache_dir, log=log)
        else:
            image = build(options, cache_dir=args.cache_dir, log=log, force=args.force)
    except (BuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(image, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
