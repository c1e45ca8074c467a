//! PostgreSQL storage (placeholder; being written).
