"""A real PgBouncer in transaction mode in front of the test PostgreSQL, started and
stopped by the tests that need it (Debian's ``pgbouncer`` package; ``.ci/run`` installs it)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ini(directory: Path, port: int, server: tuple[str, int], pool_size: int) -> Path:
    host, server_port = server
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={host} port={server_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'users.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 500\n"
        f"default_pool_size = {pool_size}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        # psycopg and libpq send these; PgBouncer forwards only what it knows
        "ignore_startup_parameters = extra_float_digits,options\n",
        encoding="utf-8",
    )
    (directory / "users.txt").write_text('"postgres" ""\n', encoding="utf-8")
    return ini


@contextlib.contextmanager
def pgbouncer(database_url: str, directory: Path, *, pool_size: int = 4) -> Iterator[str]:
    """Run PgBouncer (transaction mode) in front of ``database_url``'s server; yields the
    same URL through PgBouncer. It refuses to run as root, so as root it runs as the
    ``postgres`` user (which must be able to read ``directory``)."""
    url = make_url(database_url)
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    ini = _ini(directory, port, (url.host or "127.0.0.1", url.port or 5432), pool_size)
    args = [BINARY, str(ini)]
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (directory, ini, directory / "users.txt"):
            os.chown(path, user.pw_uid, user.pw_gid)
        directory.chmod(0o755)
        for parent in directory.parents:  # pytest's tmp dirs are 0700
            if str(parent) in ("/", "/tmp"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        args = [BINARY, "-u", "postgres", str(ini)]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=(directory / "stderr.log").open("wb")
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (directory / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"pgbouncer did not start: {log}")
            time.sleep(0.05)
        yield url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
