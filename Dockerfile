# purge-worker image. The worker is installed into a virtual environment in the build stage and
# only that environment is copied: no wheels, compilers or pip caches in the final layers.
#
# Pin the base image by digest for reproducible builds:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/purge-worker
COPY requirements.lock pyproject.toml README.md ./
COPY worker ./worker
# Dependencies exactly as locked, each checked against its hash (`make lock` writes the lock);
# then the worker itself, which adds none. They include kafka-python's C CRC (crc32c).
RUN /opt/purge-worker/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
    && /opt/purge-worker/bin/pip install --no-cache-dir --no-deps . \
    && /opt/purge-worker/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="purge-worker" \
      org.opencontainers.image.description="Kafka content events in, Cloudflare cache purges out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/purge-worker/purge-worker"
# Bytecode is not written at run time, so the root filesystem can be mounted read-only.
ENV PATH=/opt/purge-worker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/purge-worker /opt/purge-worker
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --shell /usr/sbin/nologin worker
USER 10001:10001
EXPOSE 9464 8080
ENTRYPOINT ["purge-worker"]
CMD ["run", "-c", "/etc/purge-worker/config.yaml"]
