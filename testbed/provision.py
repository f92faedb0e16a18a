"""The device's disk before its first power on: the overlay, with the effective config.json and boot files.

The user's image is never written: the machine's ``prepare()`` makes a qcow2 overlay over it,
and config.json and the boot partition's extra files are written into that overlay.
"""

from __future__ import annotations

from typing import Any

import paramiko

from testbed import image as img
from testbed.machines.base import Machine
from testbed.profile import Profile


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested objects are merged, ``None`` removes a key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def provision(
    machine: Machine,
    profile: Profile,
    key: paramiko.PKey,
    overrides: dict[str, Any],
    boot_files: dict[str, bytes],
) -> dict[str, Any]:
    """Prepare the machine's overlay and write the effective config.json (and ``boot_files``)
    into its boot partition; return that config.json.

    testbed's public key is always added to ``os.sshKeys``: a production image lets in only
    the keys its config.json lists.
    """
    machine.prepare()
    boot_label = profile.layout.partitions[0].label
    config = merge(img.read_config_json(machine.overlay, boot_label), overrides)
    public = f"{key.get_name()} {key.get_base64()} testbed"
    os_section = config.setdefault("os", {})
    keys = list(os_section.get("sshKeys") or [])
    if public not in keys:
        keys.append(public)
    os_section["sshKeys"] = keys
    img.write_config_json(machine.overlay, config, boot_label)
    if boot_files:
        layout = img.read_layout(machine.overlay)
        img.write_files_to_fat_in_overlay(machine.overlay, layout.by_label(boot_label), boot_files)
    return config
