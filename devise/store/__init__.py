"""The embeddings folder: parquet format, committed versions, their verification and readers,
run planning, staging, commit, garbage collection, export, and the lock that keeps one writer
at a time. Nothing else reads or writes EMB_DIR directly; `Store` is the API.

Layout of an embeddings folder (EMB_DIR)::

    EMB_DIR/CURRENT                      the committed version's name (replaced with os.replace)
    EMB_DIR/LOCK                         held by the one run writing EMB_DIR (pid, host, heartbeat)
    EMB_DIR/errors.parquet               the current version's errors (a hard link)
    EMB_DIR/versions/<seq>-<model_id>/   part-*.parquet, errors.parquet, removed.parquet,
                                         hashes.parquet (with --verify content) and manifest.json
                                         (written last: row counts, byte sizes and CRC-32 of every
                                         part); never changed once there
    EMB_DIR/staging/<model_id>/          the running job's finished chunks; a rerun skips them
    EMB_DIR/damaged/<version>-<time>/    versions found damaged by a repair, moved aside

A version is built in a temporary folder, renamed into place, then named by CURRENT: a reader
that follows CURRENT finds a complete version whatever a writer is doing. Readers verify a
version before use (the manifest, each part's size and row count; the CRC-32 as they read the
bytes) and fall back to the newest intact version, with a warning, when one is damaged.

Modules: format (file names, schemas, tables, row keys and ids), manifest (Manifest, Version),
errors, plan (which rows a run embeds or keeps), staging (chunks and the assembly of a
version), lock (EmbedLock), reading (StoreReader), store (Store: the writers), readers (plain
functions by path), export (one flat parquet file).
"""

from devise.store.errors import DamagedVersionError, EmbedError, LockHeldError, TooManyErrorsError
from devise.store.export import export_parquet, export_schema
from devise.store.format import (
    CURRENT_FILE,
    DAMAGED_DIR,
    ERRORS_FILE,
    FORMAT,
    HASHES_FILE,
    INPUT_COLUMNS,
    KEY_COLUMNS,
    LOCK_FILE,
    MANIFEST_FILE,
    MISSING_REASON,
    REMOVED_FILE,
    STAGING_DIR,
    VERSION_NAME,
    VERSIONS_DIR,
    embedding_matrix,
    embedding_schema,
    error_schema,
    errors_to_table,
    part_embeddings,
    read_parquet_meta,
    row_id,
    row_keys,
    rows_to_table,
)
from devise.store.lock import EmbedLock, LockInfo
from devise.store.manifest import Manifest, Part, Version
from devise.store.plan import Base, Plan, check_failures, plan_run
from devise.store.readers import (
    current_version,
    list_versions,
    read_manifest,
    read_rows,
    read_version,
)
from devise.store.staging import PartInfo, StagingWriter
from devise.store.store import Store

__all__ = [
    "CURRENT_FILE",
    "DAMAGED_DIR",
    "ERRORS_FILE",
    "FORMAT",
    "HASHES_FILE",
    "INPUT_COLUMNS",
    "KEY_COLUMNS",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MISSING_REASON",
    "REMOVED_FILE",
    "STAGING_DIR",
    "VERSIONS_DIR",
    "VERSION_NAME",
    "Base",
    "DamagedVersionError",
    "EmbedError",
    "EmbedLock",
    "LockHeldError",
    "LockInfo",
    "Manifest",
    "Part",
    "PartInfo",
    "Plan",
    "StagingWriter",
    "Store",
    "TooManyErrorsError",
    "Version",
    "check_failures",
    "current_version",
    "embedding_matrix",
    "embedding_schema",
    "error_schema",
    "errors_to_table",
    "export_parquet",
    "export_schema",
    "list_versions",
    "part_embeddings",
    "plan_run",
    "read_manifest",
    "read_parquet_meta",
    "read_rows",
    "read_version",
    "row_id",
    "row_keys",
    "rows_to_table",
]
