//! Everything that speaks Keap's language: the REST v1 client the daemon uses, the wire types
//! it sends and reads, and a fake Keap server that plays the API for tests, benchmarks and the
//! demo. The fake has wire types of its own, so it witnesses the client's independently.

mod client;
pub mod fake;
pub mod model;

pub(crate) use client::{describe_reqwest, http_client};
pub use client::{Auth, ErrorKind, KeapClient, KeapError};
