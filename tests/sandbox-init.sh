#!/bin/sh
# PID 1 of the fresh namespaces that tests/sandbox.py creates: builds a
# throw-away root (the host's / read-only below a tmpfs), mounts new API
# filesystems, pivots into it and becomes systemd.
#
#   sandbox-init.sh SCRATCH [rw:HOSTDIR | cow:HOSTDIR]...
#
# SCRATCH is an empty host directory used only as a mount point in this
# (private) mount namespace. rw: binds a host directory read-write at the same
# path; cow: shows it copy-on-write (writes land in the tmpfs and are lost),
# for a directory on another file system than /, which the overlay omits.
set -eu
scratch=$1
shift

mount --make-rprivate /
mount -t tmpfs -o mode=755 ipqd-sandbox "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay \
    -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root

mount -t proc proc "$root/proc"
# Read-only sysfs makes udev and friends skip themselves.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
# Rooted at the child cgroup the harness made, through the cgroup namespace.
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/full" c 1 7
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
mknod -m 666 "$root/dev/tty" c 5 0
# The console is the boot log (our stdout), as nspawn gives its pty.
touch "$root/dev/console"
mount --bind "$(readlink -f /proc/self/fd/1)" "$root/dev/console" 2>/dev/null \
    || mount --bind /dev/null "$root/dev/console"
mkdir "$root/dev/pts" "$root/dev/shm" "$root/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"

# A small boot: basic.target only, no timers (apt-daily and co.), no getty.
units=$root/etc/systemd/system
cat > "$units/ipqd-sandbox.target" <<'EOF'
[Unit]
Description=ipqd test sandbox (basic system only)
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF
ln -sf /dev/null "$units/timers.target"
ln -sf /dev/null "$units/systemd-timesyncd.service"
echo ipqd-sandbox > "$root/etc/hostname"

n=0
for spec in "$@"; do
    dir=${spec#*:}
    mkdir -p "$root$dir"
    case $spec in
        rw:*) mount --bind "$dir" "$root$dir" ;;
        cow:*)
            n=$((n + 1))
            mkdir "$scratch/cow$n" "$scratch/cow$n.work"
            mount -t overlay overlay \
                -o "lowerdir=$dir,upperdir=$scratch/cow$n,workdir=$scratch/cow$n.work" "$root$dir" ;;
        *) echo "sandbox-init.sh: bad bind spec: $spec" >&2; exit 2 ;;
    esac
done

cd "$root"
mkdir .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
cd /
export container=ipqd-sandbox
exec /lib/systemd/systemd --system --unit=ipqd-sandbox.target \
    --log-target=journal-or-kmsg --show-status=yes
