//! Storage conformance suite (placeholder; being written).
