# Stand-in for the official nginx image, for scripts/docker_smoke.py only (no registry reachable): Debian's
# nginx with the same conf.d layout, logging to the container's output.
ARG BASE_IMAGE=localhost/debian-python:bookworm
FROM ${BASE_IMAGE}
# Unpinned on purpose: a throw-away test double that takes whatever bookworm ships today.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
CMD ["nginx", "-g", "daemon off;"]
