# The ledger worker (and CLI) as an image. Used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY producers ./producers
# gcc builds the worker's compiled core (mypyc) and is removed after the install
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir '.[worker]' \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
ENV LEDGER_DATA_DIR=/var/lib/ledger \
    LEDGER_WEB_HOST=0.0.0.0 \
    LEDGER_WEB_PORT=6066
VOLUME /var/lib/ledger
EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:6066/health/live', timeout=2)" || exit 1
CMD ["ledger", "worker"]
