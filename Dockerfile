# syntax=docker/dockerfile:1
# runner: the image behind deploy/aws/runner-spot.yaml (and any other host).
#
#   docker build -t runner .
#   docker run --rm --gpus all --stop-timeout 120 \
#     -e RUNNER_BUCKET=s3://my-bucket/runs -e RUNNER_RUN_ID=exp1 \
#     runner -- python -m runner.examples.voice
#
# Everything after the image name goes to `runner start` (the ENTRYPOINT), so
# `-- COMMAND...` is the training command. --stop-timeout 120: `docker stop`
# (and a host shutting down) sends SIGTERM, then waits this long before SIGKILL;
# Docker's default of 10 s is too short to commit an emergency snapshot.
#
# Reproducible: the base image is pinned by tag (add @sha256:... for bit-for-bit
# rebuilds), tini by its Debian version, and every Python package by
# constraints.txt (scripts/constraints writes it from the tested .venv; it covers
# the extras too). For a Hugging Face Trainer or Lightning job:
#   docker build --build-arg EXTRAS=transformers,lightning -t runner .
#
# CUDA: the default PyPI torch wheel for linux x86_64 is a CUDA build; its CUDA
# libraries come as nvidia-* wheels (pinned in constraints.txt), so the image
# needs only the host's NVIDIA driver (`--gpus all`) and runs on a CPU-only host
# too. For a much smaller CPU-only image build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# Dependencies first (a layer that survives source edits), torch from TORCH_INDEX_URL.
RUN grep -E '^(torch|torchaudio)==' constraints.txt > torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
       -c constraints.txt -r torch.txt
COPY pyproject.toml README.md ./
COPY runner ./runner
RUN pip install -c constraints.txt ".${EXTRAS:+[${EXTRAS}]}" && pip check

FROM ${PYTHON_IMAGE}
# tini as PID 1: reaps zombies and forwards SIGTERM to its child, `runner start`.
# Without -g on purpose: the signal must reach the supervisor only. It runs the
# training in a process group of its own and answers a SIGTERM by asking the
# training for an emergency snapshot, then stopping it; a SIGTERM sent straight
# to the training (what -g would do if they shared a group) would skip the save.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN groupadd --gid 10001 runner \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin runner
USER 10001:10001
WORKDIR /home/runner
# RUNNER_GRACE_SECONDS: time to save after a bare SIGTERM (`docker stop`), inside --stop-timeout 120.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RUNNER_GRACE_SECONDS=100
STOPSIGNAL SIGTERM
# Cheap: reads /proc, no torch import, no network (runner/health.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "runner.health"]
ENTRYPOINT ["tini", "--", "runner", "start"]
