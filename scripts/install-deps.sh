#!/usr/bin/env bash
# Installs what Hangar needs on a Debian host: QEMU, a static busybox for the
# guest, the Debian cloud kernel *package file* (unpacked later by Hangar
# into its image store; never installed into the host's /boot), and the Rust
# musl target the guest agent is built for.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=0
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt=1
# The guest has no libc: busybox must be the static build (busybox-static).
busybox_ldd=$(ldd /bin/busybox 2>&1 || true)
case "$busybox_ldd" in
  *"not a dynamic"*) ;;
  *) need_apt=1 ;;
esac
[ -f /usr/share/qemu/qboot.rom ] || need_apt=1
# OCI images: qemu-img makes per-VM overlays, mkfs.ext4 builds root file systems.
command -v qemu-img >/dev/null 2>&1 || need_apt=1
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt=1
# The registry tests: a real registry and a tool to push into it.
command -v docker-registry >/dev/null 2>&1 || need_apt=1
command -v skopeo >/dev/null 2>&1 || need_apt=1
command -v mksquashfs >/dev/null 2>&1 || need_apt=1

if [ "$need_apt" -eq 1 ]; then
  $SUDO apt-get update -qq
  # qemu-utils must come from the same QEMU release as qemu-system-x86
  # (Debian's packages break each other across releases). A machine that
  # has qemu-utils from elsewhere (seen: 10.0 from bookworm-backports, with
  # no backports source left to get the matching emulator) gets the
  # distribution's qemu-utils instead, said out loud.
  qemu_pins=(qemu-system-x86 qemu-utils)
  qemu_version=$(LC_ALL=C apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  utils_version=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
  if [ -n "$qemu_version" ] && [ "$qemu_version" != "(none)" ] \
    && [ -n "$utils_version" ] && [ "$utils_version" != "$qemu_version" ]; then
    echo "install-deps: qemu-utils $utils_version does not match qemu-system-x86 $qemu_version; installing qemu-utils $qemu_version" >&2
    qemu_pins=("qemu-utils=$qemu_version" "qemu-system-x86=$qemu_version"
      "qemu-system-common=$qemu_version")
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades \
    "${qemu_pins[@]}" qemu-system-data e2fsprogs busybox-static ca-certificates \
    docker-registry skopeo squashfs-tools >/dev/null
fi

# The kernel package goes to Hangar's package cache, not apt's: Debian
# container images wipe /var/cache/apt/archives after every install.
archives=/var/cache/hangar/packages
$SUDO mkdir -p "$archives"
if ! ls "$archives"/linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$pkg" ]; then
    $SUDO apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  fi
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  (cd "$tmp" && $SUDO apt-get download -qq "$pkg")
  $SUDO mv "$tmp"/*.deb "$archives"/
  rm -rf "$tmp"
fi

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
else
  echo "rustup not found: install Rust from https://rustup.rs, then rerun" >&2
  exit 1
fi
