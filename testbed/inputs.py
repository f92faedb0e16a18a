"""What a run is given: the device profile and the image, resolved once with the user's errors named.

Used by the pytest plugin and by the desk commands (``python -m testbed console``), so that
both refuse the same bad input with the same line. A ConfigError here is the user's to fix.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.profile import Profile, apply_board_overrides, load_profile

DEFAULT_DEVICE = "qemu-x86_64"
Say = Callable[[str], None]


@dataclass
class ImageInput:
    """The image a run boots: ``path`` (a raw image or a qcow2 testbed can boot), its ``format``,
    and what the user gave (``given``: the file named on the command line, possibly compressed)."""

    path: Path
    format: str
    given: Path


def resolve_profile(device: str | None, **board_ports: Any) -> Profile:
    """The profile named (or at the path given), with a board's ports from the command line
    (``board_ports``: those of ``apply_board_overrides``)."""
    return apply_board_overrides(load_profile(device or DEFAULT_DEVICE), **board_ports)


def _progress_printer(say: Say) -> Callable[[int, int], None] | None:
    """Unpacking progress on a terminal (one line, rewritten); nothing when not on one."""
    if not sys.stderr.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        percent = done * 100 // total if total else -1
        if percent != last[0]:
            last[0] = percent
            what = f"{percent}%" if total else f"{done >> 20} MiB"
            sys.stderr.write(f"\rtestbed: unpacking {what}   ")
            sys.stderr.flush()

    return show


def resolve_image(option: str | None, profile: Profile, say: Say) -> ImageInput:
    """``--image`` (raw, qcow2, or compressed: unpacked once into the cache), else the reference
    image for the profile's architecture, built on demand."""
    from testbed import image as img

    if option:
        try:
            given = Path(option).expanduser().resolve()
        except (OSError, RuntimeError) as exc:  # a loop of symbolic links
            raise ConfigError(
                f"cannot read image {option}: {getattr(exc, 'strerror', None) or exc} — check the path given to --image"
            ) from None
        _check_file_kind(given)
        from testbed import unpack

        if unpack.is_compressed(given):
            say(f"unpacking {given} into the cache (once per file)")
            path = unpack.local_image(given, progress=_progress_printer(say))
            if sys.stderr.isatty():
                sys.stderr.write("\n")
        else:
            path = given
        return ImageInput(path, img.image_format(path), given)
    from testbed import reference

    reference.check_arch(profile.arch, profile.source)
    say(f"building the {profile.arch} reference image (cached after the first build)")
    table = "mbr" if profile.layout.table == "dos" else "gpt"
    path = reference.build(reference.BuildOptions(arch=profile.arch, table=table), log=say)
    return ImageInput(path, "raw", path)


def _check_file_kind(path: Path) -> None:
    """ConfigError for an ``--image`` that is neither a file nor a block device (a FIFO would
    block the first read for ever; a socket or a terminal is no disk)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing, a loop of links, unreadable: the image reader says which
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode)):
        raise ConfigError(f"{path} is not a disk image file (a pipe, socket or character device): pass --image FILE")


def check_image(image: ImageInput, profile: Profile) -> None:
    """Before anything boots: the image can be read as a disk and has the partition testbed
    writes config.json into (the profile's first, the boot partition) with a readable
    config.json. Every message names the file the user gave (not an unpacked copy).

    Other differences from the profile's layout (a root or data label renamed, sizes) are the
    layout suite's verdicts, not bad input: an image may fail them.
    """
    from testbed import image as img

    boot = profile.layout.partitions[0].label
    expected = ", ".join(repr(p.label) for p in profile.layout.partitions)
    try:
        layout = img.read_layout(image.path)
        if boot not in layout.labels() and [lbl.casefold() for lbl in layout.labels()].count(boot.casefold()) != 1:
            found = ", ".join(repr(lbl) for lbl in layout.labels()) or "none"
            raise ConfigError(
                f"{image.path}: no partition labelled {boot!r}, the boot partition of device {profile.name} "
                f"(labels found: {found}; {profile.source} expects {expected}): pass the image built for this "
                "device, or pick its profile with --device"
            )
        img.read_config_json(image.path, boot)
        from testbed.inspect import check_loader_arch

        check_loader_arch(image.path, profile)
    except ConfigError as exc:
        text = str(exc)
        if image.path != image.given:
            text = text.replace(str(image.path), f"{image.given} (unpacked)")
        raise ConfigError(text) from None


def check_host(profile: Profile) -> None:
    """What the profile's machine needs on this host (emulator, firmware, serial port, relay
    package), before anything starts; ConfigError naming the key or option and the fix."""
    from testbed.machines import check_host as machine_check

    machine_check(profile)
