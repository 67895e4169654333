#!/usr/bin/env bash
# Install tsechod as a systemd service on this host. Run as root from a checkout:
#
#   sudo ./install.sh            install or upgrade (idempotent: safe to run again)
#   ./install.sh --man DIR       only render the man pages into DIR/man{1,5,8} (no root needed)
#
# What goes where (uninstall.sh removes all of it except the config):
#   /opt/tsechod/venv                 virtualenv from /usr/bin/python3 with tsecho + python-daemon
#   /usr/local/bin/{tsechod,tsecho}   symlinks into the venv
#   /etc/tsechod/tsechod.toml         the config: created from etc/tsechod.toml, never overwritten
#   /etc/systemd/system/tsechod.{service,socket}
#   /etc/systemd/system/tsechod-accept{.socket,@.service}   one process per connection (not enabled:
#                                     an alternative to tsechod.socket on the same port)
#   /etc/logrotate.d/tsechod
#   /usr/local/share/man/man{1,5,8}   tsecho(1), tsechod.toml(5), tsechod(8)
# Then: systemctl daemon-reload, enable tsechod.socket + tsechod.service, and (when systemd is
# running) start the socket and (re)start the service, so an upgrade takes effect at once.
set -euo pipefail
# The service's dynamic user must read the venv and the config, whatever root's umask is.
umask 022

