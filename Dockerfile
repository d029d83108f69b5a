# chatsync image: the `etl` command on Python 3.11, with the PostgreSQL driver (psycopg 3).
#
#   docker build -t chatsync .
#   docker run --rm chatsync --help
#   docker run --rm -e ETL_DATABASE_URL=postgresql+psycopg://... chatsync db upgrade
#
# docker-compose.yml builds this file for the `migrate`, `etl` and `simulator` services.

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user with fixed numeric ids (Kubernetes' runAsNonRoot needs a numeric USER).
RUN groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin etl

# /app holds the project as in the repository. etl/db.py finds migrations/ and alembic.ini
# next to the etl/ package, so the package is installed in editable mode and imported from
# here, not copied into site-packages. WORKDIR /app also makes `alembic upgrade head` work
# (alembic.ini is in the current directory; its URL comes from ETL_DATABASE_URL).
WORKDIR /app

# README.md is the project's `readme` in pyproject.toml: setuptools needs it to build.
COPY pyproject.toml README.md alembic.ini ./
COPY etl/ ./etl/
COPY migrations/ ./migrations/

# Root owns /app and the user cannot write to it; the byte code is compiled now because
# the running container cannot write __pycache__ (and PYTHONDONTWRITEBYTECODE says not to).
RUN pip install --editable '.[postgres]' \
    && python -m compileall -q etl migrations \
    && etl --version

USER 10001:10001

# `etl run` (the daemon) stops gracefully on SIGTERM: it lets running syncs finish, for up
# to [scheduler] shutdown_timeout_seconds (30 s by default); give `docker stop` / compose a
# longer grace period than that (docker-compose.yml: stop_grace_period 45s).
STOPSIGNAL SIGTERM

ENTRYPOINT ["etl"]
CMD ["run"]
