# skyapi in a small image: the server by default, the provide client as a sidecar.
#
#   docker build -t skyapi .
#   docker run -p 8053:8053 -v "$PWD/skyapi.yaml:/etc/skyapi/skyapi.yaml:ro" skyapi
#   docker run --no-healthcheck skyapi provide --url ws://skyapi:8053 --service foo --port 9999
#
# About 130 MB unpacked, about 45 MB to pull: the python:3.12-slim base and ~7 MB of tornado
# and PyYAML (binary wheels, nothing compiled here).
FROM python:3.12-slim

# The runtime dependencies of requirements.txt, pinned to the versions the tests pass with.
RUN pip install --no-cache-dir --disable-pip-version-check tornado==6.6.1 PyYAML==6.0.4 \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin skyapi

COPY skyapi.py /app/skyapi.py
# Every setting at its default: mount your own file here (a ConfigMap in Kubernetes).
COPY skyapi.yaml /etc/skyapi/skyapi.yaml

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001
EXPOSE 8053
# The server's liveness (Kubernetes ignores this and uses its own probes). A provide
# container serves no HTTP: run it with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8053/healthz', timeout=4)"]
ENTRYPOINT ["python", "/app/skyapi.py"]
CMD ["-c", "/etc/skyapi/skyapi.yaml"]
