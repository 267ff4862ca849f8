"""``pipelines.tune`` on a PostgreSQL study (``storage=postgresql://...``), on a real server the tests
start (tests/helpers/postgres.py): a study runs end to end; the claim lock is a PostgreSQL advisory
lock that excludes other workers, frees itself when its worker dies, and keeps three workers, one of
them killed mid-trial, at exactly ``n_trials``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time

import pytest

optuna = pytest.importorskip("optuna")

from pipelines.tune import ClaimLock, advisory_key  # noqa: E402
from pipelines.tune import claim as tune  # noqa: E402
from pipelines.tune import main as tune_main  # noqa: E402
from tests.helpers.postgres import postgres_server, postgres_url  # noqa: E402, F401 (fixtures)
from tests.helpers.runs import _env, read_json, run_hydra  # noqa: E402
from tests.test_tune import _tune_command, write_preset  # noqa: E402

STARTED = re.compile(r"- trial (\d+)(?: \(re-run of trial \d+\))?: hs\.optim\.lr=")
FINISHED = re.compile(r"- trial (\d+): top1")
HOLD_THE_LOCK = """\
import sys, time
from pipelines.tune import ClaimLock
ClaimLock(sys.argv[1], "s").acquire()
print("held", flush=True)
time.sleep(600)
"""  # a worker inside its claim, until it is killed


def _lock_is_free(url: str, study_name: str) -> bool:
    """Whether another session can take the study's advisory lock now (it gives it back at once)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            key = {"key": advisory_key(study_name)}
            free = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar()
            if free:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            return bool(free)
    finally:
        engine.dispose()


