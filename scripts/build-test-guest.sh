#!/usr/bin/env bash
# Builds the Debian bookworm guest the cloud-image tests boot: debootstrap
# (minbase) + the cloud kernel, cloud-init (NoCloud only) and
# openssh-server. The network is systemd-networkd + systemd-resolved (no
# ifupdown): cloud-init renders its config (DHCP on eth0, or the seed's
# static network-config with its default route and DNS servers) for
# networkd. No SSH host keys and an empty machine-id, so each VM makes its
# own. From the one tree, two images:
#  - OUT_DIR/debian-bookworm-cloud.qcow2: an ext4 disk without a partition
#    table that SeaBIOS boots through extlinux (root=/dev/vda);
#  - OUT_DIR/debian-bookworm-cloud-uefi.qcow2: a GPT disk, an EFI system
#    partition (FAT32, 64 MiB) then the ext4 root (found by PARTUUID).
#    OVMF boots \EFI\BOOT\BOOTX64.EFI, systemd-boot, on its own (no boot
#    entry needed); systemd-boot loads the kernel and initrd from the ESP
#    with no menu (timeout 0). Chosen over GRUB: one small binary that
#    reads only the ESP through the firmware's FAT driver, no modules, no
#    ext4 reading, no terminal or video setup, which under TCG is what
#    takes GRUB its seconds. Built without mounting (sfdisk, mkfs.vfat +
#    mtools, mkfs.ext4 -E offset).
#
# Cached: images whose stamp names this VERSION are kept as they are.
# KEEP_BUILD=1 keeps the build folder (logs, the tree) to look into.
set -euo pipefail

VERSION=3
SUITE=bookworm
SIZE_MIB=2048
ESP_MIB=64
# The UEFI image's partitions, fixed so that the loader entry and fstab
# can name the root before the disk exists.
ESP_PARTUUID=6f1c3b2a-51e4-4c47-9a0e-2d5b8e7c1a01
ROOT_PARTUUID=6f1c3b2a-51e4-4c47-9a0e-2d5b8e7c1a02

out_dir=${1:?usage: build-test-guest.sh OUT_DIR}
image="$out_dir/debian-bookworm-cloud.qcow2"
uefi_image="$out_dir/debian-bookworm-cloud-uefi.qcow2"
stamp="$out_dir/debian-bookworm-cloud.version"
if [ -f "$image" ] && [ -f "$uefi_image" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=""
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
command -v qemu-img >/dev/null 2>&1 || need="$need qemu-utils"
command -v mkfs.ext4 >/dev/null 2>&1 || need="$need e2fsprogs"
command -v extlinux >/dev/null 2>&1 || need="$need extlinux"
command -v sfdisk >/dev/null 2>&1 || need="$need fdisk"
command -v mkfs.vfat >/dev/null 2>&1 || need="$need dosfstools"
command -v mcopy >/dev/null 2>&1 || need="$need mtools"
# The firmware the UEFI image is booted with (by the tests, not here).
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need="$need ovmf"
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
  if [ -n "${bios_convert:-}" ]; then
    kill "$bios_convert" 2>/dev/null || true
    wait "$bios_convert" 2>/dev/null || true
  fi
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
# systemd-boot-efi: the UEFI image's boot loader (files only, nothing runs).
packages="linux-image-cloud-amd64 initramfs-tools cloud-init openssh-server sudo udev dbus systemd-resolved iproute2 netbase systemd-boot-efi"
$SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$work/apt.log" 2>&1
# shellcheck disable=SC2086
$SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >>"$work/apt.log" 2>&1 || {
  tail -n 30 "$work/apt.log" >&2
  exit 1
}
$SUDO rm -f "$root/usr/sbin/policy-rc.d"

# Configuration, written from the host.
put() { $SUDO mkdir -p "$(dirname "$root/$1")"; printf '%s\n' "$2" | $SUDO tee "$root/$1" >/dev/null; }
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

# The BIOS image: the whole disk is the root file system.
put etc/fstab "/dev/vda / ext4 defaults,errors=remount-ro 0 1"
put boot/extlinux/extlinux.conf "DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=/dev/vda rw console=ttyS0 net.ifnames=0"

# extlinux cannot boot ext4 with 64-bit block numbers.
$SUDO mkfs.ext4 -q -F -L root -O ^64bit,^metadata_csum_seed -d "$root" "$work/disk.raw" "${SIZE_MIB}M"
mkdir -p "$mnt"
$SUDO mount -o loop "$work/disk.raw" "$mnt"
$SUDO extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1
$SUDO umount "$mnt"
# Compressed while the UEFI image is built.
qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/image.qcow2" &
bios_convert=$!

# The UEFI image: GPT, the ESP from 1 MiB, the root after it up to 1 MiB
# before the end (room for the backup GPT).
$SUDO rm -rf "$root/boot/extlinux"
put etc/fstab "PARTUUID=$ROOT_PARTUUID / ext4 defaults,errors=remount-ro 0 1"
esp_start=2048
esp_sectors=$((ESP_MIB * 2048))
root_start=$((esp_start + esp_sectors))
root_sectors=$((SIZE_MIB * 2048 - root_start - 2048))
disk="$work/disk-uefi.raw"
truncate -s "${SIZE_MIB}M" "$disk"
printf '%s\n' "label: gpt" "unit: sectors" \
  "start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$ESP_PARTUUID, name=esp" \
  "start=$root_start, size=$root_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$ROOT_PARTUUID, name=root" \
  | sfdisk -q "$disk" >/dev/null
$SUDO mkfs.ext4 -q -F -L root -E offset=$((root_start * 512)) -d "$root" "$disk" "$((root_sectors / 2))k"
# The ESP, made as a file and copied in: systemd-boot at the removable
# media path, its loader.conf and one entry, the kernel and initrd beside
# them (systemd-boot reads only the ESP).
esp="$work/esp.raw"
$SUDO mkfs.vfat -C -F 32 -n ESP "$esp" $((ESP_MIB * 1024)) >/dev/null
printf '%s\n' "default hangar.conf" "timeout 0" "editor no" >"$work/loader.conf"
printf '%s\n' "title Debian (Hangar test guest)" "linux /vmlinuz" "initrd /initrd.img" \
  "options root=PARTUUID=$ROOT_PARTUUID rw console=ttyS0 net.ifnames=0" >"$work/hangar.conf"
mtools() { $SUDO env MTOOLS_SKIP_CHECK=1 "$@"; }
mtools mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mtools mcopy -i "$esp" "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mtools mcopy -i "$esp" "$root/boot/$kernel" ::/vmlinuz
mtools mcopy -i "$esp" "$root/boot/$initrd" ::/initrd.img
mtools mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mtools mcopy -i "$esp" "$work/hangar.conf" ::/loader/entries/hangar.conf
$SUDO dd if="$esp" of="$disk" bs=1M seek=$((esp_start / 2048)) conv=notrunc,sparse status=none
qemu-img convert -c -O qcow2 "$disk" "$work/image-uefi.qcow2"
wait "$bios_convert"
bios_convert=

mv "$work/image.qcow2" "$image"
mv "$work/image-uefi.qcow2" "$uefi_image"
echo "$VERSION" >"$stamp"
