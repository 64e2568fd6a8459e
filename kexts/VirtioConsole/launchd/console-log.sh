#!/bin/sh
# VirtioConsole.kext's console log daemon (launchd: org.virtiodarwin.console-log, installed
# by `sudo cargo xtask install --console-log`). At boot it
#   1. waits for the console port's node (VirtioConsole.kext publishes port 0 as
#      /dev/cu.virtio),
#   2. sends the most recent panic report over it, once (a checksum of the report sent is
#      kept in $STATE_DIR, so a reboot without a new panic sends nothing),
#   3. then streams the kernel's log to it for as long as the system runs: `log stream` on
#      macOS 10.12 and later, `syslog -w` before.
# The callout node (/dev/cu.*) never waits for the host side: while nothing is connected on
# the host, QEMU drops what is written. Output is appended (>>): the same on a device node,
# and testable with a plain file. launchd restarts the daemon if the stream ends.
# Every path can be overridden from the environment (the test suite runs this script with
# stand-ins for `log`, `syslog` and `sw_vers`).

PORT="${VIRTIO_CONSOLE_PORT:-/dev/cu.virtio}"
STATE_DIR="${VIRTIO_CONSOLE_STATE_DIR:-/var/db/virtiodarwin}"
PANIC_DIRS="${VIRTIO_CONSOLE_PANIC_DIRS:-/Library/Logs/DiagnosticReports /private/var/db/PanicReporter}"
PORT_WAIT="${VIRTIO_CONSOLE_PORT_WAIT:-120}"

say() { echo "virtio-console-log: $*" >&2; }

waited=0
while [ ! -e "$PORT" ]; do
    if [ "$waited" -ge "$PORT_WAIT" ]; then
        say "no $PORT after ${PORT_WAIT}s (is VirtioConsole.kext loaded, and does the VM have a virtio console?)"
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

# The newest panic report: *.panic (10.x) or Kernel-*.ips / panic-full-*.ips (11 and later).
newest=""
for dir in $PANIC_DIRS; do
    for f in "$dir"/*.panic "$dir"/Kernel-*.ips "$dir"/panic-full-*.ips; do
        [ -f "$f" ] || continue
        if [ -z "$newest" ] || [ "$f" -nt "$newest" ]; then
            newest="$f"
        fi
    done
done
if [ -n "$newest" ]; then
    sum=$(cksum < "$newest")
    mkdir -p "$STATE_DIR"
    if [ "$sum" != "$(cat "$STATE_DIR/panic-sent" 2>/dev/null)" ]; then
        {
            echo "==== virtio-console-log: panic report from the previous boot: $newest ===="
            cat "$newest"
            echo
            echo "==== end of panic report ===="
        } >> "$PORT" && echo "$sum" > "$STATE_DIR/panic-sent"
    fi
fi

version=$(sw_vers -productVersion 2>/dev/null)
major=${version%%.*}
rest=${version#*.}
minor=${rest%%.*}
case "$minor" in '' | *[!0-9]*) minor=0 ;; esac
case "$major" in '' | *[!0-9]*) major=10 ;; esac
echo "==== virtio-console-log: kernel log of macOS $version follows ====" >> "$PORT"
if [ "$major" -gt 10 ] || [ "$minor" -ge 12 ]; then
    exec log stream --process kernel --style syslog --level info >> "$PORT"
else
    exec syslog -w -k Sender kernel >> "$PORT"
fi
