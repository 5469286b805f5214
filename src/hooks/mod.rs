//! Keap talks back through REST hooks (issue 29, scope 4): the receiver and its queue.
//!
//! ```text
//!  Keap ──https──▶ reverse proxy ──http──▶ receiver (`[hooks] listen`, POST /<secret path>)
//!      handshake: echo `X-Hook-Secret`        delivery: ids ─▶ keap_sync.hook_queue ─▶ 200
//!  daemon (idle, after live changes) ─▶ take queued ids ─▶ read those contacts (v2 listing by
//!      ids, limiter and quota) ─▶ mirror ─▶ inbound pass ─▶ users' Keap-owned columns
//! ```
//!
//! The receiver never calls Keap: it answers within one short statement (Keap gives up on a
//! receiver that takes 30 s, and a slow one has made hooks go Inactive). A delivery is a hint,
//! not data: it names contacts, and the daemon reads them as they are when it gets to them
//! (design invariant 2), so duplicate, late and out-of-order deliveries converge. A hook that
//! never comes (Inactive, a legacy action set) is covered by the mirror's sweep. Each queued
//! contact keeps the earliest and latest change time its deliveries gave (`timestamp`), so a
//! contact whose changes the mirror holds, such as the echo of keap-sync's own write, is taken
//! off the queue without a call (`mirror/hooked.rs`).
//!
//! - `receiver`: the HTTP side: the secret path, the handshake, the body cap, the answers;
//! - `manage`: Keap's side: the subscriptions (`keap-sync hooks …`, the daemon's watchdog);
//! - `queue`: the one table (`sql/0020_hook_queue.sql`, `0024_hook_changed_at.sql`): push ids,
//!   coalesced per contact, with their change times.

mod manage;
mod queue;
mod receiver;

pub(crate) use manage::{hook_url, probe, record, recorded, HookApi, HookError, Survey, VERIFIED};
pub(crate) use queue::QUEUED;
pub(crate) use receiver::{serve, Receiver};
