//! The storage conformance suite against SQLite, each case on its own fresh database file.

use std::sync::Arc;

use parley_core::storage::SqliteStorage;

parley_core::storage_conformance_tests!(storage().await);

/// A fresh engine in a temporary directory, which lives as long as the test.
async fn storage() -> (Arc<SqliteStorage>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let storage = SqliteStorage::open(dir.path())
        .await
        .expect("open SQLite storage");
    (Arc::new(storage), dir)
}
