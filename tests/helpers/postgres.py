"""A real PostgreSQL server for the tests, started and stopped by the tests themselves.

The server comes from the ``pgserver`` wheel (the ``[dev]`` extra): it ships ``initdb`` and
``postgres`` inside the wheel, so no system package or network is needed. PostgreSQL refuses to run
as root, which is what this machine and CI are: pgserver then creates a system user ``pgserver``
(``useradd``), hands it the data directory and runs the server as that user. The server listens on
a Unix socket in its data directory only (no TCP port). Tests that need it import the fixtures::

    from tests.helpers.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

Without pgserver (or the psycopg driver of the ``[tune]`` extra), or where it cannot start, those
tests skip and say why.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest

INSTALL = 'pip install -e ".[dev]"'


def _import_pgserver():
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" on import, as root
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        pytest.skip(f"a PostgreSQL server for these tests needs the pgserver package ({exc}); install it with {INSTALL}")
    return pgserver


def _admin_engine(server):
    """An engine on the server's ``postgres`` database in autocommit (CREATE/DROP DATABASE need it)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(server_url(server, "postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)


def server_url(server, database: str) -> str:
    """The SQLAlchemy URL of ``database`` on ``server``, as a user writes it: ``postgresql://...``
    (SQLAlchemy 2.1's default driver for it is psycopg; with an older SQLAlchemy, name psycopg)."""
    from sqlalchemy.dialects import postgresql

    url = server.get_uri(database)  # postgresql://postgres:@/<database>?host=<socket dir>
    if postgresql.dialect.driver != "psycopg":
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return url


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (a start costs seconds), in a fresh temporary directory
    (short, so that its socket path fits); stopped and deleted after the last test that used it."""
    pgserver = _import_pgserver()
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"PostgreSQL tests need the psycopg driver ({exc}); install it with {INSTALL}")
    root = Path(tempfile.mkdtemp(prefix="repopt-pg-"))
    try:
        server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    except Exception as exc:  # no useradd, no shared memory, ...: say what pgserver could not do
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pgserver could not start PostgreSQL ({type(exc).__name__}: {str(exc)[:500]})")
    try:
        yield server
    finally:
        server.cleanup()  # pg_ctl stop, then the data directory is deleted
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A new, empty database on the session's server, for one test: its SQLAlchemy URL. Dropped
    after the test, with any connection a killed worker left behind."""
    from sqlalchemy import text

    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = _admin_engine(postgres_server)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield server_url(postgres_server, name)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
