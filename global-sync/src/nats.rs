//! The bus of a cluster: NATS core subjects (implemented in a later step).
