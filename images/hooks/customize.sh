#!/bin/sh
# testbed reference OS: turn the root filesystem with every package
# installed ($1, unpacked from the cached base) into the OS. Run as root by
# testbed/reference.py with a private /proc mounted in $1/proc.
# Environment from testbed/reference.py:
#   TESTBED_RECIPE   this directory's parent (the images/ recipe)
#   TESTBED_VERSION  OS version for /etc/os-release
#   TESTBED_MACHINE  the device type (os-release MACHINE and SLUG): qemux86-64, generic-aarch64
#   TESTBED_CONSOLE  the serial console's tty: ttyS0 (x86), ttyAMA0 (arm64 virt)
set -eu
root="$1"
recipe="${TESTBED_RECIPE:?}"
version="${TESTBED_VERSION:?}"
machine="${TESTBED_MACHINE:-qemux86-64}"
console="${TESTBED_CONSOLE:-ttyS0}"

in_root() {
	chroot "${root}" "$@"
}

# --- files of the recipe --------------------------------------------------
# Owned by root, never group/world writable; existing directories keep their
# ownership and mode.
tar -C "${recipe}/rootfs" --owner=0 --group=0 --numeric-owner --mode=go-w -cf - . |
	tar -C "${root}" -xf - --no-overwrite-dir
# The recipe's units name the x86 serial console; another architecture's is another tty.
if [ "${console}" != ttyS0 ]; then
	sed -i "s/ttyS0/${console}/g" \
		"${root}"/etc/systemd/system/development-mode.target \
		"${root}"/etc/systemd/system/config-json.service \
		"${root}"/etc/systemd/system/systemd-udev-trigger.service.d/testbed.conf
fi
chmod 755 "${root}"/usr/libexec/testbed/* "${root}"/usr/sbin/hostapp-update \
	"${root}"/usr/lib/hostapp-update/hooks.d/* \
	"${root}"/etc/initramfs-tools/hooks/testbed \
	"${root}"/etc/initramfs-tools/scripts/init-bottom/testbed-state

cat > "${root}/usr/lib/os-release" <<OSRELEASE
NAME="testbed reference OS"
ID=testbed-ref
ID_LIKE=debian
VERSION="${version}"
VERSION_ID="${version}"
PRETTY_NAME="testbed reference OS ${version}"
MACHINE="${machine}"
SLUG="${machine}"
OSRELEASE
ln -sfn ../usr/lib/os-release "${root}/etc/os-release"

# --- identity and accounts ------------------------------------------------
# machine-id is created on first boot on resin-state (the empty file does
# not count as "first boot" for systemd); dbus reads it through the link.
: > "${root}/etc/machine-id"
ln -sfn /etc/machine-id "${root}/var/lib/dbus/machine-id"
# root has an empty password; only development mode lets anything use it.
sed -i 's/^root:[^:]*:/root::/' "${root}/etc/shadow"
# The host key is generated on first boot into /etc/ssh/hostkeys.
rm -f "${root}"/etc/ssh/ssh_host_*
mkdir -p "${root}/etc/ssh/hostkeys"
# Directories that services expect but cannot create on a read-only root.
mkdir -p "${root}/var/lib/cni/networks"

# --- mount points ---------------------------------------------------------
# Every mount point in fstab must exist: the root filesystem is read-only.
awk '$1 !~ /^#/ && $2 ~ /^\// { print $2 }' "${root}/etc/fstab" |
	while read -r dir; do mkdir -p "${root}${dir}"; done
# The A/B roots, mounted by the initramfs.
mkdir -p "${root}/mnt/sysroot/active" "${root}/mnt/sysroot/inactive"

# --- systemd units --------------------------------------------------------
set --
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer remote-fs.target \
	podman.service podman.socket podman-restart.service \
	podman-auto-update.service podman-auto-update.timer \
	NetworkManager-wait-online.service systemd-pstore.service \
	avahi-daemon.service avahi-daemon.socket getty@tty1.service; do
	if [ -e "${root}/usr/lib/systemd/system/${unit}" ] ||
		[ -e "${root}/usr/lib/systemd/system/${unit%%@*}@.service" ]; then
		set -- "$@" "${unit}"
	fi
done
# One systemctl for all of them: each start of it costs seconds under an emulated CPU.
[ "$#" -eq 0 ] || in_root systemctl --quiet disable "$@"
in_root systemctl --quiet enable config-json.service ssh-hostkeys.service \
	dnsmasq.service NetworkManager.service ssh.service chrony.service \
	rollback-altboot.service rollback-health.service
# Not needed, and every unit costs boot time on an emulated CPU.
for unit in dev-hugepages.mount dev-mqueue.mount sys-fs-fuse-connections.mount \
	sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
	proc-sys-fs-binfmt_misc.automount systemd-binfmt.service \
	kmod-static-nodes.service modprobe@.service systemd-remount-fs.service \
	systemd-update-utmp.service systemd-update-utmp-runlevel.service \
	systemd-hostnamed.service systemd-logind.service \
	NetworkManager-dispatcher.service; do
	ln -sfn /dev/null "${root}/etc/systemd/system/${unit}"
done
# No logind: logins need no session tracking here (see pam_systemd below).
# No NetworkManager dispatcher: its scripts (ifupdown's run-parts, chrony's
# on/offline and DHCP NTP servers) ran at every link event for about 5 s of
# CPU per boot; NTP servers come from config.json only.
rm -f "${root}/etc/systemd/system/dbus-org.freedesktop.nm-dispatcher.service" \
	"${root}/etc/NetworkManager/dispatcher.d/01-ifupdown" \
	"${root}"/usr/lib/NetworkManager/dispatcher.d/20-chrony-*
# Only the fstab and debug generators run. In particular gettys run only in
# development mode (development-mode.target), never generated ones.
mkdir -p "${root}/etc/systemd/system-generators"
for generator in "${root}"/usr/lib/systemd/system-generators/*; do
	name="${generator##*/}"
	case "${name}" in
	systemd-fstab-generator | systemd-debug-generator) ;;
	*) ln -sfn /dev/null "${root}/etc/systemd/system-generators/${name}" ;;
	esac
