# GPU policy server: `latentpi serve`. Needs the NVIDIA container runtime (compose.yaml reserves a GPU).
FROM python:3.11-slim
ENV VENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LATENTPI_JAX_CUDA=cuda12
WORKDIR /app
# The whole workspace (see .dockerignore): uv installs this side's member from the lock.
COPY . .
RUN pip install --no-cache-dir uv && scripts/install.sh server && rm -rf /root/.cache
# openpi's checkpoint cache: mount a volume here to keep downloaded weights across restarts.
ENV OPENPI_DATA_HOME=/cache/openpi
VOLUME /cache/openpi
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
ENTRYPOINT ["latentpi", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "pi0_libero"]
