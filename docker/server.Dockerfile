# Policy server: `latentpi serve`. The GPU image (default, JAX_CUDA=cuda12) needs the NVIDIA container
# runtime (compose.yaml reserves a GPU); `--build-arg JAX_CUDA=` makes the CPU image (tiny configs,
# the compose smoke run). BASE: any Debian-like image with Python 3.11 (python:3.11-slim, or the
# local debootstrap base of scripts/make_base_image.sh where Docker Hub is out of reach).
# Built by scripts/docker_build.sh or compose; docs/deploy.md has the sizes and build times.
ARG BASE=python:3.11-slim

# ---- build stage: uv, the lock's packages into /opt/venv (nothing of it but the venv is kept) ----
FROM ${BASE} AS build
ARG JAX_CUDA=cuda12
ARG UV_VERSION=0.13.9
ENV VENV=/opt/venv PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 UV_NO_EDITABLE=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy \
    LATENTPI_JAX_CUDA=${JAX_CUDA} LATENTPI_SKIP_APT=1
# docker/certs/*.crt: a TLS-intercepting proxy's CA, trusted here only (empty by default).
COPY docker/certs/ /usr/local/share/ca-certificates/latentpi/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN update-ca-certificates >/dev/null 2>&1; \
    python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}" \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
WORKDIR /app
# 1. Dependencies, from the lock and the install script only (stub sources): this layer is reused
#    until uv.lock, a pyproject.toml or the script changes.
COPY pyproject.toml uv.lock ./
COPY protocol/pyproject.toml protocol/
COPY server/pyproject.toml server/
COPY client/pyproject.toml client/
COPY scripts/install.sh scripts/
RUN mkdir -p protocol/src/latentpi server/src/latentpi \
    && PYTHON="$(command -v python3.11)" scripts/install.sh server \
    && rm -rf /root/.cache
# 2. The sources: only the two members are reinstalled (seconds).
COPY protocol/src protocol/src
COPY server/src server/src
RUN uv pip install --quiet --python "$VENV/bin/python" --no-deps --reinstall ./protocol ./server \
    && rm -rf /root/.cache \
    && "$VENV/bin/latentpi" serve --help >/dev/null

# ---- runtime: the base, a user, the venv ----
FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/latentpi \
    OPENPI_DATA_HOME=/cache/openpi LATENTPI_COMPILE_CACHE=/cache/xla
# uid 1000; HOME is writable by any uid so `--user`/compose `user:` may pick another one.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/latentpi --shell /bin/bash latentpi \
    && chmod 1777 /home/latentpi \
    && mkdir -p /cache/openpi /cache/xla && chown -R latentpi:latentpi /cache
COPY --from=build /opt/venv /opt/venv
USER latentpi
WORKDIR /home/latentpi
# openpi's checkpoint cache and the XLA compile cache: mount volumes here to keep downloaded weights
# and compiled programs across restarts (compose.yaml does).
VOLUME /cache/openpi /cache/xla
EXPOSE 8000
# /healthz: 503 while the model loads and compiles (minutes for pi0_libero), 200 once serving.
# $LATENTPI_PORT: the port probed (8000, the entrypoint's; a later `--port P` in the command wins,
# so set both, as compose.cpu.yaml does with host networking).
ENV LATENTPI_PORT=8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LATENTPI_PORT', '8000'), timeout=4).status != 200)"]
ENTRYPOINT ["latentpi", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "pi0_libero"]
