# Stand-in for the official postgres image, for scripts/docker_smoke.py only: where no container registry
# is reachable it is built from the local Debian base with Debian's PostgreSQL. It honours the same
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB variables and data folder as the official image.
ARG BASE_IMAGE=localhost/debian-python:bookworm
FROM ${BASE_IMAGE}
# Unpinned on purpose: a throw-away test double that takes whatever bookworm ships today.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
COPY docker/smoke/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