def _states(url: str) -> dict[int, str]:
    """Trial number -> state, read from Optuna's tables on one short connection (polled often: an
    Optuna storage per call would keep a pool of connections each)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if not connection.execute(text("SELECT to_regclass('trials')")).scalar():
                return {}  # no worker has created the tables yet
            return dict(connection.execute(text("SELECT number, state FROM trials ORDER BY number")).fetchall())
    finally:
        engine.dispose()


# ------------------------------------------------------------------ end to end


def test_study_on_postgresql_runs_exactly_n_trials(in_tmp, postgres_url):
    conf = write_preset(in_tmp / "conf")
    study_dir = in_tmp / "study"
    assert postgres_url.startswith("postgresql://")  # the URL as a user writes it: the driver is SQLAlchemy's default
    run_hydra(
        tune_main, ["--config-dir", str(conf), "tune=tiny", f"study_dir={study_dir}", "n_trials=2", f"storage='{postgres_url}'"]
    )

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 2
    for trial in study.trials:
        job = study_dir / f"trial_{trial.number}"
        assert trial.value == read_json(job / "metrics.json")["top1"]
        assert read_json(job / "trial.json")["state"] == "COMPLETE"
    assert sorted(p.name for p in study_dir.iterdir()) == [
        "history.png",
        "study.md",
        "trial_0",
        "trial_1",
        "tune.log",
    ]  # no study.db
    assert "postgresql" in (study_dir / "study.md").read_text()
    assert _lock_is_free(postgres_url, "tiny")  # the worker gave its claim lock back

    # the same command again: the study has its trials, nothing runs
    run_hydra(
        tune_main, ["--config-dir", str(conf), "tune=tiny", f"study_dir={study_dir}", "n_trials=2", f"storage='{postgres_url}'"]
    )
    assert _states(postgres_url) == {0: "COMPLETE", 1: "COMPLETE"}


# ------------------------------------------------------------------ the claim lock


def test_claim_lock_is_one_advisory_lock_per_study(postgres_url):
    first, second, other = (ClaimLock(postgres_url, name) for name in ("s", "s", "t"))
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), taken.set()), daemon=True)
    try:
        first.acquire()
        first.acquire()  # already held: nothing more to take
        assert not _lock_is_free(postgres_url, "s")
        waiter.start()
        with other:  # another study's claims are not held up
            assert not _lock_is_free(postgres_url, "t")
        assert _lock_is_free(postgres_url, "t")
        assert not taken.wait(1.0)  # the second worker waits for the first
        first.release()
        first.release()  # re-entrant release: the objective and work() both release
        assert taken.wait(30)
        assert not _lock_is_free(postgres_url, "s")
        second.release()
        assert _lock_is_free(postgres_url, "s")
    finally:
        for lock in (first, second, other):
            lock.close()
        waiter.join(timeout=30)


def test_claim_lock_of_a_killed_worker_is_freed_by_the_server(tmp_path, postgres_url):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, postgres_url],
        cwd=tmp_path,
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stdout.read() if holder.poll() is not None else ""
        assert not _lock_is_free(postgres_url, "s")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    deadline = time.monotonic() + 30  # the server sees the closed socket and ends the session with its lock
    while not _lock_is_free(postgres_url, "s"):
        assert time.monotonic() < deadline, "the killed worker's lock was not freed"
        time.sleep(0.1)


def test_other_backends_warn_once_that_claims_are_not_exclusive(monkeypatch, caplog):
    monkeypatch.setattr(tune, "_UNLOCKED_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="pipelines.tune"):
        for _ in range(2):
            with ClaimLock("mysql://user@127.0.0.1/optuna", "s"):  # takes nothing: no connection is made
                pass
    warned = [r.getMessage() for r in caplog.records if "not exclusive" in r.getMessage()]
    assert len(warned) == 1 and "mysql" in warned[0]
    assert advisory_key("s") == advisory_key("s") != advisory_key("t")
    assert -(2**63) <= advisory_key("s") < 2**63


# ------------------------------------------------------------------ three workers, one killed


def test_three_workers_one_killed_end_with_exactly_n_trials(tmp_path, postgres_url):
    conf = write_preset(tmp_path / "conf")
    study_dir = tmp_path / "study"
    n_trials = 3
    command = _tune_command(conf, study_dir, f"n_trials={n_trials}", "grace_period=2", f"storage='{postgres_url}'")
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    handles = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=_env(1), stdout=h, stderr=subprocess.STDOUT) for h in handles]
    try:
        # SIGKILL the first worker seen starting a trial, while that trial is RUNNING in the database
        deadline, victim = time.monotonic() + 120, None
        while victim is None:
            for i, log in enumerate(logs):
                found = STARTED.search(log.read_text())
                if found and _states(postgres_url).get(int(found.group(1))) == "RUNNING":
                    victim, killed = i, int(found.group(1))
                    break
            else:
                assert all(p.poll() is None for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
                assert time.monotonic() < deadline, "no trial started in time:\n" + "\n".join(
                    log.read_text()[-3000:] for log in logs
                )
                time.sleep(0.1)
        procs[victim].kill()
        procs[victim].wait()
        codes = [p.wait(timeout=240) for i, p in enumerate(procs) if i != victim]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for h in handles:
            h.close()
    output = "\n".join(log.read_text()[-3000:] for log in logs)
    assert procs[victim].returncode == -9 and codes == [0, 0], output

    # as on SQLite: the killed trial is FAIL (no heartbeat) and ran again once, under a new number, with its params
    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {**{n: "COMPLETE" for n in range(n_trials + 1) if n != killed}, killed: "FAIL"}, (states, output)
    (rerun,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert rerun.state.name == "COMPLETE" and rerun.params == study.trials[killed].params
    assert rerun.system_attrs["retry_history"] == [killed]
    # one directory per trial number, each trial ran in one worker only, and nothing ran twice
    assert sorted(p.name for p in study_dir.glob("trial_*")) == sorted(f"trial_{n}" for n in range(n_trials + 1))
    ran = [FINISHED.findall(log.read_text()) for i, log in enumerate(logs) if i != victim]
    finished = [int(n) for numbers in ran for n in numbers]
    assert sorted(finished) == sorted(n for n, s in states.items() if s == "COMPLETE"), ran
    assert not FINISHED.findall(logs[victim].read_text())
    for n, state in states.items():
        job = study_dir / f"trial_{n}"
        assert read_json(job / "trial.json")["state"] == state
        if state == "COMPLETE":
            assert read_json(job / "metrics.json")["status"] == "completed"
            assert len((job / "hs/history.csv").read_text().splitlines()) == 2  # one epoch, written once
    assert read_json(study_dir / f"trial_{rerun.number}/trial.json")["retry_of"] == killed
    assert _lock_is_free(postgres_url, "tiny")
