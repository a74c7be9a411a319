#!/usr/bin/env bash
# Installs the npm-distributed build tools the build-cache tests drive (Bazel, turbo, nx; pinned
# in scripts/npm-tools/package.json and its lock file) into target/npm-tools, installing Node.js
# and npm from Debian first when missing, and prints `export LARDER_BAZEL=… LARDER_TURBO=…
# LARDER_NX=…` lines for the tools it has, for `eval`.
#
# Offline once installed: a second run with the same lock file reuses the tree. npm's update
# notifier reaches the registry from inside builds; the tests turn it off, and so does this.
set -euo pipefail
cd "$(dirname "$0")/.."
export NPM_CONFIG_UPDATE_NOTIFIER=false NPM_CONFIG_FUND=false NPM_CONFIG_AUDIT=false
dest=$PWD/target/npm-tools
if ! command -v npm >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # Some apt sources' nodejs carries npm (and conflicts with Debian's npm package).
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs; } >&2
    command -v npm >/dev/null || apt-get install -y -qq --no-install-recommends npm >&2
  else
    echo "install-npm-tools: npm is missing and cannot be installed here" >&2
    exit 1
  fi
fi
stamp=$dest/.installed-$(sha256sum scripts/npm-tools/package-lock.json | cut -c1-16)
if [ ! -f "$stamp" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  cp scripts/npm-tools/package.json scripts/npm-tools/package-lock.json "$dest/"
  # `npm ci`: exactly the lock file. nx's postinstall only prints a banner; scripts stay off.
  (cd "$dest" && npm ci --ignore-scripts --no-progress --loglevel=error) >&2
  touch "$stamp"
fi
bazel=$(ls "$dest"/node_modules/@bazel/bazel-linux_x64/bazel-*-linux-x86_64 2>/dev/null | head -1)
[ -n "$bazel" ] && echo "export LARDER_BAZEL=$bazel"
[ -x "$dest/node_modules/.bin/turbo" ] && echo "export LARDER_TURBO=$dest/node_modules/.bin/turbo"
[ -x "$dest/node_modules/.bin/nx" ] && echo "export LARDER_NX=$dest/node_modules/.bin/nx"
exit 0
