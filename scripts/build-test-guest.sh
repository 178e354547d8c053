#!/usr/bin/env bash
# Builds the Debian bookworm guest the cloud-image tests boot: debootstrap
# (minbase) + the cloud kernel, cloud-init (NoCloud only) and
# openssh-server, on an ext4 disk without a partition table that SeaBIOS
# boots through extlinux. The network is systemd-networkd +
# systemd-resolved (no ifupdown): cloud-init renders its config (DHCP on
# eth0, or the seed's static network-config with its default route and DNS
# servers) for networkd. No SSH host keys and an empty machine-id, so each
# VM makes its own. Output: OUT_DIR/debian-bookworm-cloud.qcow2.
#
# Cached: an image whose stamp names this VERSION is kept as it is.
# KEEP_BUILD=1 keeps the build folder (logs, the tree) to look into.
set -euo pipefail

VERSION=2
SUITE=bookworm
SIZE=2G

out_dir=${1:?usage: build-test-guest.sh OUT_DIR}
image="$out_dir/debian-bookworm-cloud.qcow2"
stamp="$out_dir/debian-bookworm-cloud.version"
if [ -f "$image" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=""
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
command -v qemu-img >/dev/null 2>&1 || need="$need qemu-utils"
command -v mkfs.ext4 >/dev/null 2>&1 || need="$need e2fsprogs"
command -v extlinux >/dev/null 2>&1 || need="$need extlinux"
if [ -n "$need" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# The host's Debian mirror, else deb.debian.org.
mirror=$(grep -rhoE '^(deb|URIs:) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | awk '{print $2}' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$out_dir"
work=$(mktemp -d "$out_dir/build.XXXXXX")
root="$work/root"
mnt="$work/mnt"
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && $SUDO umount "$mnt"
  for fs in proc sys dev; do
    mountpoint -q "$root/$fs" 2>/dev/null && $SUDO umount -l "$root/$fs"
  done
  if [ "${KEEP_BUILD:-}" = 1 ]; then echo "kept $work" >&2; else $SUDO rm -rf "$work"; fi
}
trap cleanup EXIT

# debootstrap's own resolver misses virtual packages (cloud-init's python3
# stack needs some): the base first, then apt inside it.
$SUDO debootstrap --variant=minbase --include=systemd-sysv "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
  exit 1
}
for fs in proc sys dev; do $SUDO mount --bind "/$fs" "$root/$fs"; done
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$root/usr/sbin/policy-rc.d" >/dev/null
$SUDO chmod 755 "$root/usr/sbin/policy-rc.d"
# systemd-networkd (part of systemd) and systemd-resolved, not ifupdown:
# cloud-init's ENI renderer cannot add a static default route (no `route`)
# nor DNS servers (no resolvconf). Without ifupdown (and netplan) cloud-init
# picks its networkd renderer. dbus is what resolvectl talks to.
packages="linux-image-cloud-amd64 initramfs-tools cloud-init openssh-server sudo udev dbus systemd-resolved iproute2 netbase"
$SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$work/apt.log" 2>&1
# shellcheck disable=SC2086
$SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >>"$work/apt.log" 2>&1 || {
  tail -n 30 "$work/apt.log" >&2
  exit 1
}
$SUDO rm -f "$root/usr/sbin/policy-rc.d"

# Configuration, written from the host.
put() { $SUDO mkdir -p "$(dirname "$root/$1")"; printf '%s\n' "$2" | $SUDO tee "$root/$1" >/dev/null; }
put etc/fstab "/dev/vda / ext4 defaults,errors=remount-ro 0 1"
put etc/hostname "debian"
# Less for cloud-init to do at the first boot (seconds each under TCG): no
# locale-gen/update-locale for its default en_US.UTF-8 (without the locales
# package the module fails, and that error ends `cloud-init status --wait`
# before the final stage has run), no RSA or DSA host keys, no GRUB.
put etc/default/locale "LANG=C.UTF-8"
put etc/cloud/cloud.cfg.d/90-hangar.cfg "datasource_list: [ NoCloud, None ]
locale: C.UTF-8
ssh_genkeytypes: [ ed25519, ecdsa ]
grub_dpkg:
  enabled: false"
# networkd brings up what cloud-init writes to /etc/systemd/network;
# resolved takes its DNS servers, /etc/resolv.conf is resolved's stub.
$SUDO chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service >>"$work/apt.log" 2>&1 || {
  tail -n 30 "$work/apt.log" >&2
  exit 1
}
$SUDO ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# Small initramfs: only what mounts a virtio ext4 root.
put etc/initramfs-tools/conf.d/hangar "MODULES=list"
put etc/initramfs-tools/modules "virtio_pci
virtio_blk
ext4"
$SUDO rm -f "$root"/etc/ssh/ssh_host_*
$SUDO truncate -s 0 "$root/etc/machine-id"
$SUDO rm -f "$root/var/lib/dbus/machine-id"

$SUDO chroot "$root" update-initramfs -u -k all >/dev/null 2>&1
$SUDO chroot "$root" apt-get clean
for fs in proc sys dev; do $SUDO umount -l "$root/$fs"; done
$SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/*.log

kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n1)
initrd=$(cd "$root/boot" && ls initrd.img-* | sort -V | tail -n1)
put boot/extlinux/extlinux.conf "DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=/dev/vda rw console=ttyS0 net.ifnames=0"

# extlinux cannot boot ext4 with 64-bit block numbers.
$SUDO mkfs.ext4 -q -F -L root -O ^64bit,^metadata_csum_seed -d "$root" "$work/disk.raw" "$SIZE"
mkdir -p "$mnt"
$SUDO mount -o loop "$work/disk.raw" "$mnt"
$SUDO extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1
$SUDO umount "$mnt"

qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/image.qcow2"
mv "$work/image.qcow2" "$image"
echo "$VERSION" >"$stamp"
