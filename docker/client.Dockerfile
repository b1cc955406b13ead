# lmaas client: `lmaas tune|info|eval` against a server; slim, no torch.
#
#   docker build -f docker/client.Dockerfile -t lmaas-client .
#   docker run --rm -e LMAAS_SERVER=http://host:8000 -e LMAAS_API_KEY=lmaas_... -v "$PWD/runs:/work/runs" \
#       lmaas-client tune --task sst2 --method bbt --budget 8000 --out runs/sst2-bbt
#
# As for the server image, wheels in docker/wheels/ make the build offline.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /src
COPY docker/wheels/ /wheels/
COPY requirements.lock ./
COPY shared/protocol/ shared/protocol/
COPY client/ client/
RUN python3 -m venv /opt/lmaas \
    && if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
       else set -- ; fi \
    && /opt/lmaas/bin/pip install --no-cache-dir "$@" -c requirements.lock ./shared/protocol ./client \
    && /opt/lmaas/bin/lmaas --help >/dev/null

FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eu", "-c"]
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin lmaas \
    && mkdir -p /work \
    && chown lmaas:lmaas /work
COPY --from=build /opt/lmaas /opt/lmaas
# The shipped tasks' few-shot splits: `--task sst2` works without mounting anything.
COPY --chown=lmaas:lmaas data/ /opt/lmaas-data/
ENV PATH=/opt/lmaas/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LMAAS_DATA_DIR=/opt/lmaas-data \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["lmaas"]
CMD ["--help"]
