#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the tier conformance suite (disk, and S3 against
# a real Ceph RGW on loopback), and the integration tests that start the real larderd binary.
#
# Unless AWS_ENDPOINT_URL and S3_BUCKET are already set, this starts a throw-away RGW with
# scripts/s3-server.sh (installing it from Debian on first use, which needs root and apt) and
# stops it afterwards. LARDER_TEST_S3=skip runs without S3; the S3 tests then print SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins --tests

# REDbot, the outside HTTP referee of crates/larderd/tests/redbot.rs, from PyPI into a venv of
# its own (pinned; Debian's Python refuses system-wide pip installs). A failed install is not
# fatal here: the test then prints SKIPPED, or fails when CI is set.
REDBOT_VERSION=2.7.1
redbot_venv=$PWD/target/redbot-venv
if [ -z "${LARDER_REDBOT:-}" ] && [ ! -f "$redbot_venv/.redbot-$REDBOT_VERSION" ]; then
  rm -rf "$redbot_venv"
  if ! python3 -m venv "$redbot_venv" >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    # Debian ships venv's pip bootstrap separately.
    rm -rf "$redbot_venv"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv; } >&2 || true
    python3 -m venv "$redbot_venv" || true
  fi
  if "$redbot_venv/bin/pip" install -q --disable-pip-version-check "redbot==$REDBOT_VERSION"; then
    touch "$redbot_venv/.redbot-$REDBOT_VERSION"
  else
    echo "warning: could not install REDbot $REDBOT_VERSION; its test will skip (or fail under CI)" >&2
  fi
fi
if [ -z "${LARDER_REDBOT:-}" ] && [ -f "$redbot_venv/.redbot-$REDBOT_VERSION" ]; then
  export LARDER_REDBOT=$redbot_venv/bin/redbot
fi

# From Debian when missing (needs root and apt), in one apt run: strace, under which
# crates/larderd/tests/disk_tier.rs runs larderd to see its fsyncs and to make them fail; ccache
# with gcc, and Gradle (4.4 with its JRE), the real clients of crates/larderd/tests/build_caches.rs.
# Not fatal here either: those tests then print SKIPPED, or fail when CI is set.
missing=()
command -v strace >/dev/null || missing+=(strace)
command -v ccache >/dev/null || missing+=(ccache)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v gradle >/dev/null || missing+=(gradle)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2 ||
    echo "warning: could not install ${missing[*]}; the tests that need them will skip (or fail under CI)" >&2
fi

# Bazel, turbo and nx, the build tools distributed through npm, pinned in scripts/npm-tools
# (LARDER_BAZEL, LARDER_TURBO, LARDER_NX name them for the tests). Not fatal either.
if npm_tools=$(scripts/install-npm-tools.sh); then
  eval "$npm_tools"
else
  echo "warning: could not install the npm build tools; the tests that need them will skip (or fail under CI)" >&2
fi

if [ -z "${AWS_ENDPOINT_URL:-}" ] && [ "${LARDER_TEST_S3:-}" != skip ]; then
  s3_dir="$PWD/target/s3-test"
  port=${LARDER_TEST_S3_PORT:-9100}
  if [ -f "$s3_dir/run/s3.pid" ] && kill -0 "$(cat "$s3_dir/run/s3.pid")" 2>/dev/null; then
    scripts/s3-server.sh stop "$s3_dir"
  fi
  set -a
  eval "$(scripts/s3-server.sh --port "$port" --data-dir "$s3_dir" --bucket larder-test)"
  set +a
  trap 'scripts/s3-server.sh stop "$s3_dir" >/dev/null 2>&1 || true' EXIT
fi

cargo test --locked --workspace "$@"

# The git features must work with every git a CI machine may have: run the git tests (the
# library, the server's generator and the client's restore) again with the system's git when it
# is another version than the one first on PATH.
other_git=/usr/bin/git
if [ $# -eq 0 ] && [ -x "$other_git" ] && [ "$("$other_git" --version)" != "$(git --version)" ]; then
  echo "== git tests again with $("$other_git" --version)"
  LARDER_GIT=$other_git cargo test --locked -p larder-git
  # `--workspace --test git` (larderd's and the client's), not `-p`: the same feature set as the
  # run above, so nothing is compiled again.
  LARDER_GIT=$other_git cargo test --locked --workspace --test git
fi
