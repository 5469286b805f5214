//! Recording results in batches: one statement for every result of a kind that arrives while
//! the previous statements run.
//!
//! Why: in a drain, a statement per delivery step was the largest share of the database's work.
//! A statement costs its round trip, an executor start, its triggers and a commit, whatever it
//! records, so one statement for sixteen results costs little more than one for one. Batching
//! by arrival (the way a database groups commits) adds no wait: a result that arrives when
//! nothing is being recorded goes out at once, alone; only results that arrive while statements
//! run wait, for those, and then go together.
//!
//! Three steps of a delivery are recorded here: a success ([`super::complete`]), the body
//! of a create about to be sent ([`super::begin_create_many`], invariant 14) and the link of a
//! user to a contact ([`super::link_many`]). Each delivery sends its step with a reply channel
//! and waits for the answer, so it goes on (or ends) only once the step is recorded, exactly as
//! with one statement of its own. One task per session ([`Recorder::start`]) owns the receiving
//! end and runs, for everything waiting, one statement per kind, one round after another, on
//! the session's connection, where statements run one after another anyway. The steps of one
//! round are of different users (a user has one delivery in flight), so their order does not
//! matter.
//!
//! When a batch statement fails (a lock timeout on one user's row, a unique violation that
//! means "another user's create for this email is in flight" or "this contact is linked to
//! another user", a lost connection), nothing of it is recorded, and each step is recorded
//! alone, concurrently, with the waits and tries [`super::with_retries`] has left after a first
//! failed try ([`super::with_retries_after`]), or at once after a unique violation, which is an
//! answer and not a failure: each gets the answer it would have had alone, and one locked row
//! costs its own delivery and no one else's (ARCHITECTURE.md, "Where concurrency
//! lives"). Those single statements run beside the next batches; [`Recorder::flush`] waits for
//! them too.
//!
//! The channel is unbounded but never long: each delivery sends one step and waits for its
//! answer, so it holds at most `delivery.concurrency` steps.

use std::future::Future;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{
    begin_create, begin_create_many, complete, link, link_many, with_retries, with_retries_after, Claim,
    Completion, CreateSlot, CreateStart, Done, LinkTo, Linked,
};
use crate::db::{Db, DbError};

/// The most steps of one kind one statement records.
const MAX_BATCH: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, DbError>>;

/// A step waiting to be recorded, or a request to say when everything sent before it is.
enum Request {
    Complete(Completion, Reply<()>),
    BeginCreate(CreateStart, Reply<CreateSlot>),
    Link(LinkTo, Reply<Linked>),
    Flush(oneshot::Sender<()>),
}

/// The sending side, shared by a session's deliveries.
#[derive(Clone)]
pub(crate) struct Recorder {
    db: Arc<Db>,
    instance: String,
    requests: mpsc::UnboundedSender<Request>,
}

impl Recorder {
    /// Starts the recording task of a session on its connection. It ends when every
    /// [`Recorder`] of it is dropped, after recording what was sent.
    pub(crate) fn start(db: Arc<Db>, instance: String) -> Recorder {
        let (requests, received) = mpsc::unbounded_channel();
        #[allow(
            clippy::disallowed_methods,
            reason = "owned by the Recorder: the task ends once every Recorder is dropped, after recording what was sent"
        )]
        tokio::spawn(record_until_closed(Arc::clone(&db), instance.clone(), received));
        Recorder { db, instance, requests }
    }

    /// Records a success of `claim` (see [`super::complete`]). Errors are
    /// [`super::with_retries`]'s.
    pub(crate) async fn complete(&self, claim: &Claim, done: Done) -> Result<(), DbError> {
        self.send(Completion { claim: claim.bare(), done }).await
    }

    /// Records the body of a create about to be sent (see [`super::begin_create`]).
    pub(crate) async fn begin_create(&self, claim: &Claim, body: &Value) -> Result<CreateSlot, DbError> {
        self.send(CreateStart { claim: claim.bare(), body: body.clone() }).await
    }

    /// Links the user to `contact_id` (see [`super::link`]).
    pub(crate) async fn link(&self, claim: &Claim, contact_id: i64, sent: Value) -> Result<Linked, DbError> {
        self.send(LinkTo { claim: claim.bare(), contact_id, sent }).await
    }

    /// Hands `step` to the recording task and waits for its answer; records it here if the task is gone.
    async fn send<S: Step>(&self, step: S) -> Result<S::Answer, DbError> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(request)) = self.requests.send(S::request(step, reply)) {
            // The task is gone (it can only have panicked): record this one here.
            let step = S::back(request);
            return with_retries(S::WHAT, &step.claim().user_key, || step.alone(&self.db, &self.instance))
                .await;
        }
        // Dropped unanswered only if the task panicked mid-batch: whether the step was
        // recorded is unknown, and the change is delivered again when its lease ends.
        answer.await.unwrap_or(Err(DbError::Unrecorded))
    }

    /// Waits until every step sent before is recorded or has failed.
    pub(crate) async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }
}

