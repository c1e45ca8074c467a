//! Region core of Parley.
pub mod storage;
