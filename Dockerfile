# mcsproxy: the gateway and the controller in one image (`mcsproxy gateway|controller`).
#
#   docker build -t mcsproxy:0.1.0 .
#
# Runs as a non-root user and writes nothing outside /tmp, so it works with
# readOnlyRootFilesystem (deploy/ mounts an emptyDir on /tmp). Dependencies are installed
# at the exact versions in deploy/constraints.txt, and the package is built (mypyc) by the
# exact pip, setuptools and mypy in deploy/build-constraints.txt.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for mypyc, which compiles the data path (setup.py); the runtime stage gets
# the built extension modules only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY deploy/constraints.txt deploy/build-constraints.txt deploy/
# The base image's pip may predate --build-constraint (pip 25.3): the pinned one first.
RUN python -m venv /opt/mcsproxy \
 && /opt/mcsproxy/bin/pip install -c deploy/build-constraints.txt pip \
 && /opt/mcsproxy/bin/pip install -r deploy/constraints.txt
COPY pyproject.toml setup.py README.md ./
COPY mcsproxy mcsproxy
COPY controlplane controlplane
# A regular (not editable) install; pip compiles the bytecode here, so nothing is written
# at run time. `pip check` fails the build if pyproject.toml needs a package or version
# that deploy/constraints.txt does not provide. The last check fails the build if the
# data path did not come out compiled. pip and setuptools leave the venv last: nothing
# imports them at run time, and the image is 25 MB smaller with no installer in it.
RUN /opt/mcsproxy/bin/pip install --no-deps --build-constraint deploy/build-constraints.txt . \
 && /opt/mcsproxy/bin/pip check \
 && /opt/mcsproxy/bin/mcsproxy --help >/dev/null \
 && cd / && /opt/mcsproxy/bin/python -c 'import mcsproxy.compiled as c; assert c.STATE == "compiled", c.REASON' \
 && /opt/mcsproxy/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/mcsproxy/bin/python -c 'import mcsproxy.cli, mcsproxy.vip, controlplane.command, kubernetes_asyncio.client'

FROM python:3.11-slim-bookworm
# A fixed UID/GID so the manifests can state runAsUser/runAsGroup (65532, as distroless).
RUN groupadd --system --gid 65532 mcsproxy \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin mcsproxy
COPY --from=build /opt/mcsproxy /opt/mcsproxy
ENV PATH=/opt/mcsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /tmp
# DNS (UDP and TCP), gateway admin, controller stream/metrics.
EXPOSE 5353/udp 5353/tcp 9901/tcp 9902/tcp
ENTRYPOINT ["mcsproxy"]
CMD ["--help"]
