"""Approximate nearest-neighbour indexes (faiss) for an embeddings version: build them with Ray
tasks, commit them inside the version, keep them current across incremental versions, load and
search them. The version's rows are read through devise.store.

Layout inside a committed version (the version's own files are never touched)::

    versions/<v>/index/            index.json (kind, parameters, measured recall, each file's
                                   size and SHA-256), index.faiss,
                                   and vectors.f32 for IVF kinds (the rows' float32 vectors in
                                   row-id order, memory-mapped to re-rank candidates exactly);
                                   renamed into place complete
    versions/<v>/.index-tmp-*/     a build in progress; a later build removes leftovers

Row ids are positions in the version's rows (its parts concatenated in manifest order), the
same positions exact search returns. A crash before the rename leaves no `index/`, and search
stays exact; a reader sees the old index, no index, or the new one, never half of one. A build
holds the embeddings folder's writer lock, as an embedding run does.

Modules: kinds (index kinds), tuning (search parameters and recall), shards (the Ray tasks of a build), index (AnnIndex,
loading and committing), build (a build from scratch), update (an index carried to a new
version).
"""

from devise.ann.build import BuildResult, build_index, index_embeddings
from devise.ann.index import AnnIndex, commit_index, file_sha256, index_dir, load, new_index_folder
from devise.ann.kinds import (
    AUTO_FLAT_MAX,
    INDEX_DIR,
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_META,
    KINDS,
    REBUILD_FRACTION,
    VECTORS_FILE,
    IndexBuildError,
    IndexTasksLostError,
    Kind,
    apply_params,
    choose_kind,
    nlist_for,
)
from devise.ann.shards import TASK_RETRIES, build_shard, sample_rows
from devise.ann.tuning import recall_at_k, tune
from devise.ann.update import carry_index, update_index

__all__ = [
    "AUTO_FLAT_MAX",
    "INDEX_DIR",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_META",
    "KINDS",
    "REBUILD_FRACTION",
    "TASK_RETRIES",
    "VECTORS_FILE",
    "AnnIndex",
    "BuildResult",
    "IndexBuildError",
    "IndexTasksLostError",
    "Kind",
    "apply_params",
    "build_index",
    "build_shard",
    "carry_index",
    "choose_kind",
    "commit_index",
    "file_sha256",
    "index_dir",
    "index_embeddings",
    "load",
    "new_index_folder",
    "nlist_for",
    "recall_at_k",
    "sample_rows",
    "tune",
    "update_index",
]
