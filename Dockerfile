# syntax=docker/dockerfile:1
# The toposerve image: one image, entrypoint `toposerve` with the subcommands `run` (operator),
# `router`, `mock-engine` (and the health agent to come). Debian bookworm's python3 in a venv
# at /opt/toposerve, dependencies pinned with hashes (hack/image/requirements.txt), user 65532.
# `make image` builds the same image without a Docker engine (hack/image/build.sh, mmdebstrap).
#
#   docker build -t ghcr.io/toposerve/toposerve:0.1.0 .

# Wheels: every pinned dependency (checked against its hash) and toposerve itself.
FROM python:3.11-slim-bookworm AS wheels
WORKDIR /src
COPY hack/image/requirements.txt /wheels/requirements.txt
RUN pip wheel --no-cache-dir --require-hashes --only-binary=:all: -r /wheels/requirements.txt -w /wheels
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
COPY hack/image/install.sh /tmp/install.sh
RUN --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels sh /tmp/install.sh /tmp/wheels && rm /tmp/install.sh
ENV PATH=/opt/toposerve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /
ENTRYPOINT ["toposerve"]
CMD ["--help"]
