# hasync's container image: the agent and what it needs at run time, nothing else (no compiler, no pip, no
# test tools; nothing is fetched at start). Build:
#
#   DOCKER_BUILDKIT=1 docker build -t hasync .
#   DOCKER_BUILDKIT=1 docker build --build-arg BASE=my-debian:bookworm -t hasync .     # any local Debian base
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t hasync .
#                                      # a TLS-intercepting proxy: pip trusts that bundle, it is not kept
# Run (README: "Install"): host network, the configuration read-only in /etc/hasync, state in /data:
#
#   docker run -d --name hasync --network host -v /etc/hasync:/etc/hasync:ro -v hasync-data:/data hasync
#
# A floating-IP hook needs root and NET_ADMIN (addresses) and NET_RAW (gratuitous ARP):
#   --user 0 --cap-add NET_ADMIN --cap-add NET_RAW
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv binutils >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md LICENSE /src/
COPY hasync /src/hasync
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -m venv /opt/hasync \
    && /opt/hasync/bin/pip install -q --no-cache-dir --disable-pip-version-check /src \
    && /opt/hasync/bin/pip uninstall -q -y pip setuptools \
    && rm -rf /opt/hasync/bin/activate* /opt/hasync/bin/Activate.ps1 \
    && find /opt/hasync -name '*.so' -exec strip --strip-unneeded {} +
# (strip: the wheels' extension modules carry symbol tables the agent never reads; a third of their size)

FROM ${BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="hasync" \
      org.opencontainers.image.description="High availability for Home Assistant: leader election over MQTT, fenced roles, failover hooks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3: the interpreter the virtual environment was made with (the same base, so the same version);
# tini: PID 1, reaps the hooks' children and forwards SIGTERM; ca-certificates for mqtts:// and https://.
# Hooks that need more tools (ip, systemctl...) need an image of your own: FROM hasync, USER root, apt-get.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       python3 tini ca-certificates >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && groupadd --system --gid 10001 hasync \
    && useradd --no-log-init --system --uid 10001 --gid hasync --home-dir /data --shell /usr/sbin/nologin hasync \
    && install -d -o hasync -g hasync -m 0750 /data \
    && install -d -m 0755 /etc/hasync
COPY --from=build /opt/hasync /opt/hasync
ENV PATH=/opt/hasync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HASYNC_EVENTS_FILE=/data/events.jsonl
USER hasync
WORKDIR /data
VOLUME ["/data"]
STOPSIGNAL SIGTERM
# /healthz on the agent's own HTTP port (http.port from the configuration or HASYNC_HTTP_PORT).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["hasync", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "hasync"]
CMD ["agent"]
