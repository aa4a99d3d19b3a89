#!/usr/bin/env bash
# `make install` / `make uninstall`: blockcrypt in a virtualenv of its own, on PATH, with its
# systemd units. Idempotent: running it again upgrades in place.
#
#   PREFIX   the virtualenv (default /opt/blockcrypt): blockcrypt and its native modules,
#            installed from a wheel built from this tree (not editable)
#   BINDIR   where the `blockcrypt` symlink goes (default /usr/local/bin)
#   UNITDIR  where the systemd units go (default /etc/systemd/system); their paths are
#            rewritten to BINDIR and PREFIX
#   PY       the Python that makes the virtualenv (default python3, 3.11 or newer)
#
# uninstall removes the symlink, the units and PREFIX (only a PREFIX this script made:
# it carries a marker file); state directories, vaults and /etc/blockcrypt stay.
set -euo pipefail

PREFIX=${PREFIX:-/opt/blockcrypt}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PY=${PY:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)
MARKER="$PREFIX/.blockcrypt-install"
UNITS=(blockcrypt-mount@.service blockcrypt-vault.service)

reload_systemd() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
  fi
}

do_install() {
  if [ ! -x "$PREFIX/bin/python" ]; then
    echo "install: creating the virtualenv $PREFIX"
    "$PY" -m venv "$PREFIX"
    "$PREFIX/bin/python" -m pip install -q --upgrade pip "setuptools>=68" wheel
  fi
  touch "$MARKER"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # build from the tracked files only: no editable build's *.so or build/ leaks into the wheel
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$work"
  else
    tar -C "$SRC" --exclude=.venv --exclude=build --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -xf - -C "$work"
  fi
  echo "install: building blockcrypt"
  "$PREFIX/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work"
  whl=$(ls "$work"/dist/blockcrypt-*.whl)
  "$PREFIX/bin/python" -m pip install -q "$whl"                         # its dependencies, if missing
  "$PREFIX/bin/python" -m pip install -q --force-reinstall --no-deps "$whl"   # this build, always
  mkdir -p "$BINDIR" "$UNITDIR" "$PREFIX/share/doc/blockcrypt"
  ln -sfn "$PREFIX/bin/blockcrypt" "$BINDIR/blockcrypt"
  for u in "${UNITS[@]}"; do
    sed -e "s#/usr/local/bin/blockcrypt#$BINDIR/blockcrypt#g" -e "s#/opt/blockcrypt#$PREFIX#g" \
      "$SRC/systemd/$u" > "$work/$u"
    install -m 0644 "$work/$u" "$UNITDIR/$u"
  done
  install -m 0644 "$SRC/README.md" "$SRC"/docs/*.md "$PREFIX/share/doc/blockcrypt/"
  reload_systemd
  echo "install: blockcrypt $("$PREFIX/bin/blockcrypt" --version | awk '{print $NF}') in $PREFIX," \
       "$BINDIR/blockcrypt, units in $UNITDIR"
}

do_uninstall() {
  if [ -L "$BINDIR/blockcrypt" ] && [ "$(readlink "$BINDIR/blockcrypt")" = "$PREFIX/bin/blockcrypt" ]; then
    rm -f "$BINDIR/blockcrypt"
  fi
  for u in "${UNITS[@]}"; do rm -f "$UNITDIR/$u"; done
  if [ -e "$MARKER" ]; then
    rm -rf "$PREFIX"
  elif [ -e "$PREFIX" ]; then
    echo "uninstall: $PREFIX was not made by make install (no $MARKER); left alone" >&2
  fi
  reload_systemd
  echo "uninstall: done (state directories and vaults are kept)"
}

case "${1:-}" in
  install) do_install ;;
  uninstall) do_uninstall ;;
  *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
