# The controller image: `docker build -t gpu-provisioner .` (or `make image` where no Docker engine runs).
# The builder installs the project into a venv; the runtime is the base image with its installers removed
# and its layers flattened (a removal in a later layer only hides files), plus the venv, run as non-root.
FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies in a layer of their own, so that a change to the source rebuilds only the last layer.
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > requirements.txt \
 && /opt/venv/bin/pip install --requirement requirements.txt
COPY README.md ./
COPY gpu_provisioner ./gpu_provisioner
# A read-only root cannot cache bytecode at run time, so every module ships compiled, for PYTHONOPTIMIZE=2 (set
# below): without docstrings the imports take 5-6 MiB less memory. The level-0 bytecode pip wrote would never be read.
# The asyncio halves of the kubernetes client and of the Azure SDK clients, and aiohttp, which only they use, are
# never imported. The kubernetes client's generated API and model modules (33 MB of source) ship as bytecode only:
# a traceback through them still names file and line.
ARG SITE=/opt/venv/lib/python3.11/site-packages
RUN /opt/venv/bin/pip install --no-deps . \
 && rm -rf "$SITE/kubernetes/aio" "$SITE"/azure/mgmt/*/aio \
 && /opt/venv/bin/pip uninstall --yes --quiet aiohttp aiohttp-retry aiohappyeyeballs aiosignal attrs frozenlist \
      multidict propcache yarl \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && find /opt/venv -name '*.cpython-311.pyc' -delete \
 && /opt/venv/bin/python -m compileall -q -b -o 2 -j 0 "$SITE/kubernetes/client/api" "$SITE/kubernetes/client/models" \
 && find "$SITE/kubernetes/client/api" "$SITE/kubernetes/client/models" \( -name '*.py' -o -name __pycache__ \) \
      -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -o 2 -j 0 /opt/venv/lib

FROM python:3.11.11-slim-bookworm AS runtime-root
# No installer stays: not pip, nor ensurepip and its wheels (Debian keeps them in /usr/share/python-wheels),
# nor the standard library's development tools. The standard library is compiled as the venv is.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && stdlib="$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
 && rm -rf "$stdlib/ensurepip" "$stdlib/idlelib" "$stdlib/lib2to3" "$stdlib/pydoc_data" "$stdlib/turtledemo" \
      /usr/share/python-wheels /root/.cache \
 && python -m compileall -q -o 2 -j 0 "$stdlib" \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home nonroot

FROM scratch
LABEL org.opencontainers.image.source="https://github.com/kaito-project/gpu-provisioner" \
      org.opencontainers.image.description="Kaito's GPU node provisioner for AKS"
# The whole root on purpose: it is the flattening that makes the removals above real.
# hadolint ignore=DL3067
COPY --from=runtime-root / /
COPY --from=builder /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONOPTIMIZE=2 \
    PYTHONUNBUFFERED=1
# The chart runs the pod as this uid with a read-only root filesystem. No installer is left to run.
USER 65532:65532
EXPOSE 8080 8081
HEALTHCHECK NONE
ENTRYPOINT ["gpu-provisioner"]
CMD ["run"]
