#!/usr/bin/env bash
# Make the base image debian:bookworm-slim locally, for a Docker daemon that can't
# pull images from a registry: a minimal Debian 12 from Debian's mirror, made with
# mmdebstrap (about 25 s) or else debootstrap (about a minute), then imported.
# Needs root.
#
#   docker/base-image.sh [WORK_DIR]     (DOCKER: the docker client; MIRROR: the mirror)
set -euo pipefail

DOCKER=${DOCKER:-docker}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
IMAGE=debian:bookworm-slim

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE is there already"
    exit 0
fi
work=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/base-image.XXXXXX")
rootfs=$work/rootfs

# Both tools mount /proc and /sys inside the root file system while they work; an
# interrupted run can leave them mounted, so unmount before removing anything.
cleanup() {
    local mounts
    mounts=$(awk -v root="$work" 'index($5, root "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
    for mount in $mounts; do umount -l "$mount" || true; done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap "exit 1" INT TERM

if command -v mmdebstrap >/dev/null; then
    echo "mmdebstrap --variant=minbase bookworm ($MIRROR)"
    # A file first, not a pipe: a failed run must not leave a partial image behind.
    TMPDIR=$work mmdebstrap --quiet --variant=minbase bookworm "$work/rootfs.tar" "$MIRROR"
    "$DOCKER" import "$work/rootfs.tar" "$IMAGE" >/dev/null
else
    echo "debootstrap --variant=minbase bookworm ($MIRROR)"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        exit 1
    }
    # What the slim image leaves out: downloaded packages and package lists.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import - "$IMAGE" >/dev/null
fi
echo "imported $IMAGE"