/// A kind of step: its statement for many, and for one.
trait Step: Sized + Send + Sync + 'static {
    type Answer: Send + 'static;
    /// The statement's name in logs.
    const WHAT: &'static str;
    /// The request that carries this step to the recording task, answered on `reply`.
    fn request(self, reply: Reply<Self::Answer>) -> Request;
    /// The step of a request that [`Step::request`] made.
    fn back(request: Request) -> Self;
    /// The claim the step records for (its user key names it in logs).
    fn claim(&self) -> &Claim;
    /// One answer per step, in order; fails as a whole.
    fn many<'a>(
        db: &'a Db,
        instance: &'a str,
        steps: &'a [Self],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, DbError>> + Send + 'a;
    /// The statement for this step alone, after its batch failed or without a recording task.
    fn alone<'a>(
        &'a self,
        db: &'a Db,
        instance: &'a str,
    ) -> impl Future<Output = Result<Self::Answer, DbError>> + Send + 'a;
}

impl Step for Completion {
    type Answer = ();
    const WHAT: &'static str = "complete";
    fn request(self, reply: Reply<()>) -> Request {
        Request::Complete(self, reply)
    }
    fn back(request: Request) -> Self {
        let Request::Complete(step, _) = request else { unreachable!("sent a Complete") };
        step
    }
    fn claim(&self) -> &Claim {
        &self.claim
    }
    async fn many(db: &Db, instance: &str, steps: &[Self]) -> Result<Vec<()>, DbError> {
        complete(db, instance, steps).await?;
        Ok(vec![(); steps.len()])
    }
    async fn alone(&self, db: &Db, instance: &str) -> Result<(), DbError> {
        complete(db, instance, std::slice::from_ref(self)).await
    }
}

impl Step for CreateStart {
    type Answer = CreateSlot;
    const WHAT: &'static str = "begin_create";
    fn request(self, reply: Reply<CreateSlot>) -> Request {
        Request::BeginCreate(self, reply)
    }
    fn back(request: Request) -> Self {
        let Request::BeginCreate(step, _) = request else { unreachable!("sent a BeginCreate") };
        step
    }
    fn claim(&self) -> &Claim {
        &self.claim
    }
    async fn many(db: &Db, instance: &str, steps: &[Self]) -> Result<Vec<CreateSlot>, DbError> {
        begin_create_many(db, instance, steps).await
    }
    async fn alone(&self, db: &Db, instance: &str) -> Result<CreateSlot, DbError> {
        begin_create(db, &self.claim, instance, &self.body).await
    }
}

