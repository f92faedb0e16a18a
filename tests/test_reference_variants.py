"""The benchmark's minimal Debian image is a variant of the reference builder: its own packages
and hooks, the reference recipe's boot files, a cache entry of its own."""

from __future__ import annotations

import pytest

from testbed import reference


def test_the_minimal_variant_has_its_own_cache_entry() -> None:
    ref = reference.image_hash(reference.BuildOptions())
    minimal = reference.image_hash(reference.BuildOptions(variant="minimal"))
    assert ref != minimal
    assert reference.image_hash(reference.BuildOptions(variant="minimal")) == minimal  # stable


def test_the_minimal_variant_takes_the_reference_boot_files() -> None:
    packages_dir, boot_dir = reference.recipe_dirs(reference.BuildOptions(variant="minimal"))
    assert packages_dir == reference.MINIMAL_RECIPE_DIR
    assert boot_dir == reference.RECIPE_DIR / "boot"
    assert (boot_dir / "grub.cfg").is_file()


def test_the_minimal_variant_installs_what_a_debian_needs_to_boot_to_sshd_and_nothing_else() -> None:
    packages = reference._read_packages(reference.MINIMAL_RECIPE_DIR / "packages.txt", "amd64")
    assert sorted(packages) == sorted(
        ["systemd", "systemd-sysv", "udev", "openssh-server", "linux-image-cloud-amd64", "initramfs-tools"]
    )
    # The same kernel package as the reference image.
    assert "linux-image-cloud-amd64" in reference._read_packages(reference.RECIPE_DIR / "packages.txt", "amd64")


def test_an_unknown_variant_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown image variant 'tiny': choose reference or minimal"):
        reference.BuildOptions(variant="tiny")
