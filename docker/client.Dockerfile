# LIBERO client: `latentpi collect` / `latentpi analyze` on CPU (no JAX), headless rendering through
# Mesa's EGL (software). With Ray (RAY=1, default) the same image is a Ray head or worker node for
# `collect --backend ray` (compose profile `ray`). BASE: as docker/server.Dockerfile.
# TORCH_INDEX: where the CPU torch comes from (PyTorch's CPU index; scripts/docker_build.sh serves a
# local wheel on loopback where that index is out of reach).
ARG BASE=python:3.11-slim

# ---- build stage: uv, the lock's packages, LIBERO and its assets into /opt/venv ----
FROM ${BASE} AS build
ARG UV_VERSION=0.13.9
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG RAY=1
ENV VENV=/opt/venv UV_PROJECT_ENVIRONMENT=/opt/venv PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 UV_NO_EDITABLE=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy \
    TORCH_INDEX=${TORCH_INDEX} LATENTPI_SKIP_APT=1
# docker/certs/*.crt: a TLS-intercepting proxy's CA, trusted here only (empty by default).
COPY docker/certs/ /usr/local/share/ca-certificates/latentpi/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN update-ca-certificates >/dev/null 2>&1; \
    python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}" \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
WORKDIR /app
# 1. Dependencies (the lock's, LIBERO 0.1.1 + assets, CPU torch), from the lock and the install
#    scripts only (stub sources): reused until uv.lock, a pyproject.toml or a script changes.
COPY pyproject.toml uv.lock ./
COPY protocol/pyproject.toml protocol/
COPY server/pyproject.toml server/
COPY client/pyproject.toml client/
COPY scripts/install.sh scripts/wire_libero.py scripts/
RUN mkdir -p protocol/src/latentpi client/src/latentpi \
    && PYTHON="$(command -v python3.11)" scripts/install.sh client \
    && if [ "$RAY" = 1 ]; then \
         uv sync --frozen --inexact --quiet --package latentpi-client --extra sim --extra ray \
         && "$VENV/bin/python" -c "import ray"; \
       fi \
    && test ! -e .venv \
    && rm -rf /root/.cache
# 2. The sources: only the two members are reinstalled (seconds).
COPY protocol/src protocol/src
COPY client/src client/src
RUN uv pip install --quiet --python "$VENV/bin/python" --no-deps --reinstall ./protocol ./client \
    && rm -rf /root/.cache \
    && "$VENV/bin/latentpi" collect --help >/dev/null

# ---- runtime: the base, Mesa's EGL/OSMesa (scripts/install.sh's APT_PACKAGES), a user, the venv ----
# + libopengl0: PyOpenGL's EGL platform loads libOpenGL.so.0 (development machines have it already).
FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/latentpi \
    MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 libopengl0 >/dev/null \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log
# uid 1000; HOME is writable by any uid so `--user`/compose `user:` may pick another one (the
# owner of the bind-mounted data folder).
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/latentpi --shell /bin/bash latentpi \
    && chmod 1777 /home/latentpi \
    && mkdir -p /data && chown latentpi:latentpi /data
COPY --from=build /opt/venv /opt/venv
USER latentpi
WORKDIR /home/latentpi
VOLUME /data
ENTRYPOINT ["latentpi"]
CMD ["collect", "--help"]
