#!/bin/sh
# testbed reference OS: mmdebstrap essential hook ($1 = root directory).
# Packages would otherwise build the initramfs twice (kernel postinst, then
# the initramfs-tools trigger) before our configuration is in place; divert
# update-initramfs to a no-op until customize.sh builds it once. The base
# tarball keeps the diversion.
set -eu
root="$1"
chroot "${root}" dpkg-divert --quiet --local --rename \
	--divert /usr/sbin/update-initramfs.testbed --add /usr/sbin/update-initramfs
ln -sf /bin/true "${root}/usr/sbin/update-initramfs"
