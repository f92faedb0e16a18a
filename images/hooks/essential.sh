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
# openssh-server's postinst generates host keys unless they exist, which takes most of a minute
# under an emulated CPU (an arm64 build); customize.sh deletes these placeholders, and the
# device makes its keys on first boot.
mkdir -p "${root}/etc/ssh"
for key in rsa ecdsa ed25519; do
	: >"${root}/etc/ssh/ssh_host_${key}_key"
done
# ca-certificates' postinst and its trigger each run update-ca-certificates, a shell loop of
# three processes per certificate: over a minute under an emulated CPU. Its result does not
# depend on the architecture; customize.sh runs it once, natively, into the root.
chroot "${root}" dpkg-divert --quiet --local --rename \
	--divert /usr/sbin/update-ca-certificates.testbed --add /usr/sbin/update-ca-certificates
ln -sf /bin/true "${root}/usr/sbin/update-ca-certificates"
