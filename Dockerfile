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

# The package is installed like any wheel, into site-packages: the wheel carries its own
# copy of migrations/ and alembic.ini (etl/_alembic/), which `etl db upgrade` uses. /app
# keeps alembic.ini and migrations/ as in the repository, so that `alembic upgrade head`
# works in the WORKDIR too (alembic.ini is in the current directory; its URL comes from
# ETL_DATABASE_URL); the copied etl/ source is removed once installed, so that the only
# etl in the image, for both commands, is the installed one.
WORKDIR /app

# README.md is the project's `readme` in pyproject.toml: the build backend needs it.
COPY pyproject.toml README.md alembic.ini ./
COPY etl/ ./etl/
COPY migrations/ ./migrations/

# Root owns /app and the user cannot write to it; the byte code of /app/migrations is
# compiled now (pip compiles what it installs) because the running container cannot write
# __pycache__ (and PYTHONDONTWRITEBYTECODE says not to).
RUN pip install '.[postgres]' \
    && rm -rf etl \
    && python -m compileall -q migrations \
    && etl --version

USER 10001:10001

# `etl run` (the daemon) stops gracefully on SIGTERM: it lets running syncs finish, for up
# to [scheduler] shutdown_timeout_seconds (30 s by default); give `docker stop` / compose a
# longer grace period than that (docker-compose.yml: stop_grace_period 45s).
STOPSIGNAL SIGTERM

ENTRYPOINT ["etl"]
CMD ["run"]
