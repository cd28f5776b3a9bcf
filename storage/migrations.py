"""The chat side's database schema, as numbered migrations, and how a migration is split up.

`storage.db.Database` applies the steps newer than the ``schema_version`` table records, each in
its own transaction, when it opens a database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from storage.errors import MigrationError

Migration = tuple[int, str]

# Each migration runs in its own transaction; end every statement at the end of a line.
MIGRATIONS: list[Migration] = [
    (
        1,
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            platform TEXT NOT NULL CHECK (platform <> ''),
            platform_user_id TEXT NOT NULL CHECK (platform_user_id <> ''),
            created_at REAL NOT NULL,
            UNIQUE (platform, platform_user_id)
        );
        CREATE TABLE consents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            text_version TEXT NOT NULL,
            given_at REAL NOT NULL
        );
        CREATE INDEX consents_by_user ON consents (user_id);
        CREATE TABLE photos (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            blob_key TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'refused')),
            refusal TEXT,
            embedding_key TEXT,
            crop_key TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX photos_by_user_sha ON photos (user_id, sha256);
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            queue TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
            message TEXT,
            error TEXT,
            payload TEXT CHECK (payload IS NULL OR json_valid(payload)),
            result TEXT CHECK (result IS NULL OR json_valid(result)),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX jobs_by_user_kind_state ON jobs (user_id, kind, state);
        CREATE TABLE models (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            method TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            base_preset TEXT NOT NULL,
            blob_key TEXT NOT NULL,
            token TEXT NOT NULL,
            class_word TEXT NOT NULL,
            job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
            created_at REAL NOT NULL,
            UNIQUE (user_id, version)
        );
        CREATE INDEX models_by_job ON models (job_id);
        CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
            model_id INTEGER REFERENCES models (id) ON DELETE SET NULL,
            blob_key TEXT NOT NULL,
            prompt TEXT NOT NULL,
            seed INTEGER NOT NULL,
            score REAL,
            created_at REAL NOT NULL
        );
        CREATE INDEX images_by_user_time ON images (user_id, created_at);
        CREATE INDEX images_by_job ON images (job_id);
        CREATE INDEX images_by_model ON images (model_id);
        """,
    ),
    (
        2,
        # Events a chat platform delivered that the bot has not finished handling (a Telegram
        # upload, as the Update's JSON): kept here so the platform can be told "received" at
        # once, and replayed after a crash. No images, only the platform's ids and metadata.
        """
        CREATE TABLE inbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            platform TEXT NOT NULL,
            event_key TEXT NOT NULL,
            payload TEXT NOT NULL CHECK (json_valid(payload)),
            received_at REAL NOT NULL,
            UNIQUE (platform, event_key)
        );
        """,
    ),
    (
        3,
        # The apparent gender the face check read from an accepted photo; the class word ("man",
        # "woman", "person") is the majority of the user's. Older rows stay NULL: unknown.
        """
        ALTER TABLE photos ADD COLUMN apparent_gender TEXT CHECK (apparent_gender IN ('female', 'male'));
        """,
    ),
    (
        4,
        # An erasure whose rows are gone but whose blobs, queue entries or running jobs may not be
        # yet: kept (with the identity, so the person can be told it is not finished) until done.
        """
        CREATE TABLE erasures (
            user_id INTEGER PRIMARY KEY REFERENCES users (id),
            platform TEXT NOT NULL,
            platform_user_id TEXT NOT NULL,
            job_ids TEXT NOT NULL CHECK (json_valid(job_ids)),
            requested_at REAL NOT NULL
        );
        CREATE INDEX erasures_by_identity ON erasures (platform, platform_user_id);
        """,
    ),
]

# Which migrations a database has had; created before any of them runs.
SCHEMA_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER PRIMARY KEY,
        applied_at REAL NOT NULL
    )
"""


def check_migrations(migrations: Sequence[Migration]) -> None:
    """Refuse a list of migrations whose versions are not positive and strictly increasing."""
    versions = [version for version, _ in migrations]
    if any(v < 1 for v in versions) or versions != sorted(set(versions)):
        raise MigrationError(
            f"migration versions must be positive and strictly increasing, got {versions}"
        )


def split_statements(script: str) -> list[str]:
    """Split a migration into statements; `executescript` would commit our transaction."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise MigrationError(f"migration ends with an incomplete statement: {pending.strip()!r}")
    return statements
