#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that the pip-installed Triton pieces need but do not bundle.
#
#   libb64-0d          libb64.so.0d for tritonclient's perf_analyzer (the tritonserver from
#                      nvidia-pytriton bundles its own copy; perf_analyzer does not)
#   libpython3.X       only when the Python that serves the models has no shared libpython3.X.so.1.0
#                      (the python-backend stub links it); X is taken from $PYTHON (default: python3)
#
# Idempotent: does nothing when everything is present; runs `apt-get update` only when a package is
# missing and not installable from the current package lists. Without root (and without sudo) it prints
# the command to run instead and exits 1.
#
# Usage: tools/install_system_deps.sh            (PYTHON=/path/to/venv/bin/python to pick the interpreter)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
missing=()

have_lib() {  # have_lib SONAME [extra dir]: is SONAME known to the dynamic linker (or in the dir)?
    if [ -n "${2:-}" ] && [ -e "$2/$1" ]; then return 0; fi
    ldconfig -p 2>/dev/null | grep -q "^[[:space:]]*$1 " && return 0
    for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
        [ -e "$d/$1" ] && return 0
    done
    return 1
}

if ! have_lib libb64.so.0d; then
    missing+=(libb64-0d)
fi

if command -v "$PYTHON" >/dev/null 2>&1; then
    read -r pyver libdir < <("$PYTHON" -c 'import sys, sysconfig; print(f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_config_var("LIBDIR") or "")')
    if ! have_lib "libpython${pyver}.so.1.0" "$libdir"; then
        missing+=("libpython${pyver}")
    fi
else
    echo "note: $PYTHON not found; not checking for a shared libpython" >&2
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "system dependencies present"
    exit 0
fi

echo "missing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "not root: run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not available: install ${missing[*]} (or equivalents) with your package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# update the package lists only when some package is unknown to them (e.g. fresh containers)
need_update=0
for p in "${missing[@]}"; do
    if ! apt-cache show "$p" >/dev/null 2>&1; then need_update=1; fi
done
if [ "$need_update" -eq 1 ]; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "installed: ${missing[*]}"