done
# No per-user systemd instance for logins (it costs seconds per session).
sed -i '/pam_systemd\.so/d' "${root}"/etc/pam.d/common-session*

# --- kernel and initramfs -------------------------------------------------
kver="$(basename "$(ls -d "${root}"/usr/lib/modules/* | sort -V | tail -n 1)")"
rm -f "${root}/usr/sbin/update-initramfs"
in_root dpkg-divert --quiet --local --rename \
	--divert /usr/sbin/update-initramfs.testbed --remove /usr/sbin/update-initramfs
in_root update-initramfs -c -k "${kver}"
ln -sfn "vmlinuz-${kver}" "${root}/boot/vmlinuz"
ln -sfn "initrd.img-${kver}" "${root}/boot/initrd.img"
rm -f "${root}"/vmlinuz "${root}"/vmlinuz.old "${root}"/initrd.img "${root}"/initrd.img.old

# --- CA certificates ------------------------------------------------------
# essential.sh diverted update-ca-certificates while packages installed. The root's own script
# (a shell script, the same on every architecture) runs once on the host's shell and openssl
# into the root; the links it makes carry the root's path, which is taken off them.
rm -f "${root}/usr/sbin/update-ca-certificates"
in_root dpkg-divert --quiet --local --rename \
	--divert /usr/sbin/update-ca-certificates.testbed --remove /usr/sbin/update-ca-certificates
if [ -n "$(ls -A "${root}/etc/ca-certificates/update.d" 2>/dev/null)" ]; then
	in_root update-ca-certificates >/dev/null # hooks are the root's programs: run them there
else
	sh "${root}/usr/sbin/update-ca-certificates" --sysroot "${root}" --hooksdir "" >/dev/null
	for link in "${root}"/etc/ssl/certs/*; do
		target="$(readlink "${link}")" || continue
		case "${target}" in
		"${root}"/*)
			target="${target#"${root}"}"                  # //usr/share/...: --sysroot adds a slash
			ln -sfn "/${target#"${target%%[!/]*}"}" "${link}" ;;
		esac
	done
fi
[ -s "${root}/etc/ssl/certs/ca-certificates.crt" ] ||
	{ echo "customize.sh: no CA certificate bundle was made" >&2; exit 1; }
for link in "${root}"/etc/ssl/certs/*.pem; do
	target="$(readlink "${link}")" || continue
	case "${target}" in /*) ;; *) target="/etc/ssl/certs/${target}" ;; esac
	[ -f "${root}${target}" ] ||
		{ echo "customize.sh: ${link#"${root}"} points to ${target}, not in the root" >&2; exit 1; }
done

# --- trimming -------------------------------------------------------------
# These are hidden under tmpfs at run time anyway.
rm -rf "${root}"/var/log/* "${root}"/var/tmp/* "${root}"/var/cache/man \
	"${root}"/var/cache/debconf/*-old "${root}"/var/cache/ldconfig/aux-cache

# Nothing needs updating on first boot (systemd's ConditionNeedsUpdate
# compares these stamps with /usr and would try to write to /etc and /var).
touch "${root}/etc/.updated" "${root}/var/.updated"

# --- fingerprint ----------------------------------------------------------
# /balenaos.fingerprint: the md5 of every regular file of the root, which the
# device checks with `md5sum --quiet -c /balenaos.fingerprint`. Left out: the
# files the running OS does not see at their place (below a mount point of
# fstab or a path bound from resin-state) and the fingerprint itself. This is
# the last step: nothing may change the root after it.
set --
for path in $(awk '$1 !~ /^#/ && $2 ~ /^\/./ { print $2 }' "${root}/etc/fstab") \
	$(grep -v '^#' "${root}/etc/state-binds"); do
	set -- "$@" -path ".${path}" -o
done
(
	cd "${root}"
	find . -xdev \( "$@" -path './balenaos.fingerprint*' \) -prune -o -type f -print0 |
		LC_ALL=C sort -z | xargs -0 md5sum
) | sed 's|  \./|  /|' > "${root}/balenaos.fingerprint.tmp"
mv "${root}/balenaos.fingerprint.tmp" "${root}/balenaos.fingerprint"
chmod 0444 "${root}/balenaos.fingerprint"
files="$(wc -l < "${root}/balenaos.fingerprint")"
[ "${files}" -gt 1000 ] || { echo "customize.sh: the fingerprint lists only ${files} files" >&2; exit 1; }
