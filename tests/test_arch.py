"""An image for another architecture than the profile's is refused offline: one line, exit 4, before
any boot. What decides is the EFI loader in the boot partition: its name (BOOTX64.EFI, BOOTAA64.EFI)
and its PE header's machine field, which has the last word when the name fits."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.inspect import check_loader_arch
from testbed.profile import load_profile
from tests.conftest import require_tools

PE_MACHINE = {"x86_64": 0x8664, "aarch64": 0xAA64}


def _pe(arch: str) -> bytes:
    """The start of a PE/COFF executable (an EFI application) for ``arch``."""
    head = bytearray(512)
    head[0:2] = b"MZ"
    head[0x3C:0x40] = struct.pack("<I", 0x80)
    head[0x80:0x86] = b"PE\0\0" + struct.pack("<H", PE_MACHINE[arch])
    return bytes(head)


def efi_image(tmp: Path, loader: str, machine: str) -> Path:
    """A GPT disk with a FAT resin-boot holding config.json and EFI/BOOT/``loader`` built for ``machine``."""
    require_tools("sfdisk", "mkfs.vfat", "mcopy", "mmd")
    image = tmp / f"{loader}-{machine}.img"
    subprocess.run(["truncate", "-s", "48M", str(image)], check=True)
    subprocess.run(
        ["sfdisk", "-q", str(image)],
        input="label: gpt\nstart=2048, size=65536, type=uefi, name=resin-boot\nsize=16384, name=resin-rootA\n",
        text=True,
        check=True,
    )
    offset = 2048 * 512
    subprocess.run(
        ["mkfs.vfat", "-n", "resin-boot", "--offset", "2048", str(image), "32768"], check=True, capture_output=True
    )
    (tmp / "config.json").write_text(json.dumps({"hostname": "arch-test"}))
    (tmp / "loader.efi").write_bytes(_pe(machine))
    target = f"{image}@@{offset}"
    subprocess.run(["mmd", "-i", target, "::EFI", "::EFI/BOOT"], check=True)
    subprocess.run(["mcopy", "-i", target, str(tmp / "config.json"), "::config.json"], check=True)
    subprocess.run(["mcopy", "-i", target, str(tmp / "loader.efi"), f"::EFI/BOOT/{loader}"], check=True)
    return image


@pytest.mark.parametrize(
    ("device", "loader", "machine", "found"),
    [
        ("qemu-x86_64", "BOOTAA64.EFI", "aarch64", "aarch64"),
        ("qemu-aarch64", "BOOTX64.EFI", "x86_64", "x86_64"),
        # The name says x86_64, the PE header says aarch64: the header is believed.
        ("qemu-x86_64", "BOOTX64.EFI", "aarch64", "aarch64"),
    ],
)
def test_an_image_for_another_architecture_is_refused(
    device: str, loader: str, machine: str, found: str, tmp_path: Path
) -> None:
    image = efi_image(tmp_path, loader, machine)
    profile = load_profile(device)
    with pytest.raises(ConfigError) as err:
        check_loader_arch(image, profile)
    text = str(err.value)
    assert "\n" not in text and f"is for {found}" in text and f"device {device}" in text and str(image) in text


@pytest.mark.parametrize(
    ("device", "loader", "machine"),
    [("qemu-x86_64", "BOOTX64.EFI", "x86_64"), ("qemu-aarch64", "BOOTAA64.EFI", "aarch64")],
)
def test_an_image_for_the_profiles_architecture_passes(device: str, loader: str, machine: str, tmp_path: Path) -> None:
    check_loader_arch(efi_image(tmp_path, loader, machine), load_profile(device))


def test_the_run_refuses_it_before_any_boot_in_one_line(tmp_path: Path) -> None:
    require_tools("qemu-system-aarch64")
    image = efi_image(tmp_path, "BOOTX64.EFI", "x86_64")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites/smoke", "--device", "qemu-aarch64", "--image", str(image), "-q"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "is for x86_64, and device qemu-aarch64" in errors[0]
    assert "power on" not in proc.stdout


@pytest.mark.parametrize(
    ("device", "arch", "table"),
    [
        ("qemu-x86_64", "x86_64", "gpt"),
        ("qemu-aarch64", "aarch64", "gpt"),
        ("qemu-x86_64-mbr", "x86_64", "mbr"),
        ("qemu-aarch64-mbr", "aarch64", "mbr"),
    ],
)
def test_without_image_the_reference_image_of_the_profiles_arch_and_table_is_used(
    device: str, arch: str, table: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without --image a profile gets the reference image built for its architecture and its
    partition table, never the x86_64 GPT one by default."""
    from testbed import inputs, reference

    asked: list[reference.BuildOptions] = []

    def build(options: reference.BuildOptions, **_: object) -> Path:
        asked.append(options)
        return tmp_path / reference.image_name(options.arch, options.table)

    monkeypatch.setattr(reference, "build", build)
    profile = load_profile(device)
    image = inputs.resolve_image(None, profile, lambda _line: None)
    assert asked == [reference.BuildOptions(arch=arch, table=table)]
    assert image.path.name == reference.image_name(arch, table)


def test_an_architecture_without_a_reference_image_names_the_profile_and_the_fix() -> None:
    from testbed import reference

    with pytest.raises(ConfigError) as err:
        reference.check_arch("riscv64", "profiles/board.yaml")
    assert str(err.value).startswith("profiles/board.yaml: arch is riscv64")
    assert "--image" in str(err.value)
