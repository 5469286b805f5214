//! Recording successes in batches: one statement for every result that arrives while the
//! previous statement runs.
//!
//! Why: in a drain, recording each success alone was the largest share of the database's work
//! per delivery. A statement costs its round trip, an executor start, the outbox count's
//! statement trigger and a commit, whatever it records, so one statement for sixteen results
//! costs little more than one for one. Batching by arrival (the way a database groups commits)
//! adds no wait: a result that arrives when nothing is being recorded goes out at once, alone;
//! only results that arrive while a statement runs wait, for that statement, and then go
//! together.
//!
//! One task per session ([`Completions::start`]) owns the receiving end; each delivery sends
//! its result with a reply channel and waits for the answer, so a delivery still ends only
//! once its result is recorded (or known not to be). The task records one batch at a time on
//! the session's connection, where statements run one after another anyway.
//!
//! When a batch statement fails (a lock timeout on one user's mapping row, a deadlock with a
//! key change, a lost connection), nothing of it is recorded, and each result is recorded
//! alone, concurrently, with the waits and tries [`super::with_retries`] has left after a first
//! failed try ([`super::with_retries_after`]), so that one locked row costs its own delivery and
//! no one else's (ARCHITECTURE.md, "Where concurrency lives"). Those single statements run
//! beside the next batches; [`Completions::flush`] waits for them too.
//!
//! The channel is unbounded but never long: each delivery sends one result and waits for its
//! answer, so it holds at most `delivery.concurrency` results.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{complete, complete_many, with_retries, with_retries_after, Claim, Completion, Done};
use crate::db::{Db, DbError};

/// The most results one statement records.
const MAX_BATCH: usize = 256;

/// A result waiting to be recorded, or a request to say when everything sent before it is.
enum Request {
    Record(Completion, oneshot::Sender<Result<(), DbError>>),
    Flush(oneshot::Sender<()>),
}

/// The sending side, shared by a session's deliveries.
#[derive(Clone)]
pub(crate) struct Completions {
    db: Arc<Db>,
    instance: String,
    requests: mpsc::UnboundedSender<Request>,
}

impl Completions {
    /// Starts the recording task of a session on its connection. It ends when every
    /// [`Completions`] of it is dropped, after recording what was sent.
    pub(crate) fn start(db: Arc<Db>, instance: String) -> Completions {
        let (requests, received) = mpsc::unbounded_channel();
        tokio::spawn(record_until_closed(Arc::clone(&db), instance.clone(), received));
        Completions { db, instance, requests }
    }

    /// Records a success of `claim` (see [`super::complete`]), with the others that arrive
    /// meanwhile. Errors are [`super::with_retries`]'s.
    pub(crate) async fn complete(&self, claim: &Claim, done: Done) -> Result<(), DbError> {
        let completion = match Completion::of(claim, done) {
            Ok(c) => c,
            // Forgetting a mapping (a deleted user's contact deleted) is rare: alone.
            Err(done) => return self.alone(claim, &done).await,
        };
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(request)) = self.requests.send(Request::Record(completion, reply)) {
            // The task is gone (it can only have panicked): record this one here.
            let Request::Record(completion, _) = request else { unreachable!("sent a Record") };
            let (claim, done) = completion.parts();
            return self.alone(&claim, &done).await;
        }
        // Dropped unanswered only if the task panicked mid-batch: whether it was recorded is
        // unknown, and the change is delivered again when its lease ends.
        answer.await.unwrap_or(Err(DbError::Unrecorded))
    }

    /// Waits until every result sent before is recorded or has failed.
    pub(crate) async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }

    async fn alone(&self, claim: &Claim, done: &Done) -> Result<(), DbError> {
        with_retries("complete", &claim.user_key, || complete(&self.db, claim, &self.instance, done)).await?;
        Ok(())
    }
}

/// The recording task: takes every request waiting (at most [`MAX_BATCH`]), records their
/// results in one statement, answers each, and takes the next.
async fn record_until_closed(db: Arc<Db>, instance: String, mut received: mpsc::UnboundedReceiver<Request>) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    // Results of a failed batch, each being recorded alone.
    let mut alone = JoinSet::new();
    loop {
        tokio::select! {
            taken = received.recv_many(&mut requests, MAX_BATCH) => {
                if taken == 0 {
                    break;
                }
            }
            Some(_) = alone.join_next(), if !alone.is_empty() => continue,
        }
        let mut batch = Vec::with_capacity(requests.len());
        let mut flushes = Vec::new();
        for request in requests.drain(..) {
            match request {
                Request::Record(completion, reply) => batch.push((completion, reply)),
                Request::Flush(reply) => flushes.push(reply),
            }
        }
        if !batch.is_empty() {
            record(&db, &instance, batch, &mut alone).await;
        }
        if !flushes.is_empty() {
            while alone.join_next().await.is_some() {}
            for reply in flushes {
                let _ = reply.send(());
            }
        }
    }
    while alone.join_next().await.is_some() {}
}

/// Records `batch` in one statement; if it fails, each result alone (in `alone`).
async fn record(
    db: &Arc<Db>,
    instance: &str,
    batch: Vec<(Completion, oneshot::Sender<Result<(), DbError>>)>,
    alone: &mut JoinSet<()>,
) {
    let completions: Vec<Completion>;
    let replies: Vec<_>;
    (completions, replies) = batch.into_iter().unzip();
    let error = match complete_many(db, instance, &completions).await {
        Ok(()) => {
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        Err(e) => e,
    };
    let users: Vec<&str> = completions.iter().map(|c| c.user_key.as_str()).take(10).collect();
    tracing::warn!(results = completions.len(), users = ?users, error = %error, detail = %error.server_message(), "recording a batch of results failed; recording each alone");
    let error = Arc::new(error);
    for (completion, reply) in completions.into_iter().zip(replies) {
        let (db, instance, error) = (Arc::clone(db), instance.to_owned(), Arc::clone(&error));
        alone.spawn(async move {
            let (claim, done) = completion.parts();
            // The batch was each one's first try: the same waits and number of tries as alone.
            let result = with_retries_after(&error, "complete", &claim.user_key, || {
                complete(&db, &claim, &instance, &done)
            })
            .await;
            let _ = reply.send(result.map(|_| ()));
        });
    }
}
