# CPU LIBERO client: `latentpi collect` / `latentpi analyze` (no JAX). Headless rendering via EGL/OSMesa.
FROM python:3.11-slim
ENV VENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl \
    TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
# The whole workspace (see .dockerignore): uv installs this side's member from the lock.
COPY . .
RUN pip install --no-cache-dir uv && scripts/install.sh client && rm -rf /root/.cache /var/lib/apt/lists/*
VOLUME /data
ENTRYPOINT ["latentpi"]
CMD ["collect", "--help"]
