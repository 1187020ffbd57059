# Install with its dependencies in a builder stage; the final stage has no compiler, no pip (nor its
# cache) and no source tree, and runs as a non-root user.
FROM python:3.11.11-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpu_provisioner ./gpu_provisioner
COPY crds ./crds
COPY examples ./examples
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.source="https://github.com/kaito-project/gpu-provisioner" \
      org.opencontainers.image.description="Kaito's GPU node provisioner for AKS"
COPY --from=builder /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The chart runs the pod as this uid with a read-only root filesystem. No installer is left to run.
RUN groupadd --system --gid 65532 nonroot && useradd --system --uid 65532 --gid 65532 --no-create-home nonroot \
 && python -m pip uninstall --yes pip setuptools wheel
USER 65532:65532
EXPOSE 8080 8081
HEALTHCHECK NONE
ENTRYPOINT ["gpu-provisioner"]
CMD ["run"]
