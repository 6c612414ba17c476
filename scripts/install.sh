#!/usr/bin/env bash
# Install or uninstall chatd system-wide: scripts/install.sh install|uninstall
#
# What goes where (PREFIX defaults to /usr/local; DESTDIR, if set, is put in
# front of every path, for staging and packaging):
#
#   $PREFIX/lib/chatd/                 a virtual environment holding chatd and
#                                      its dependencies, from the package registry
#   $PREFIX/bin/chatd, chatctl, chat-client
#                                      symbolic links into it
#   $PREFIX/share/man/man8/chatd.8, chatctl.8; man5/chatd.yaml.5; man1/chat-client.1
#   $PREFIX/lib/systemd/system/chatd.service, chatd.socket, chatd-forking.service
#                                      with @BINDIR@ replaced by $PREFIX/bin
#   $PREFIX/share/doc/chatd/chatd.yaml the documented example configuration
#   /etc/chatd/chatd.yaml              the example with runtime_dir: /run/chatd,
#                                      only if no such file exists
#
# A virtual environment keeps chatd's dependencies away from the system's
# Python packages (Debian forbids pip there, PEP 668). Under DESTDIR it is
# built in place and then relocated: its scripts are rewritten to name the
# final path. The interpreter (PYTHON, default python3) must stay readable by
# the service's transient user: not under /root or /home, which the units
# hide (ProtectHome=yes). `uninstall` removes all of the above except
# /etc/chatd/chatd.yaml, which is the administrator's.
set -euo pipefail

