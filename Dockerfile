# skyapi in a small image: the server by default, the provide client as a sidecar.
#
#   docker build -t skyapi .        (podman: podman build --format docker -t skyapi . ;
#                                    its default OCI format drops the HEALTHCHECK)
#   docker run -p 8053:8053 skyapi -c /etc/skyapi/skyapi.yaml --etcd-api http://etcd:2379
#   docker run skyapi provide --url ws://skyapi:8053 --service foo --port 9999 \
#       --health-addr 127.0.0.1:8054
#
# The base is pinned to the Python CI runs the whole suite on (3.11; the fast subset passes on
# 3.10, 3.12 and 3.13 too: see the README), on Debian 12.
# On top of it only tornado and PyYAML (binary wheels, nothing compiled here) and skyapi.py.
FROM python:3.11-slim-bookworm

# The runtime dependencies of requirements.txt, pinned to the versions the tests pass with.
# User and group share one fixed id, outside the system range (no useradd warning).
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        tornado==6.6.1 PyYAML==6.0.4 \
 && groupadd --gid 10001 skyapi \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin skyapi

COPY skyapi.py /app/skyapi.py
# Compiled once here: the health check runs as `python -m skyapi` from this compiled file
# (a script is compiled anew at every run, which costs more memory than the check itself).
RUN python -m compileall -q /app
ENV PYTHONPATH=/app
# Every setting at its default: mount your own file here (a ConfigMap in Kubernetes), or
# add flags after -c /etc/skyapi/skyapi.yaml.
COPY skyapi.yaml /etc/skyapi/skyapi.yaml

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001
EXPOSE 8053
# One line for both modes: `healthcheck --pid 1` reads the command line the container runs
# and checks what it starts, so it follows whatever flags and file were given: the server's
# /healthz at its listen_addr (https with tls_cert_file), or the provide client's /healthz
# at its --health-addr (a client started without one is reported unhealthy, saying so).
# Liveness only: /readyz (etcd answers; the registration is held) is for an orchestrator's
# readiness. Kubernetes ignores HEALTHCHECK and uses its own probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "-m", "skyapi", "healthcheck", "--pid", "1"]
ENTRYPOINT ["python", "/app/skyapi.py"]
CMD ["-c", "/etc/skyapi/skyapi.yaml"]
