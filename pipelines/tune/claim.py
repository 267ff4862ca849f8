"""Claiming trials: one worker at a time fails stale trials, counts the budget and takes a trial, on
any number of machines (a file lock for SQLite, an advisory lock in PostgreSQL)."""

from __future__ import annotations

import contextlib
import hashlib
import logging

from repopt.io import sqlite_file

from .storage import cannot_open

log = logging.getLogger("pipelines.tune")


class ClaimLock:
    """Lets one worker at a time fail stale trials, count the budget and take a trial, so that workers
    that claim at the same instant never overshoot ``n_trials``; the same lock guards creating the
    study. Re-entrant release: the objective releases it as soon as Optuna has handed out its trial.

    * SQLite: a file lock beside the database (the workers share one machine).
    * PostgreSQL: a session advisory lock in the database itself (``pg_advisory_lock``, its key
      derived from the study name), taken on a connection of its own: exclusive across machines,
      and a worker that dies loses its connection, so the server drops its lock.
    * Other databases: no lock (a warning says so once); two workers that claim at the same instant
      can overshoot ``n_trials`` by one.
    """

    def __init__(self, url: str, study_name: str):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(url).get_backend_name()
        except (ArgumentError, ValueError):  # not a URL: make_storage says so
            backend = None
        database = sqlite_file(url)
        self._file = open(database.with_name(database.name + ".lock"), "a") if database else None
        self._advisory = _AdvisoryLock(url, study_name) if backend == "postgresql" else None
        if backend not in (None, "sqlite", "postgresql", *_UNLOCKED_WARNED):
            _UNLOCKED_WARNED.add(backend)
            log.warning(
                "storage backend %s: claims are not exclusive (a lock is taken for SQLite and PostgreSQL "
                "only), so workers that claim at the same instant can overshoot n_trials",
                backend,
            )
        self._held = False

    def acquire(self) -> None:
        if self._held:
            return
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_EX)
            self._held = True
        elif self._advisory is not None:
            self._advisory.acquire()
            self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
        else:
            self._advisory.release()

    def close(self) -> None:
        """Release the lock and let go of its file or connection."""
        self.release()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._advisory is not None:
            self._advisory.close()
            self._advisory = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


_UNLOCKED_WARNED: set[str] = set()  # backends whose missing lock was already reported by this process


def advisory_key(study_name: str) -> int:
    """The study's advisory-lock key: a signed 64-bit integer (``pg_advisory_lock(bigint)``), the
    same on every machine and Python (not ``hash()``, which is salted per process)."""

    digest = hashlib.sha256(f"repopt.tune:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _AdvisoryLock:
    """``pg_advisory_lock(key)`` on one dedicated connection in autocommit, so no transaction stays
    open between claims. The connection asks the server for TCP keepalives: a worker whose machine
    vanished while holding the lock is noticed in about a minute, not after the system's two hours."""

    KEEPALIVES = (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10), ("tcp_keepalives_count", 3))

    def __init__(self, url: str, study_name: str):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.url, self.key = url, advisory_key(study_name)
        try:
            self._engine = create_engine(url, poolclass=NullPool)
        except (ImportError, ValueError) as exc:  # no driver, a bad URL
            raise cannot_open(url, exc) from None
        self._connection = None

    def _connect(self):
        from sqlalchemy import exc, text

        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._drop_connection()
            try:
                connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except exc.OperationalError as error:  # no server there, refused, wrong password
                raise cannot_open(self.url, error.orig or error) from None
            for name, value in self.KEEPALIVES:  # ignored on a Unix socket
                connection.execute(text(f"SET {name} = {int(value)}"))
            self._connection = connection
        return self._connection

    def acquire(self) -> None:
        from sqlalchemy import exc, text

        statement = text("SELECT pg_advisory_lock(:key)")
        try:
            self._connect().execute(statement, {"key": self.key})
        except exc.DBAPIError as error:
            if not error.connection_invalidated:
                raise
            self._connect().execute(statement, {"key": self.key})  # the connection had dropped: once more on a new one

    def release(self) -> None:
        from sqlalchemy import exc, text

        try:
            if not self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}).scalar():
                log.warning("the claim lock was no longer held: its connection to the database had dropped")
        except exc.SQLAlchemyError as error:  # closing the connection releases the lock on the server
            log.warning("could not release the claim lock (%s); dropping its connection instead", error)
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop_connection()
        self._engine.dispose()
