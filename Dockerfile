# sdswarm in a container: the way to train from Windows (Docker Desktop with the WSL2 backend) or any Linux host
# with an NVIDIA GPU, without setting up Python.
#
#   docker build -t sdswarm .
#   docker run --gpus all -v "$PWD/output:/work/output" -p 8765:8765 -p 31337:31337 \
#       sdswarm join 203.0.113.7:8765 --set train.batch_size=4
#   docker run --rm -v "$PWD/output:/work/output" sdswarm mother configs/tiny.yaml    # the CPU demo
#
# Ports (publish the ones your node's settings use; see `sdswarm settings` and the README's relay settings):
#   8765/tcp   the information exchange (I.E) and the web UI (settings key ie_port_internal)
#   31337/tcp  hivemind's DHT and averaging traffic (dht_port_internal)
# A relay inside a container must listen on all interfaces and announce the host's public address:
#   docker run ... sdswarm settings --output /work/output mode=relay listen_host=0.0.0.0 public_address=HOST_IP \
#       ie_port_internal=8765 dht_port_internal=31337
# Behind NAT (most homes), run as a client instead: mode=client; no port needs to be published.
# Keep /work/output on a volume: checkpoints, samples, metrics, the node's identity and settings live there.
# Model downloads land in /root/.cache (mount it too, to download SD 1.5 only once).

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from PyTorch's CUDA 12.8 index, pinned like the rest of the stack (the Makefile's TORCH variable)
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"

WORKDIR /work
# the pinned stack (pyproject.toml) in its own layer: source edits do not reinstall it
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[tensorboard]" "$TORCH"
COPY configs ./configs
COPY server.py ./

EXPOSE 8765 31337
VOLUME ["/work/output"]
ENTRYPOINT ["sdswarm"]
CMD ["--help"]
