"""The registry in a database: SQLite by default (`$ZOO_HOME/registry.db`), PostgreSQL for a team.

One schema (SQLAlchemy Core) serves both. Each entry is a row holding its manifest as validated JSON, plus the
columns lists filter on (indexed: name+version, base, method, task, weights sha256); manifests are validated
when written and parsed only when a caller asks for one, so `zoo list --json` of 100,000 entries streams rows.
`files` lists every entry's blobs (what `zoo gc` keeps); `members` holds a composition's members as foreign
keys, so the database itself refuses to remove an entry a composition still uses.

Every write is one transaction. SQLite runs in WAL mode (readers never wait for the writer) and writers take
the write lock up front (`BEGIN IMMEDIATE`), so a read-then-write never fails half-way. On PostgreSQL, version
numbers are decided inside the transaction and guarded by the unique (name, version) constraint: a writer that
loses a race retries its whole transaction.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter
from sqlalchemy import (
    BigInteger, Column, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint, create_engine,
    delete, event, exc, func, insert, inspect, select, update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url

from zoo.errors import ZooError
from zoo.locks import wait_for
from zoo.manifest import Manifest
from zoo.registry import (
    LOCK_TIMEOUT_S, BeforeCommit, RegistryBackend, check_member, members_of, next_version, read_registry_file,
    refuse_dependents, split_ref,
)

_MANIFEST = TypeAdapter(Manifest)
T = TypeVar("T")

metadata = MetaData()
entries = Table(
    "entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("label", String(32), nullable=False, index=True),  # the method, or the composition's fusion
    Column("base", Text, nullable=False, index=True),  # base_model.name_or_path ('' when unknown)
    Column("task", Text, index=True),
    Column("source_kind", String(16), nullable=False),
    Column("source_repo", Text),
    Column("source_revision", Text),
    Column("weights_sha256", String(64), index=True),
    Column("manifest", Text, nullable=False),  # the manifest's JSON, validated when written
    UniqueConstraint("name", "version", name="entries_name_version"),  # also the index `zoo show NAME` uses
)
Index("entries_source", entries.c.source_repo, entries.c.source_revision)
files = Table(
    "files", metadata,
    Column("entry_id", ForeignKey("entries.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size", BigInteger, nullable=False),
)
members = Table(
    "members", metadata,
    Column("composition_id", ForeignKey("entries.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    # NO ACTION: removing an entry a composition uses fails (checked at the statement's end, so a composition
    # and its member can go in one statement). NULL only for a member already missing in a migrated registry.json.
    Column("member_id", ForeignKey("entries.id"), index=True),
)
# The distinct base models (a few hundred where entries are 100,000s): `--base` matches a substring here, then
# finds the entries through the index on entries.base, instead of scanning every entry. Never pruned: a base no
# entry has any more only costs an index probe.
bases = Table("bases", metadata, Column("base", Text, primary_key=True))
schema_table = Table("zoo_schema", metadata, Column("version", Integer, nullable=False), Column("migrated_from", Text))


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=False)  # version 0: nothing there (DDL is transactional on both databases)


#: MIGRATIONS[i] takes a database from schema version i to i + 1 (a later version appends its ALTERs here).
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1]
SCHEMA_VERSION = len(MIGRATIONS)
BATCH = 1000  # entries per transaction in imports
RETRIES = 20


# --- engines: one per database per process -------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 5
_engines: dict[str, Engine] = {}
_ready: set[str] = set()


def _forget_after_fork() -> None:
    """A forked child must not use its parent's connections: drop them from the pools without closing them."""
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_after_fork)


def _sqlite_connect(dbapi_connection, _record) -> None:
    for pragma in ("foreign_keys = ON", "synchronous = FULL", f"busy_timeout = {LOCK_TIMEOUT_S * 1000}"):
        dbapi_connection.execute(f"PRAGMA {pragma}")