impl Step for LinkTo {
    type Answer = Linked;
    const WHAT: &'static str = "link";
    fn request(self, reply: Reply<Linked>) -> Request {
        Request::Link(self, reply)
    }
    fn back(request: Request) -> Self {
        let Request::Link(step, _) = request else { unreachable!("sent a Link") };
        step
    }
    fn claim(&self) -> &Claim {
        &self.claim
    }
    async fn many(db: &Db, instance: &str, steps: &[Self]) -> Result<Vec<Linked>, DbError> {
        link_many(db, instance, steps).await
    }
    async fn alone(&self, db: &Db, instance: &str) -> Result<Linked, DbError> {
        link(db, &self.claim, instance, self.contact_id, &self.sent).await
    }
}

/// The recording task: takes every request waiting (at most [`MAX_BATCH`]), records each
/// kind's steps in one statement, answers each, and takes the next.
async fn record_until_closed(db: Arc<Db>, instance: String, mut received: mpsc::UnboundedReceiver<Request>) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    // Steps of a failed batch, each being recorded alone.
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
        let (mut completes, mut creates, mut links, mut flushes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for request in requests.drain(..) {
            match request {
                Request::Complete(step, reply) => completes.push((step, reply)),
                Request::BeginCreate(step, reply) => creates.push((step, reply)),
                Request::Link(step, reply) => links.push((step, reply)),
                Request::Flush(reply) => flushes.push(reply),
            }
        }
        // Creates first: their deliveries wait for the answer to make a Keap call.
        record(&db, &instance, creates, &mut alone).await;
        record(&db, &instance, links, &mut alone).await;
        record(&db, &instance, completes, &mut alone).await;
        if !flushes.is_empty() {
            while alone.join_next().await.is_some() {}
            for reply in flushes {
                let _ = reply.send(());
            }
        }
    }
    while alone.join_next().await.is_some() {}
}

/// Whether a batch failed on a unique constraint, which is an answer for the steps alone, not a failure.
fn is_unique_violation(e: &DbError) -> bool {
    matches!(e, DbError::Query(q) if q.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

/// Records `batch` in one statement; if it fails, each step alone (in `alone`).
async fn record<S: Step>(
    db: &Arc<Db>,
    instance: &str,
    batch: Vec<(S, Reply<S::Answer>)>,
    alone: &mut JoinSet<()>,
) {
    if batch.is_empty() {
        return;
    }
    let steps: Vec<S>;
    let replies: Vec<Reply<S::Answer>>;
    (steps, replies) = batch.into_iter().unzip();
    let error = match S::many(db, instance, &steps).await {
        Ok(answers) if answers.len() == steps.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
            return;
        }
        Ok(answers) => {
            // Cannot happen (one row per element); recorded alone rather than guessed.
            tracing::error!(
                statement = S::WHAT,
                steps = steps.len(),
                answers = answers.len(),
                "a batch statement answered for the wrong number of steps; recording each alone"
            );
            None
        }
        Err(e) => Some(e),
    };
    if let Some(error) = &error {
        let users: Vec<&str> = steps.iter().map(|s| s.claim().user_key.as_str()).take(10).collect();
        tracing::warn!(statement = S::WHAT, steps = steps.len(), users = ?users, error = %error, detail = %error.server_message(), "recording a batch failed; recording each alone");
    }
    // A unique violation is an answer, not a failure: a step alone reads it as "another user's
    // create for this email is in flight" or "this contact is linked to another user". Each
    // step must ask again at once, as its own first try, or a wait would let the other create
    // finish and turn that answer into a create of its own (and a lookup skipped).
    let error = error.filter(|e| !is_unique_violation(e)).map(Arc::new);
    for (step, reply) in steps.into_iter().zip(replies) {
        let (db, instance, error) = (Arc::clone(db), instance.to_owned(), error.clone());
        alone.spawn(async move {
            let statement = || step.alone(&db, &instance);
            // The batch was each one's first try: the same waits and number of tries as alone.
            let result = match &error {
                Some(e) => with_retries_after(e, S::WHAT, &step.claim().user_key, statement).await,
                None => with_retries(S::WHAT, &step.claim().user_key, statement).await,
            };
            let _ = reply.send(result);
        });
    }
}
