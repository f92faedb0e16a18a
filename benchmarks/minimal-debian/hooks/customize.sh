#!/bin/sh
# The benchmark's minimal Debian image: stock packages, stock configuration, except what the
# benchmark needs to reach it as it reaches the reference image in development mode (root
# without a password over SSH on port 22222) and the kernel where the shared GRUB
# configuration looks for it, and a network: DHCP on the NIC by systemd-networkd, which the
# systemd package ships (a minbase system configures no network). $1 is the root filesystem, unpacked from its base.
set -eu
root="$1"
mkdir -p "${root}/etc/ssh/sshd_config.d"
cat > "${root}/etc/ssh/sshd_config.d/bench.conf" <<'SSHD'
Port 22222
PermitRootLogin yes
PasswordAuthentication yes
PermitEmptyPasswords yes
SSHD
mkdir -p "${root}/etc/systemd/network"
cat > "${root}/etc/systemd/network/80-dhcp.network" <<'NETWORK'
[Match]
Type=ether

[Network]
DHCP=ipv4
NETWORK
chroot "${root}" systemctl --quiet enable systemd-networkd.service
sed -i 's/^root:[^:]*:/root::/' "${root}/etc/shadow"
kver="$(basename "$(ls -d "${root}"/usr/lib/modules/* | sort -V | tail -n 1)")"
[ -f "${root}/boot/initrd.img-${kver}" ] || { echo "customize.sh: no initramfs for ${kver}" >&2; exit 1; }
ln -sfn "vmlinuz-${kver}" "${root}/boot/vmlinuz"
ln -sfn "initrd.img-${kver}" "${root}/boot/initrd.img"
