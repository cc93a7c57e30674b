# One image for every FedMUD deployment role: SuperLink, SuperNode, the run submitter, TensorBoard
# (deploy/entrypoint.sh picks the role).
#
#   docker build -t fedmud .                                        # base: python:3.11-slim
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t fedmud .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t fedmud:cpu .
#
# torch comes from the default PyPI index, which is a CUDA build (about 6 GB of wheels; torch 2.14's
# is CUDA 13.0, which needs NVIDIA driver >= 580 on a GPU host, see docs/deployment.md): the same
# image trains on CPU and, when the container is given an NVIDIA GPU (docker-compose.gpu.yml), on CUDA.
# TORCH_INDEX_URL installs torch and torchvision from another index first, e.g. PyTorch's CPU-only
# wheels (a much smaller image, no GPU support); the rest still comes from PyPI.
ARG BASE_IMAGE=python:3.11-slim

# The dependency list alone, so that the large layer below is rebuilt only when it changes, not
# when any other line of pyproject.toml (or the code) does.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_HOME=/root/.flwr \
    # Flower 1.39 would otherwise `uv sync` a fresh environment (PyTorch included) for every run.
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

RUN python -m venv "$VIRTUAL_ENV"
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
# Empty (the default): torch from PyPI (CUDA build). Else torch/torchvision, with the project's
# version bounds, from that index (https://download.pytorch.org/whl/cpu: CPU-only).
ARG TORCH_INDEX_URL=
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^(torch|torchvision)[<>=!~ ]' /tmp/requirements.txt > /tmp/torch.txt && \
        pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt; \
    fi && \
    pip install -r /tmp/requirements.txt

# The project. Its sources also stay in /app: `flwr run .` builds the Flower app bundle from here.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedmud ./fedmud
COPY server ./server
COPY fedmud_wire ./fedmud_wire
COPY client ./client
COPY configs ./configs
COPY deploy/entrypoint.sh deploy/fedmud_deploy.py deploy/preflight.py ./deploy/
RUN pip install --no-deps . && rm -rf build *.egg-info

ENTRYPOINT ["/app/deploy/entrypoint.sh"]
CMD ["help"]
