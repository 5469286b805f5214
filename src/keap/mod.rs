//! Everything that speaks Keap's language: the REST v1 client the daemon uses and the wire
//! types it sends and reads. The fake Keap server that plays the API for tests lives in the
//! test kit (`testkit/src/fake.rs`), with wire types of its own.

mod client;
pub(crate) mod model;
pub(crate) mod route;
pub(crate) mod stamp;
mod tags_applied;
mod transport;
pub(crate) mod v2;

pub(crate) use client::{describe_reqwest, http_client};
pub(crate) use client::{Auth, ErrorKind, KeapClient, KeapError};
pub(crate) use tags_applied::TagsApplied;
pub(crate) use transport::{read_reply, redirect_refused};