PREFIX=/opt/tsechod
VENV=$PREFIX/venv
PYTHON=/usr/bin/python3
CONFIG_DIR=/etc/tsechod
UNIT_DIR=/etc/systemd/system
LOGROTATE_DIR=/etc/logrotate.d
MAN_DIR=/usr/local/share/man
BIN_DIR=/usr/local/bin
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# Markdown man page sources (docs/NAME.SECTION.md) to roff, with the stdlib only, so that a host
# needs no pandoc. The sources start with "# name(section) -- one-line description"; the rest is
# plain markdown: ## sections, paragraphs, `code`, **bold**, *italic*, - lists, ``` blocks,
# definition lists ("term" line, then ": text" lines) and | tables |.
render_man() {  # render_man SRC.md DEST
  "$PYTHON" - "$1" "$2" <<'PYEOF'
import re, sys, time
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
stem = src.name.removesuffix(".md")            # tsechod.8 / tsechod.toml.5
name, _, section = stem.rpartition(".")

def esc(text):
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return text

def inline(text):
    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:
            out.append("\\fB" + esc(part) + "\\fR")
            continue
        part = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 <\2>", part)
        part = esc(part)
        part = re.sub(r"(?<!\w)_(?!\s)(.+?)(?<!\s)_(?!\w)", r"\\fI\1\\fR", part)
        part = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\\fI\1\\fR", part)
        out.append(part)
    line = "".join(out)
    return "\\&" + line if line.startswith((".", "'")) else line

lines = src.read_text(encoding="utf-8").splitlines()
footer = "tsecho"
if lines and lines[0].startswith("% "):  # pandoc title block: % NAME(SECTION) footer | header
    footer = lines[0].partition(")")[2].partition("|")[0].strip() or footer
    lines = lines[1:]
title = lines[0] if lines else ""
m = re.match(r"#\s*([\w.\-]+)\((\w+)\)\s*(?:--|—|-)\s*(.*)", title)
out = [f'.TH "{name.upper()}" "{section}" "{time.strftime("%Y-%m-%d", time.gmtime())}" "{footer}" "tsecho manual"']
out += [".ad l", ".nh"]
if m:
    out += [".SH NAME", f"{esc(m.group(1))} \\- {inline(m.group(3))}"]
    lines = lines[1:]
i = 0
para_open = False
while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    if not stripped:
        para_open = False
        i += 1
        continue
    if stripped.startswith("```"):
        block = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            block.append(lines[i])
            i += 1
        i += 1
        out += [".PP", ".RS 4", ".nf"] + [("\\&" + esc(b)) for b in block] + [".fi", ".RE"]
        para_open = False
        continue
    if stripped.startswith("|"):
        rows = []
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
            i += 1
        widths = [max(len(r[c]) if c < len(r) else 0 for r in rows) for c in range(max(map(len, rows)))]
        out += [".PP", ".RS 4", ".nf"]
        for r in rows:
            out.append("\\&" + esc("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()))
        out += [".fi", ".RE"]
        para_open = False
        continue
    h = re.match(r"(#{1,3})\s+(.*)", stripped)
    if h:
        text = h.group(2).strip()
        out.append((".SH " if len(h.group(1)) <= 2 else ".SS ") + ('"' + inline(text.upper() if len(h.group(1)) <= 2 and re.fullmatch(r"[A-Za-z ]+", text) else text) + '"'))
        para_open = False
        i += 1
        continue
    if i + 1 < len(lines) and lines[i + 1].startswith(": "):
        out += [".TP", inline(stripped)]
        i += 1
        while i < len(lines) and (lines[i].startswith(": ") or lines[i].startswith("  ") and lines[i].strip()):
            out.append(inline(lines[i][2:].strip()))
            i += 1
        para_open = False
        continue
    item = re.match(r"([-*]|\d+\.)\s+(.*)", stripped)
    if item and not line.startswith("    "):
        mark = "\\(bu" if item.group(1) in "-*" else item.group(1)
        out += [f".IP {mark} 3" if mark == "\\(bu" else f".IP {mark} 4", inline(item.group(2))]
        i += 1
        while i < len(lines) and lines[i].startswith("  ") and lines[i].strip() and not re.match(r"\s*([-*]|\d+\.)\s", lines[i]):
            out.append(inline(lines[i].strip()))
            i += 1
        para_open = False
        continue
    if not para_open:
        out.append(".PP")
        para_open = True
    out.append(inline(stripped))
    i += 1
dest.parent.mkdir(parents=True, exist_ok=True)
dest.write_text("\n".join(out) + "\n", encoding="utf-8")
PYEOF
}

# The man pages to install: (source, section). tsecho.1.md is the client's page.
MAN_PAGES=(tsechod.8 tsechod.toml.5 tsecho.1)

render_all_man() {  # render_all_man DIR
  local page src section
  for page in "${MAN_PAGES[@]}"; do
    src=$REPO/docs/$page.md
    section=${page##*.}
    if [[ -f $src ]]; then
      render_man "$src" "$1/man$section/$page"
    else
      say "warning: $src is missing; man page $page not installed"
    fi
  done
}

if [[ ${1:-} == --man ]]; then
  [[ $# == 2 ]] || die "usage: $0 --man DIR"
  render_all_man "$2"
  exit 0
fi
[[ $# == 0 ]] || die "usage: sudo $0   (or: $0 --man DIR)"
[[ $(id -u) == 0 ]] || die "must run as root (try: sudo $0)"
[[ -x $PYTHON ]] || die "$PYTHON not found (apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); tsechod needs Python 3.11 or newer"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$PYTHON cannot create virtualenvs (apt-get install python3-venv)"
for f in pyproject.toml systemd/tsechod.service systemd/tsechod.socket systemd/tsechod-accept.socket \
  systemd/tsechod-accept@.service etc/tsechod.toml etc/logrotate.d/tsechod; do
  [[ -f $REPO/$f ]] || die "$REPO/$f is missing: run this from a complete tsecho checkout"
done

# 1. The virtualenv and the package. Built from a copy of the sources, so that pip leaves no
# build/ or egg-info behind in the checkout.
if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "reusing virtualenv $VENV"
else
  say "creating virtualenv $VENV from $PYTHON"
  rm -rf "$VENV"
  mkdir -p "$PREFIX"
  "$PYTHON" -m venv "$VENV"
fi
build=$(mktemp -d /tmp/tsecho-install.XXXXXX)
trap 'rm -rf "$build"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/src" "$build/"
for f in README.md LICENSE; do
  if [[ -f $REPO/$f ]]; then cp "$REPO/$f" "$build/"; fi
done
[[ -f $build/README.md ]] || echo "tsechod, a timestamp echo daemon" >"$build/README.md"
find "$build/src" -name '*.egg-info' -prune -exec rm -rf {} +
say "installing tsecho and its dependencies into $VENV (pip)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$build" \
  || die "pip install into $VENV failed (see above); nothing else was changed"
"$VENV/bin/tsechod" --help >/dev/null || die "$VENV/bin/tsechod does not run (see above)"
ln -sfn "$VENV/bin/tsechod" "$BIN_DIR/tsechod"
ln -sfn "$VENV/bin/tsecho" "$BIN_DIR/tsecho"
say "installed $("$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | awk '$1=="tsecho"{print $1" "$2}'), commands linked in $BIN_DIR"

# 2. The config: never overwrite the operator's.
install -d -m 0755 "$CONFIG_DIR"
if [[ -e $CONFIG_DIR/tsechod.toml ]]; then
  say "keeping existing $CONFIG_DIR/tsechod.toml (the shipped default is $REPO/etc/tsechod.toml)"
else
  install -m 0644 "$REPO/etc/tsechod.toml" "$CONFIG_DIR/tsechod.toml"
  say "created $CONFIG_DIR/tsechod.toml"
fi

# 3. Units, logrotate, man pages.
install -m 0644 "$REPO/systemd/tsechod.service" "$REPO/systemd/tsechod.socket" "$UNIT_DIR/"
say "installed $UNIT_DIR/tsechod.service and $UNIT_DIR/tsechod.socket"
install -m 0644 "$REPO/systemd/tsechod-accept.socket" "$REPO/systemd/tsechod-accept@.service" "$UNIT_DIR/"
say "installed $UNIT_DIR/tsechod-accept.socket and $UNIT_DIR/tsechod-accept@.service (not enabled; see docs/operations.md)"
install -d -m 0755 "$LOGROTATE_DIR"
install -m 0644 "$REPO/etc/logrotate.d/tsechod" "$LOGROTATE_DIR/tsechod"
say "installed $LOGROTATE_DIR/tsechod"
render_all_man "$MAN_DIR"
if command -v mandb >/dev/null; then mandb --quiet "$MAN_DIR" >/dev/null 2>&1 || true; fi
say "installed man pages under $MAN_DIR (man tsechod)"

# 4. systemd. enable only writes symlinks, so it also works in a chroot or image build.
systemctl enable --quiet tsechod.socket tsechod.service 2>/dev/null \
  || systemctl --root=/ enable --quiet tsechod.socket tsechod.service
say "enabled tsechod.socket and tsechod.service"
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl start tsechod.socket
  # restart, not start: an upgrade must run the new code. With the socket unit holding the
  # listeners, clients connecting meanwhile wait in the kernel's queue instead of being refused.
  if systemctl restart tsechod.service; then
    say "started: $(systemctl is-active tsechod.service) (systemctl status tsechod; journalctl -u tsechod -f)"
  else
    die "tsechod.service did not start; see: systemctl status tsechod; journalctl -u tsechod -n 50"
  fi
else
  say "systemd is not running here; the units start at the next boot (or: systemctl start tsechod)"
fi
say "done"