usage() {
    echo "usage: [PREFIX=/usr/local] [DESTDIR=] [PYTHON=python3] [MANDIR=] [UNITDIR=]" \
         "$0 install|uninstall" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
action=$1

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
[[ $PREFIX == /* ]] || { echo "install.sh: PREFIX must be an absolute path" >&2; exit 2; }
PREFIX=${PREFIX%/}

bindir=$PREFIX/bin
libdir=$PREFIX/lib/chatd
mandir=${MANDIR:-$PREFIX/share/man}
# systemd looks in /usr/lib/systemd/system and /usr/local/lib/systemd/system; for
# another PREFIX, give UNITDIR=/etc/systemd/system (to uninstall too)
unitdir=${UNITDIR:-$PREFIX/lib/systemd/system}
docdir=$PREFIX/share/doc/chatd
confdir=/etc/chatd
commands=(chatd chatctl chat-client)
units=(chatd.service chatd.socket chatd-forking.service chatd@.service)
marker=.installed-by-chatd  # uninstall removes $libdir only when it finds this

say() { echo "install.sh: $*"; }

# the man pages that exist in the tree, as "section/file"
man_pages() {
    local page
    for page in chatd.8 chatctl.8 chatd.yaml.5 chat-client.1; do
        [[ -f $src/man/$page ]] && echo "man${page##*.}/$page"
    done
    return 0
}

systemd_running() { [[ -z $DESTDIR && -d /run/systemd/system ]]; }

build_dir=""
trap 'rm -rf "$build_dir"' EXIT

install_package() {
    local venv=$DESTDIR$libdir python_real file command
    python_real=$(command -v "$PYTHON") || { echo "install.sh: no $PYTHON" >&2; exit 1; }
    python_real=$(readlink -f "$python_real")
    case $python_real in
        /root/* | /home/*)
            say "warning: $python_real is under /root or /home, which chatd.service hides" \
                "(ProtectHome=yes); install with PYTHON=/usr/bin/python3" ;;
    esac
    if [[ -x $venv/bin/python && -f $venv/$marker ]]; then
        say "upgrading $libdir"
    else
        say "creating $libdir with $PYTHON"
        "$PYTHON" -m venv "$venv"
        touch "$venv/$marker"
    fi
    # build from a copy: pip must not leave build/ and *.egg-info in the tree
    build_dir=$(mktemp -d)
    local sources=(pyproject.toml chatd)
    for file in "$src"/README* "$src"/LICENSE*; do
        [[ -e $file ]] && sources+=("${file##*/}")
    done
    tar -C "$src" --exclude=__pycache__ -cf - "${sources[@]}" | tar -C "$build_dir" -xf -
    say "installing chatd and its dependencies into $libdir"
    local compile=()
    [[ -n $DESTDIR ]] && compile=(--no-compile)  # compiled below, for the final path
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-warn-script-location "${compile[@]}" "$build_dir"
    if [[ -n $DESTDIR ]]; then  # relocate: the scripts must name the final interpreter
        { grep -rlF --null "$venv" "$venv/bin" "$venv/pyvenv.cfg" || true; } |
            xargs -0 -r sed -i "s|$venv|$libdir|g"
        # and the compiled modules their final path, or tracebacks would name
        # the staging directory (ensurepip compiled pip's under DESTDIR too)
        "$venv/bin/python" -m compileall -q -f -d "$libdir/lib" "$venv/lib" >/dev/null ||
            say "warning: some modules did not compile; Python compiles them when first imported"
    fi
    mkdir -p "$DESTDIR$bindir"
    for command in "${commands[@]}"; do
        ln -sfn "$libdir/bin/$command" "$DESTDIR$bindir/$command"
    done
}

install_files() {
    local page unit
    for page in $(man_pages); do
        install -D -m 0644 "$src/man/${page#*/}" "$DESTDIR$mandir/$page"
    done
    mkdir -p "$DESTDIR$unitdir"
    for unit in "${units[@]}"; do
        sed "s|@BINDIR@|$bindir|g" "$src/systemd/$unit" > "$DESTDIR$unitdir/$unit"
        chmod 0644 "$DESTDIR$unitdir/$unit"
    done
    install -D -m 0644 "$src/etc/chatd.yaml" "$DESTDIR$docdir/chatd.yaml"
    if [[ -e $DESTDIR$confdir/chatd.yaml ]]; then
        say "keeping the existing $confdir/chatd.yaml (the example is $docdir/chatd.yaml)"
    else
        # the units run chatd unprivileged, with /run/chatd as RuntimeDirectory=
        grep -q '^runtime_dir: null$' "$src/etc/chatd.yaml" || {
            echo "install.sh: etc/chatd.yaml has no 'runtime_dir: null' line to set" >&2
            exit 1
        }
        install -d -m 0755 "$DESTDIR$confdir"
        sed 's|^runtime_dir: null$|runtime_dir: /run/chatd|' "$src/etc/chatd.yaml" \
            > "$DESTDIR$confdir/chatd.yaml"
        chmod 0644 "$DESTDIR$confdir/chatd.yaml"
    fi
}

do_install() {
    install_package
    install_files
    if systemd_running; then
        systemctl daemon-reload
    fi
    say "done. Start it with: systemctl enable --now chatd (or chatd.socket); see chatd(8)"
}

do_uninstall() {
    local command page unit
    for command in "${commands[@]}"; do
        # only our own links: never a chatd installed by something else
        if [[ -L $DESTDIR$bindir/$command &&
              $(readlink "$DESTDIR$bindir/$command") == "$libdir/bin/$command" ]]; then
            rm -f "$DESTDIR$bindir/$command"
        fi
    done
    if [[ -f $DESTDIR$libdir/$marker ]]; then
        rm -rf "${DESTDIR:?}$libdir"
    elif [[ -e $DESTDIR$libdir ]]; then
        say "leaving $libdir: not made by this script"
    fi
    for page in chatd.8 chatctl.8 chatd.yaml.5 chat-client.1; do
        rm -f "$DESTDIR$mandir/man${page##*.}/$page"
    done
    for unit in "${units[@]}"; do
        rm -f "$DESTDIR$unitdir/$unit"
    done
    rm -f "$DESTDIR$docdir/chatd.yaml"
    rmdir "$DESTDIR$docdir" 2>/dev/null || true
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [[ -e $DESTDIR$confdir/chatd.yaml ]]; then
        say "kept $confdir/chatd.yaml: remove it yourself if you no longer need it"
    fi
}

case $action in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) usage ;;
esac
