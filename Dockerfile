# syntax=docker/dockerfile:1
# mrrt-gateway container image.
#
#   docker build -t mrrt-gateway .
#   docker run --rm -p 8000:8000 --stop-timeout 30 \
#     -v "$PWD/config/gateway.yaml:/etc/gateway/gateway.yaml:ro" \
#     -e GATEWAY_OIDC__CLIENT_SECRET -e GATEWAY_SESSION__SECRET_KEY \
#     mrrt-gateway
#
# The config is read from /etc/gateway/gateway.yaml (GATEWAY_CONFIG); without a file, every key
# can come from GATEWAY_* variables (`__` nests; GATEWAY_ROUTES takes a JSON list). Secrets only
# ever come from the environment. The server listens on 0.0.0.0:$GATEWAY_SERVER__PORT (8000).
# `docker stop` sends SIGTERM: in-flight requests get server.graceful_timeout (20 s) to finish,
# so give the container a longer stop timeout than Docker's default 10 s.

# -- build: the wheel, then exactly the lock's runtime dependencies and the wheel, into a venv --
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY requirements/runtime.txt requirements/build.txt ./requirements/
COPY pyproject.toml README.md ./
COPY gateway/ ./gateway/
# pip refuses any file whose hash is not in the lock; hatchling comes from the lock too (no
# build isolation), and the wheel brings no dependency of its own choosing (--no-deps).
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes -r requirements/build.txt \
    && /opt/build/bin/python -m build --wheel --no-isolation --outdir /tmp/dist . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements/runtime.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip

# -- run: the venv on a clean slim base, as an unprivileged user ------------------------------
FROM python:3.11-slim

# The package's version (gateway/version.py; a test keeps the two equal).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mrrt-gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="Backend-for-frontend gateway: session cookies in, correctly-audienced bearer tokens out" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_SERVER__HOST=0.0.0.0 \
    GATEWAY_SERVER__PORT=8000

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway /srv/gateway

COPY --from=builder /opt/venv /opt/venv

WORKDIR /srv/gateway
USER 10001:10001
EXPOSE 8000

# No curl in slim images: the venv's Python asks /healthz (any non-2xx or error exits 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_SERVER__PORT', '8000'), timeout=4)"]

ENTRYPOINT ["gateway"]
CMD ["run"]