def _engine(url: str) -> Engine:
    if (engine := _engines.get(url)) is None:
        if url.startswith("sqlite"):
            # autocommit at the driver: transactions are ours (`BEGIN IMMEDIATE`), never the driver's implicit ones
            engine = create_engine(url, isolation_level="AUTOCOMMIT")
            event.listen(engine, "connect", _sqlite_connect)
        else:
            # a server that accepts but never answers fails within seconds, not at the OS's TCP timeout
            engine = create_engine(url, pool_size=2, max_overflow=2, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        _engines[url] = engine
    return engine


def _db_errors(location: str):
    """Turn what the database refused (cannot connect, not a database, no permission) into one line."""

    @contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except exc.IntegrityError:
            raise
        except exc.DBAPIError as e:
            reason = " ".join(str(e.orig).split()) if e.orig is not None else str(e)
            raise ZooError(f"registry {location}: {reason}", "check ZOO_REGISTRY / --registry (a *.db file, a *.json file or postgresql://user@host:port/db)") from None
        except ModuleNotFoundError as e:
            raise ZooError(f"registry {location} needs the Python package {e.name}", "pip install 'psycopg[binary]>=3'") from None

    return guard()


class DbRegistry(RegistryBackend):
    """A registry in SQLite or PostgreSQL (see the module's docstring)."""

    def __init__(self, url: str, location: str, folder: Path | None, path: Path | None):
        self.url, self.location, self.folder, self.path = url, location, folder, path
        self.engine = _engine(url)
        self.sqlite = url.startswith("sqlite")
        self.is_file = self.sqlite
        self.identity = url if self.sqlite else make_url(url).difference_update_query(["password"]).set(drivername="postgresql", password=None).render_as_string(hide_password=False)

    @classmethod
    def open(cls, location: str) -> DbRegistry:
        """`postgresql://user@host:port/db` (also `postgresql+psycopg://`), `sqlite:///path`, or a file path (SQLite)."""
        scheme = location.split("://", 1)[0] if "://" in location else ""
        if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            url = "postgresql+psycopg://" + location.split("://", 1)[1]
            try:
                parsed = make_url(url)
                # a password in the query string (?password=…) is hidden like user:pw@'s
                shown = parsed.update_query_dict({"password": "***"}) if "password" in parsed.query else parsed
                shown = shown.set(drivername="postgresql").render_as_string(hide_password=True)
            except exc.ArgumentError:
                raise ZooError(f"invalid registry URL {location!r}", "write postgresql://user@host:port/db") from None
            registry = cls(url, shown, None, None)
        elif scheme in ("sqlite", ""):
            path = Path((make_url(location).database or "") if scheme else location).expanduser()
            if path.is_dir():
                raise ZooError(f"registry {path} is a folder", "point --registry / ZOO_REGISTRY at a registry file (*.db or *.json)")
            registry = cls(f"sqlite:///{path.absolute()}", str(path), path.parent, path)
        else:
            raise ZooError(f"unknown registry URL {location!r}", "use postgresql://user@host:port/db, a *.db file or a *.json file")
        return registry  # the schema is made (or upgraded) on first use

    # --- transactions ----------------------------------------------------------------------------------------

    def _legacy(self) -> Path | None:
        """A `registry.json` beside the default `registry.db`, to migrate."""
        legacy = self.path.with_name("registry.json") if self.path is not None and self.path.name == "registry.db" else None
        return legacy if legacy is not None and legacy.is_file() else None

    @contextmanager
    def _read(self) -> Iterator[Connection | None]:
        """A connection, or None when the SQLite file does not exist yet (an empty registry)."""
        if self.url not in _ready:
            if self.sqlite and not self.path.exists() and not self._legacy():
                yield None  # created by the first write: reading a registry that is not there writes nothing
                return
            self._prepare()
        with _db_errors(self.location), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction holding the write lock (SQLite: taken up front, said after a second of waiting)."""
        if self.url not in _ready:
            self._prepare()
        with _db_errors(self.location), self.engine.connect() as conn:
            if not self.sqlite:
                with conn.begin():
                    yield conn
                return

            def acquire(seconds: float) -> bool:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
                try:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    return True
                except exc.OperationalError as e:
                    if "locked" in str(e.orig) or "busy" in str(e.orig):
                        return False
                    raise

            wait_for(acquire, f"the registry {self.location}", LOCK_TIMEOUT_S)
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {LOCK_TIMEOUT_S * 1000}")
            try:
                yield conn
                conn.exec_driver_sql("COMMIT")
            except BaseException:
                try:
                    conn.exec_driver_sql("ROLLBACK")
                except exc.DBAPIError:
                    pass  # SQLite rolled back already (a failed COMMIT): the original error is what matters
                raise

    def _retrying(self, body: Callable[[Connection], T]) -> T:
        """Run `body` in a write transaction; again when a concurrent writer won a race (a unique or foreign key
        violation: someone took that version, or removed a member meanwhile). `body` then decides afresh."""
        for attempt in range(RETRIES):
            try:
                with self._write() as conn:
                    return body(conn)
            except exc.IntegrityError as e:
                if attempt == RETRIES - 1:
                    raise ZooError(f"registry {self.location}: {' '.join(str(e.orig).split())}", "too many concurrent writers: retry") from None
                time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))
        raise AssertionError("unreachable")

    # --- schema and migration -----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create or upgrade the schema once per process; migrate a `registry.json` left beside `registry.db`."""
        legacy = self._legacy()
        if self.url in _ready and not legacy:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with _db_errors(self.location), self.engine.connect() as conn:
            row = conn.execute(select(schema_table)).first() if inspect(conn).has_table("zoo_schema") else None
        version = row.version if row else 0
        if row is not None and row.migrated_from:
            legacy = None  # migrated before (a crash came between the commit and the rename): the file is only a copy
        if version > SCHEMA_VERSION:
            raise ZooError(f"registry {self.location} has schema version {version}; this adapter-zoo knows up to {SCHEMA_VERSION}", "upgrade adapter-zoo")
        if version < SCHEMA_VERSION or legacy:
            if self.sqlite and version == 0:
                with _db_errors(self.location), self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode = WAL")  # persistent: set once, outside any transaction
            _ready.add(self.url)  # for _write below
            try:
                migrated = self._retrying(lambda conn: self._upgrade(conn, legacy))
            except BaseException:
                _ready.discard(self.url)
                raise
            if migrated:
                os.replace(legacy, legacy.with_name("registry.json.bak"))  # kept as the backup
        _ready.add(self.url)

    def _upgrade(self, conn: Connection, legacy: Path | None) -> bool:
        if not self.sqlite:  # one migrating process at a time (SQLite: BEGIN IMMEDIATE already is that)
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")
        has = inspect(conn).has_table("zoo_schema")
        version = conn.execute(select(schema_table.c.version)).scalar() if has else 0
        for step in MIGRATIONS[version:]:
            step(conn)
        if version == 0:
            conn.execute(insert(schema_table).values(version=SCHEMA_VERSION))
        elif version < SCHEMA_VERSION:
            conn.execute(update(schema_table).values(version=SCHEMA_VERSION))
        if legacy is None or not legacy.is_file() or conn.execute(select(schema_table.c.migrated_from)).scalar():
            return False  # migrated meanwhile by another process
        manifests = read_registry_file(legacy)
        self._insert_batch(conn, manifests, allow_dangling=True)
        conn.execute(update(schema_table).values(migrated_from=str(legacy)))
        return True

    # --- reading ---------------------------------------------------------------------------------------------

    @staticmethod
    def _parse(text: str) -> Manifest:
        return _MANIFEST.validate_json(text)

    def _filtered(self, query, base, method, task):
        if base is not None:
            contains = (func.instr if self.sqlite else func.strpos)(bases.c.base, base) > 0  # case-sensitive, as `in`
            query = query.where(entries.c.base.in_(select(bases.c.base).where(contains)))
        if method is not None:
            query = query.where(entries.c.label == method)
        if task is not None:
            query = query.where(entries.c.task == task)
        return query

    def read(self) -> list[Manifest]:
        return self.select()

    def versions(self, name: str) -> list[Manifest]:
        with self._read() as conn:
            if conn is None:
                return []
            rows = conn.execute(select(entries.c.manifest).where(entries.c.name == name).order_by(entries.c.version))
            return [self._parse(text) for (text,) in rows]

    def resolve(self, ref: str) -> Manifest:
        name, version = split_ref(ref)
        query = select(entries.c.manifest).where(entries.c.name == name)
        query = query.where(entries.c.version == version) if version is not None else query.order_by(entries.c.version.desc()).limit(1)
        with self._read() as conn:
            text = conn.execute(query).scalar() if conn is not None else None
        return self._parse(text) if text is not None else super().resolve(ref)  # the base class says what is missing

    def select(self, *, base=None, method=None, task=None, limit=None) -> list[Manifest]:
        return [self._parse(line) for line in self.json_lines(base=base, method=method, task=task, limit=limit)]

    def count(self, *, base=None, method=None, task=None) -> int:
        with self._read() as conn:
            return conn.execute(self._filtered(select(func.count()).select_from(entries), base, method, task)).scalar_one() if conn is not None else 0

    def json_lines(self, *, base=None, method=None, task=None, limit=None) -> Iterator[bytes]:
        query = self._filtered(select(entries.c.manifest), base, method, task).order_by(entries.c.id).limit(limit)
        with self._read() as conn:
            if conn is None:
                return
            for (text,) in conn.execution_options(stream_results=True, yield_per=2000).execute(query):
                yield text.encode()

    def from_source(self, kind, repo_id, revision) -> list[Manifest]:
        query = select(entries.c.manifest).where(entries.c.source_kind == kind, entries.c.source_repo == repo_id, entries.c.source_revision == revision)
        with self._read() as conn:
            return [self._parse(text) for (text,) in conn.execute(query.order_by(entries.c.id))] if conn is not None else []

    def dangling(self) -> list[tuple[str, str]]:
        c = entries.alias("c")
        query = select(c.c.name, c.c.version, members.c.name, members.c.version).join(c, c.c.id == members.c.composition_id).where(members.c.member_id.is_(None))
        with self._read() as conn:
            return [(f"{cn}@{cv}", f"{mn}@{mv}") for cn, cv, mn, mv in conn.execute(query.order_by(c.c.id, members.c.position))] if conn is not None else []

    def blob_hashes(self) -> set[str]:
        with self._read() as conn:
            return set(conn.execute(select(files.c.sha256).distinct()).scalars()) if conn is not None else set()

    # --- writing ---------------------------------------------------------------------------------------------

    def _lock_name(self, conn: Connection, name: str) -> None:
        """PostgreSQL: writers of one name queue (until commit) instead of racing for its next version; the unique
        constraint stays the guarantee. (SQLite's writers already queue on the database's write lock.)"""
        if not self.sqlite:
            conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(name))))

    def add(self, manifest, *, new_version_of_same_source=False, before_commit: BeforeCommit | None = None) -> Manifest:
        def body(conn: Connection) -> Manifest:
            self._lock_name(conn, manifest.name)
            rows = conn.execute(select(entries.c.manifest).where(entries.c.name == manifest.name).order_by(entries.c.version))
            m = manifest.model_copy(update={"version": next_version(manifest, [self._parse(t) for (t,) in rows], new_version_of_same_source)})
            self._insert_batch(conn, [m], allow_dangling=False, strict=True)
            if before_commit:
                before_commit(m)
            return m

        return self._retrying(body)

    def add_many(self, manifests: list[Manifest]) -> list[str | None]:
        results: list[str | None] = []
        for start in range(0, len(manifests), BATCH):
            batch = manifests[start : start + BATCH]
            results += self._retrying(lambda conn: self._insert_batch(conn, batch, allow_dangling=False))
        return results

    def _insert_batch(self, conn: Connection, manifests: list[Manifest], *, allow_dangling: bool, strict: bool = False) -> list[str | None]:
        """Insert manifests as they are; per manifest None (inserted), "unchanged", or the conflict. `strict`: a
        conflict is raised; `allow_dangling`: a missing member is kept as a NULL reference (migration only)."""
        wanted = {m.name for m in manifests} | {x.name for m in manifests for x in members_of(m)}
        known: dict[tuple[str, int], tuple[int | None, str | None, str]] = {}  # (name, version) → (id, weights sha, json)
        names = list(wanted)
        for i in range(0, len(names), 500):
            query = select(entries.c.id, entries.c.name, entries.c.version, entries.c.weights_sha256, entries.c.manifest).where(entries.c.name.in_(names[i : i + 500]))
            for id_, name, version, sha, text in conn.execute(query):
                known[(name, version)] = (id_, sha, text)
        results: list[str | None] = []
        rows, accepted = [], []
        for m in manifests:
            text = m.model_dump_json()
            result = None
            if not strict and (there := known.get((m.name, m.version))) is not None:  # add(): a taken version is a race, retried
                result = "unchanged" if there[2] == text else f"{m.ref} is already registered with other content"
            for x in members_of(m) if result is None else ():
                found = known.get((x.name, x.version))
                if found is None and allow_dangling:
                    continue
                if found is None or found[1] != x.sha256:
                    try:
                        check_member(m, x, self._parse(found[2]) if found else None)
                    except ZooError as e:
                        result = e.message
                        break
            if result is not None and strict:
                raise ZooError(result, "pick another --name" if "already" in result else None)
            results.append(result)
            if result is None:
                weights = getattr(m, "weights", None)
                rows.append(dict(
                    name=m.name, version=m.version, kind=m.kind, label=m.label, base=m.base_model.name_or_path or "", task=m.task,
                    source_kind=m.source.kind, source_repo=m.source.repo_id, source_revision=m.source.revision,
                    weights_sha256=weights.sha256 if weights else None, manifest=text,
                ))
                accepted.append(m)
                known[(m.name, m.version)] = (None, rows[-1]["weights_sha256"], text)  # its id comes below
        if not rows:
            return results
        ids = conn.execute(insert(entries).returning(entries.c.id, sort_by_parameter_order=True), rows).scalars().all()
        for m, id_ in zip(accepted, ids):
            known[(m.name, m.version)] = (id_, *known[(m.name, m.version)][1:])
        file_rows = [dict(entry_id=id_, path=f.path, sha256=f.sha256, size=f.size) for m, id_ in zip(accepted, ids) for f in m.files]
        member_rows = [
            dict(composition_id=id_, position=i, name=x.name, version=x.version, member_id=known.get((x.name, x.version), (None,))[0])
            for m, id_ in zip(accepted, ids) for i, x in enumerate(members_of(m))
        ]
        on_conflict = (sqlite_insert if self.sqlite else pg_insert)(bases).on_conflict_do_nothing()
        conn.execute(on_conflict, [{"base": b} for b in sorted({row["base"] for row in rows})])
        if file_rows:
            conn.execute(insert(files), file_rows)
        if member_rows:
            conn.execute(insert(members), member_rows)
        return results

    def remove(self, ref: str, *, cascade: bool = False) -> list[Manifest]:
        self.resolve(ref)  # a clear error if nothing matches
        name, version = split_ref(ref)

        def body(conn: Connection) -> list[Manifest]:
            self._lock_name(conn, name)
            query = select(entries.c.id, entries.c.manifest).where(entries.c.name == name)
            targets = conn.execute(query.where(entries.c.version == version) if version is not None else query).all()
            ids = [id_ for id_, _ in targets]
            dependents = conn.execute(
                select(entries.c.id, entries.c.manifest).distinct().join(members, members.c.composition_id == entries.c.id)
                .where(members.c.member_id.in_(ids), entries.c.id.not_in(ids)).order_by(entries.c.id)
            ).all()
            removed = [self._parse(text) for _, text in [*targets, *dependents]]
            if not cascade:
                refuse_dependents(ref, [m.ref for m in removed[len(targets):]])
            if dependents:  # compositions first: then nothing refers to the members any more
                conn.execute(delete(entries).where(entries.c.id.in_([id_ for id_, _ in dependents])))
            conn.execute(delete(entries).where(entries.c.id.in_(ids)))
            return removed

        return self._retrying(body)
