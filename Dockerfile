# memory-proxy on the embedded default: SQLite + sqlite-vec, the bundled ONNX model, data in /data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MEMORY_PROXY_HOST=0.0.0.0 \
    MEMORY_PROXY_PORT=8080 \
    MEMORY_PROXY_DATA_DIR=/data

RUN useradd --create-home --uid 10001 memory \
    && mkdir /data && chown memory:memory /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install . && rm -rf /root/.cache

USER memory
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
CMD ["memory-proxy", "serve"]
