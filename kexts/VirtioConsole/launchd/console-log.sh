#!/bin/sh
# VirtioConsole.kext's console log daemon (launchd: org.virtiodarwin.console-log, installed
# by `sudo cargo xtask install --console-log`). At boot it
#   1. waits for the console port's node (VirtioConsole.kext publishes port 0 as
#      /dev/cu.virtio), at most $PORT_WAIT s; without one it exits 0, and launchd does not
#      restart it (KeepAlive: SuccessfulExit = false) until the next boot,
#   2. at its first start in a boot, gives the previous boot's panic report time to be
#      written (macOS writes it from NVRAM early in boot, possibly after this starts): it
#      waits while NVRAM still holds panic information or the report folders keep changing,
#      until they have been still for $PANIC_SETTLE s, at most $PANIC_WAIT s,
#   3. sends the most recent panic report over the port, once (a checksum of the report
#      sent is kept in $STATE_DIR, so a reboot without a new panic sends nothing),
#   4. then streams the kernel's log to it for as long as the system runs: `log stream`
#      where `log` exists (macOS 10.12 and later), else `syslog -w` (older systems,
#      PureDarwin). If the stream ends, it exits 1 and launchd
#      starts it again (at most every 10 s); a stream that keeps ending quickly is restarted
#      after a growing delay (10 s more per quick failure, at most $BACKOFF_MAX s).
# Its own messages go to stderr, which launchd appends to $LOG_FILE; the script keeps that
# file under $LOG_MAX bytes (the last 100 lines stay).
# The callout node (/dev/cu.*) never waits for the host side: while nothing is connected on
# the host, QEMU drops what is written. Output is appended (>>): the same on a device node,
# and testable with a plain file.
# Every path can be overridden from the environment (the test suite runs this script with
# stand-ins for `log`, `syslog`, `sw_vers`, `sysctl` and `nvram`).

PORT="${VIRTIO_CONSOLE_PORT:-/dev/cu.virtio}"
STATE_DIR="${VIRTIO_CONSOLE_STATE_DIR:-/var/db/virtiodarwin}"
PANIC_DIRS="${VIRTIO_CONSOLE_PANIC_DIRS:-/Library/Logs/DiagnosticReports /private/var/db/PanicReporter}"
PORT_WAIT="${VIRTIO_CONSOLE_PORT_WAIT:-120}"
PANIC_WAIT="${VIRTIO_CONSOLE_PANIC_WAIT:-60}"
PANIC_SETTLE="${VIRTIO_CONSOLE_PANIC_SETTLE:-10}"
BACKOFF_MAX="${VIRTIO_CONSOLE_BACKOFF_MAX:-300}"
LOG_FILE="${VIRTIO_CONSOLE_LOG_FILE:-/var/log/virtio-console-log.log}"
LOG_MAX="${VIRTIO_CONSOLE_LOG_MAX:-65536}"

say() { echo "virtio-console-log: $(date '+%Y-%m-%d %H:%M:%S'): $*" >&2; }

# A bounded log: rewritten in place (launchd's descriptor stays valid) past LOG_MAX bytes.
if [ -f "$LOG_FILE" ] && [ "$(wc -c < "$LOG_FILE")" -gt "$LOG_MAX" ]; then
    if tail -n 100 "$LOG_FILE" > "$LOG_FILE.tmp"; then
        cat "$LOG_FILE.tmp" > "$LOG_FILE"
    fi
    rm -f "$LOG_FILE.tmp"
fi

waited=0
while [ ! -e "$PORT" ]; do
    if [ "$waited" -ge "$PORT_WAIT" ]; then
        say "no $PORT after ${PORT_WAIT}s (is VirtioConsole.kext loaded, and does the VM have a virtio console?); not retrying until the next boot"
        exit 0
    fi
    sleep 1
    waited=$((waited + 1))
done

mkdir -p "$STATE_DIR"

# The report folders' listing (names, sizes, times): it changes while a report is written.
listing() {
    # Word splitting of PANIC_DIRS is intended (a list of folders); the listing is only
    # compared, never parsed.
    # shellcheck disable=SC2086,SC2012
    ls -l $PANIC_DIRS 2>/dev/null | cksum
}
# Whether NVRAM still holds a panic that has not been written to a report yet.
panic_pending() {
    nvram aapl,panic-info > /dev/null 2>&1
}

# This boot: its UUID (kern.bootsessionuuid), else, where the kernel has none, its start
# time.
boot=$(sysctl -n kern.bootsessionuuid 2>/dev/null)
if [ -z "$boot" ]; then
    boot=$(sysctl -n kern.boottime 2>/dev/null)
fi
if [ "$boot" != "$(cat "$STATE_DIR/boot" 2>/dev/null)" ]; then
    waited=0
    still=0
    last=$(listing)
    while [ "$waited" -lt "$PANIC_WAIT" ]; do
        if [ "$still" -ge "$PANIC_SETTLE" ] && ! panic_pending; then
            break
        fi
        sleep 1
        waited=$((waited + 1))
        now=$(listing)
        if [ "$now" = "$last" ]; then
            still=$((still + 1))
        else
            still=0
            last="$now"
        fi
    done
    echo "$boot" > "$STATE_DIR/boot"
fi

# The newest panic report: *.panic (10.x) or Kernel-*.ips / panic-full-*.ips (11 and later).
newest=""
for dir in $PANIC_DIRS; do
    for f in "$dir"/*.panic "$dir"/Kernel-*.ips "$dir"/panic-full-*.ips; do
        [ -f "$f" ] || continue
        # -nt: not in POSIX, but in every /bin/sh macOS has shipped (bash, dash, zsh).
        # shellcheck disable=SC3013
        if [ -z "$newest" ] || [ "$f" -nt "$newest" ]; then
            newest="$f"
        fi
    done
done
if [ -n "$newest" ]; then
    sum=$(cksum < "$newest")
    if [ "$sum" != "$(cat "$STATE_DIR/panic-sent" 2>/dev/null)" ]; then
        {
            echo "==== virtio-console-log: panic report from the previous boot: $newest ===="
            cat "$newest"
            echo
            echo "==== end of panic report ===="
        } >> "$PORT" && echo "$sum" > "$STATE_DIR/panic-sent"
    fi
fi

# The log tool: `log stream` where there is one (macOS 10.12 and later; PureDarwin has no
# `log`), else syslogd's `syslog -w`.
version=$(sw_vers -productVersion 2>/dev/null)
if [ -n "$version" ]; then
    version="macOS $version"
else
    version=$(uname -sr 2>/dev/null)
fi
echo "==== virtio-console-log: kernel log of $version follows ====" >> "$PORT"
started=$(date +%s)
if command -v log > /dev/null 2>&1; then
    log stream --process kernel --style syslog --level info >> "$PORT"
else
    syslog -w -k Sender kernel >> "$PORT"
fi
status=$?
ran=$(($(date +%s) - started))

# Ended: launchd starts it again. A stream that ended within a minute counts as a quick
# failure; each one in a row adds 10 s before the restart, up to BACKOFF_MAX.
fails=$(cat "$STATE_DIR/quick-fails" 2>/dev/null)
case "$fails" in '' | *[!0-9]*) fails=0 ;; esac
if [ "$ran" -lt 60 ]; then
    fails=$((fails + 1))
else
    fails=0
fi
echo "$fails" > "$STATE_DIR/quick-fails"
delay=$((fails * 10))
if [ "$delay" -gt "$BACKOFF_MAX" ]; then
    delay=$BACKOFF_MAX
fi
say "the kernel log stream ended (status $status after ${ran}s); restarting in ${delay}s"
sleep "$delay"
exit 1
