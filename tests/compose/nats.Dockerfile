# Stand-in for the official nats image where no registry is reachable: Debian's nats-server, and wget for the
# compose file's healthcheck. Built by the compose test (tests/compose/override.yml).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server wget \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["nats-server"]
