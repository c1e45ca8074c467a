//! The region core of Parley: auth, validation, rate limits, the REST API, storage and the
//! channel/member/message domain logic.
//!
//! The core owns every decision about who may do what and every write. It never holds client
//! connections; the edge reaches it through [`domain::Core`] (a function call in one process).

pub mod auth;
pub mod calls;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod presence_store;
pub mod ratelimit;
pub mod realtime;
pub mod storage;
pub mod validate;

pub use domain::{Core, CoreError, DomainLimits};
