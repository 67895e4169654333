#!/usr/bin/env bash
# Remove what install.sh installed: stop and disable the units, remove them, the logrotate file,
# the man pages, the command links and /opt/tsechod. Kept: the config (/etc/tsechod) and the
# logs (/var/log/tsechod), which are the operator's. Idempotent: safe to run again.
#
#   sudo ./uninstall.sh
set -euo pipefail

PREFIX=/opt/tsechod
UNIT_DIR=/etc/systemd/system
MAN_DIR=/usr/local/share/man
BIN_DIR=/usr/local/bin
UNITS=(tsechod.service tsechod.socket)
# One process per connection: never enabled by install.sh; the template is stopped by its instances.
ACCEPT_UNITS=(tsechod-accept.socket tsechod-accept@.service)

say() { echo "uninstall.sh: $*"; }
die() { echo "uninstall.sh: error: $*" >&2; exit 1; }

[[ $# == 0 ]] || die "usage: sudo $0"
[[ $(id -u) == 0 ]] || die "must run as root (try: sudo $0)"

running=false
[[ -d /run/systemd/system ]] && running=true

if $running; then
  # Stop the socket too, or the next connection would start the service again.
  systemctl stop "${UNITS[@]}" 2>/dev/null || true
  say "stopped ${UNITS[*]}"
  systemctl stop tsechod-accept.socket 'tsechod-accept@*.service' 2>/dev/null || true
fi
# Not enabled by install.sh, but perhaps by the operator.
systemctl --root=/ disable --quiet tsechod-accept.socket 2>/dev/null || true
if systemctl --root=/ disable --quiet "${UNITS[@]}" 2>/dev/null; then
  say "disabled ${UNITS[*]}"
fi
removed=()
for unit in "${UNITS[@]}" "${ACCEPT_UNITS[@]}"; do
  if [[ -e $UNIT_DIR/$unit ]]; then
    rm -f "$UNIT_DIR/$unit"
    removed+=("$UNIT_DIR/$unit")
  fi
done
for file in /etc/logrotate.d/tsechod "$MAN_DIR/man8/tsechod.8" "$MAN_DIR/man5/tsechod.toml.5" \
  "$MAN_DIR/man1/tsecho.1"; do
  if [[ -e $file ]]; then
    rm -f "$file"
    removed+=("$file")
  fi
done
for cmd in tsechod tsecho; do
  # Only our own links: a tsechod installed some other way is not ours to remove.
  if [[ -L $BIN_DIR/$cmd && $(readlink "$BIN_DIR/$cmd") == "$PREFIX"/* ]]; then
    rm -f "$BIN_DIR/$cmd"
    removed+=("$BIN_DIR/$cmd")
  fi
done
if [[ -d $PREFIX ]]; then
  rm -rf "$PREFIX"
  removed+=("$PREFIX")
fi
if ((${#removed[@]})); then
  say "removed ${removed[*]}"
else
  say "nothing to remove: tsechod is not installed"
fi
if command -v mandb >/dev/null; then mandb --quiet "$MAN_DIR" >/dev/null 2>&1 || true; fi
if $running; then
  systemctl daemon-reload
  systemctl reset-failed "${UNITS[@]}" tsechod-accept.socket 'tsechod-accept@*.service' 2>/dev/null || true
fi
for dropin in "$UNIT_DIR"/tsechod.service.d "$UNIT_DIR"/tsechod.socket.d; do
  [[ -d $dropin ]] && say "kept your drop-in directory $dropin"
done
[[ -e /etc/tsechod ]] && say "kept the config in /etc/tsechod (remove it yourself if unwanted)"
[[ -e /var/log/tsechod ]] && say "kept the logs in /var/log/tsechod"
say "done"
