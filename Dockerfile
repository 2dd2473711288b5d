# purge-worker image: build wheels in one stage, install them into a clean slim image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# No compilers or package caches in the final image; bytecode is not written at run time, so
# the root filesystem can be mounted read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --shell /usr/sbin/nologin worker
USER 10001:10001
EXPOSE 9464 8080
ENTRYPOINT ["purge-worker"]
CMD ["run", "-c", "/etc/purge-worker/config.yaml"]
