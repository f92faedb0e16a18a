"""Layout: the partition table, the five labels in order, filesystems, sizes, config.json.

Checked offline on the image file first (fast, no boot: the first thing a broken image
fails), then on the running device. Expectations come from the device profile.
"""

from __future__ import annotations

import json

import pytest

from testbed import image as img
from testbed.dut import DUT
from testbed.errors import ConfigError
from testbed.plugin import ImageUnderTest, OfflineEvidence
from testbed.profile import Profile

# The same in every mode: a certification runs these once (testbed.plan) and its other modes inherit them.
pytestmark = pytest.mark.mode_independent

MIB = 1 << 20


@pytest.fixture(scope="module")
def layout(image_under_test: ImageUnderTest) -> img.DiskLayout:
    return img.read_layout(image_under_test.path)


def _part(layout: img.DiskLayout, label: str) -> img.Partition:
    """The partition labelled ``label``; its absence is the image's defect, so a test failure."""
    try:
        return layout.by_label(label)
    except img.MissingPartitionError as exc:
        pytest.fail(str(exc), pytrace=False)


def _table(layout: img.DiskLayout) -> str:
    return "\n".join(
        f"{p.index}: name={p.name!r} label={p.label!r} fstype={p.fstype} size={p.size // MIB} MiB"
        for p in layout.partitions
    )


def test_partition_table_type(
    layout: img.DiskLayout, device_profile: Profile, offline_evidence: OfflineEvidence
) -> None:
    offline_evidence("read the partition table of the image", f"table={layout.table}\n{_table(layout)}")
    assert layout.table == device_profile.layout.table, (
        f"expected a {device_profile.layout.table} partition table, found {layout.table}"
    )


def test_labels_in_order(layout: img.DiskLayout, device_profile: Profile, offline_evidence: OfflineEvidence) -> None:
    offline_evidence("read filesystem labels from the image", _table(layout))
    expected = [p.label for p in device_profile.layout.partitions]
    found = [p.label for p in layout.partitions]
    assert found == expected, f"expected partitions labelled {expected} in this order, found {found}"


def test_partition_numbers(layout: img.DiskLayout, device_profile: Profile, offline_evidence: OfflineEvidence) -> None:
    """Each label at the number the profile gives it: on an MBR (a Raspberry Pi's layout) this is
    what says resin-state and resin-data are logical partitions in the extended container, p5
    and p6, not primaries, and that the roots are p2 and p3 as the bootloader expects."""
    numbered = [spec for spec in device_profile.layout.partitions if spec.number is not None]
    if not numbered:
        pytest.skip(f"{device_profile.source} gives no partition numbers (layout.partitions[].number)")
    offline_evidence("read partition numbers from the image", _table(layout))
    wrong = []
    for spec in numbered:
        try:
            part = layout.by_label(spec.label)
        except img.MissingPartitionError:
            wrong.append(f"{spec.label} is missing, expected as partition {spec.number}")
            continue
        if part.index != spec.number:
            kind = ""
            if layout.table == "dos":
                kind = " (a logical partition)" if part.index >= 5 else " (a primary partition)"
            wrong.append(f"{spec.label} is partition {part.index}{kind}, expected {spec.number}")
    assert not wrong, "; ".join(wrong)


def test_filesystem_types(layout: img.DiskLayout, device_profile: Profile, offline_evidence: OfflineEvidence) -> None:
    offline_evidence("read filesystem superblocks from the image", _table(layout))
    wrong = []
    for spec in device_profile.layout.partitions:
        part = _part(layout, spec.label)
        if part.fstype != spec.fstype:
            wrong.append(f"{spec.label}: expected {spec.fstype}, found {part.fstype}")
    assert not wrong, "; ".join(wrong)


def test_sizes_within_profile_bounds(
    layout: img.DiskLayout, device_profile: Profile, offline_evidence: OfflineEvidence
) -> None:
    offline_evidence("read partition sizes from the image", _table(layout))
    wrong = []
    for spec in device_profile.layout.partitions:
        size = _part(layout, spec.label).size / MIB
        if not spec.min_mib <= size <= spec.max_mib:
            wrong.append(f"{spec.label}: {size:.0f} MiB, expected {spec.min_mib}..{spec.max_mib} MiB")
    assert not wrong, "; ".join(wrong)


def test_config_json_on_boot_partition_is_valid(
    image_under_test: ImageUnderTest, device_profile: Profile, offline_evidence: OfflineEvidence
) -> None:
    boot_label = device_profile.layout.partitions[0].label
    try:
        config = img.read_config_json(image_under_test.path, boot_label)
    except ConfigError as exc:  # missing or invalid: the image's defect
        offline_evidence(f"read /config.json from {boot_label} in the image", str(exc), ok=False)
        pytest.fail(str(exc), pytrace=False)
    offline_evidence(f"read /config.json from {boot_label} in the image", json.dumps(config, indent=2))
    assert isinstance(config, dict), f"config.json on {boot_label} must be a JSON object, found {type(config).__name__}"


def test_labels_on_the_running_device(dut: DUT, device_profile: Profile) -> None:
    expected = [p.label for p in device_profile.layout.partitions]
    found = dut.run("ls -1 /dev/disk/by-label/", check=True).stdout.split()
    missing = [label for label in expected if label not in found]
    assert not missing, f"expected {expected} under /dev/disk/by-label, missing {missing}; found {found}"


@pytest.mark.parametrize(
    ("mountpoint", "index"), [("/mnt/boot", 0), ("/mnt/state", 3), ("/mnt/data", 4)], ids=["boot", "state", "data"]
)
def test_mounts_come_from_their_labelled_partitions(
    dut: DUT, device_profile: Profile, mountpoint: str, index: int
) -> None:
    label = device_profile.layout.partitions[index].label
    source = dut.run(f"findmnt -c -n -o SOURCE {mountpoint}").stdout.strip()
    expected = dut.run(f"readlink -f /dev/disk/by-label/{label}").stdout.strip()
    assert source and source == expected, (
        f"expected {mountpoint} mounted from {label} ({expected or 'not found'}), "
        f"`findmnt -c -n -o SOURCE {mountpoint}` says {source or 'not mounted'}"
    )
