# syntax=docker/dockerfile:1
# One image per ORBION service, chosen by build argument:
#
#   docker build --build-arg SERVICE=gateway -t orbion-gateway .
#
# SERVICE is one of gateway, conversation, lead, llm-proxy, monitor. The image holds only
# libs/common (orbion-common, without its `[local]` extra: containers use real NATS, Postgres
# and Redis servers by URL) and services/$SERVICE, with the versions of
# requirements/constraints.txt. docs/deploy.md explains how the images are run.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve and build every wheel the service needs (pinned by constraints) ----
FROM ${PYTHON_IMAGE} AS builder
ARG SERVICE
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY libs/common libs/common
COPY services/${SERVICE} services/${SERVICE}
# A missing or misspelt SERVICE fails here, not at run time. --prefer-binary: every
# dependency ships manylinux wheels, so the final stage needs no compiler.
RUN test -n "${SERVICE}" && test -f "services/${SERVICE}/pyproject.toml" \
    && pip wheel --prefer-binary --wheel-dir /wheels \
        -c requirements/constraints.txt ./libs/common "./services/${SERVICE}"

# ---- runtime: the wheels installed offline, a non-root user, nothing else ----
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
LABEL org.opencontainers.image.title="orbion-${SERVICE}" \
      org.opencontainers.image.description="ORBION ${SERVICE} service" \
      org.opencontainers.image.source="services/${SERVICE}"
# ORBION_HOST: listen on every interface, the container's network is the boundary.
# ORBION_DATA_DIR: the one writable folder (a volume in compose and Kubernetes).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SERVICE=${SERVICE} \
    ORBION_HOST=0.0.0.0 \
    ORBION_DATA_DIR=/var/lib/orbion
RUN groupadd --system --gid 10001 orbion \
    && useradd --system --uid 10001 --gid orbion --no-create-home \
        --home-dir /var/lib/orbion --shell /usr/sbin/nologin orbion \
    && mkdir -p /var/lib/orbion \
    && chown orbion:orbion /var/lib/orbion
# Bind-mounted, not copied: the wheels never become a layer of the final image. Every wheel,
# dependencies included, is named on the command line, so nothing is looked up anywhere else.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl
USER 10001:10001
WORKDIR /var/lib/orbion
EXPOSE 8080 8081 8082 8083 8084
# Liveness only: the event loop answers. Readiness (NATS, Postgres, Redis) is /readyz, which
# compose and Kubernetes probe themselves. The port comes from the same settings the service reads.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; from orbion_common.settings import CommonSettings; urllib.request.urlopen('http://127.0.0.1:%d/livez' % CommonSettings().service_port(os.environ['SERVICE']), timeout=3)"]
# exec: `orbion` becomes PID 1 and receives SIGTERM itself (graceful drain in the service).
CMD ["sh", "-c", "exec orbion serve \"$SERVICE\""]
