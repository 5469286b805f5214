//! The dry run: what delivery would send for a user, worked out from the row and keap-sync's
//! own tables, without calling any of Keap's write endpoints and without changing any sync
//! state (`keap-sync preview`, `keap-sync run --dry-run`).
//!
//! A plan is the first plan of [`crate::deliver::plan`], the planner delivery follows, made
//! from the state keap-sync keeps: the mapping and the per-field fingerprints of what Keap
//! holds. Delivery plans again after each read of Keap (a contact before an array property is
//! written, a lookup by email before a first link), which can only remove or replace calls, so
//! the real calls are never more than the plan. Keap is asked only for names: the contact model
//! when custom fields are mapped by name (`GET /v1/contacts/model`) and tag ids of tags
//! configured by name (`GET /v1/tags`); a configuration that uses ids only makes no call at all.
//! Those reads count against the day like any call (invariant 15): each is reserved in
//! `keap_sync.quota_usage` as it is made, one at a time, so an interrupted preview leaves no
//! call counted that it did not make. Getting a credential for them may refresh the OAuth
//! grant, which stores the new token pair: the credential's upkeep, not sync state.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::access::KeapAccess;
use crate::catalog::{Catalog, Tags};
use crate::config::{Config, OnDelete, TagRef};
use crate::daemon::RunError;
use crate::db::{self, DbError};
use crate::deliver::plan::{self, Mapped, Seen, Step, User};
use crate::keap::route::{self, Route};
use crate::keap::{Auth, KeapError};
use crate::mapping::{CustomModel, Held, Mapper};
use crate::outbox::{self, Mapping, ReadUser};
use crate::ratelimit::Reserving;
use crate::schema::{self, UserTable};

/// Which users to preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These user keys.
    Keys(Vec<String>),
    /// Every user of the table, in key order, at most this many (`None`: all).
    All(Option<u64>),
    /// The changes waiting in the outbox, in delivery order, at most this many.
    Pending(u64),
}

/// One call that delivery would make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// `PATCH`, `PUT`, …
    pub method: &'static str,
    /// Below the API base, with the query: `/v1/contacts/1001?update_mask=given_name`.
    pub path: String,
    /// The JSON body, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// What delivery would do for one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The user key.
    pub user: String,
    /// The contact the user is linked to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<i64>,
    /// `create_or_update`, `update`, `nothing`, `delete`, `keep` (deleted user, contact kept),
    /// `tag` (deleted user, contact tagged) or `parked` (a problem to fix first).
    pub action: &'static str,
    /// The calls, in order. Reads are listed only where the write depends on them.
    pub calls: Vec<Call>,
    /// The owned properties that differ from what Keap holds (for `update`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// Why the change would be parked: names the user key, the column and the rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Anything else worth knowing (a tag that would be created, arrays merged at send time).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Why a preview could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The configuration, schema or database.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Keap's contact model is needed (custom fields by name) and could not be read.
    #[error("cannot read Keap's contact model, needed for the custom fields mapped by name: {0}")]
    Model(String),
}

impl From<DbError> for PreviewError {
    fn from(e: DbError) -> Self {
        PreviewError::Run(e.into())
    }
}

impl From<schema::SchemaError> for PreviewError {
    fn from(e: schema::SchemaError) -> Self {
        PreviewError::Run(e.into())
    }
}

/// Users read per statement.
const BATCH: usize = 500;

/// The planner: the mapping, the table, and Keap for names only.
struct Planner {
    db: Client,
    table: UserTable,
    mapper: Mapper,
    on_delete: OnDelete,
    keap: Option<(KeapAccess, Catalog)>,
    /// Reserves each call made for names in `keap_sync.quota_usage`, one at a time, as it is
    /// made: those calls count against the day (invariant 15), and only those.
    _reserving: Option<Reserving>,
    model: Option<CustomModel>,
    timeout: Duration,
}

impl Planner {
    /// A planner on its own connection; it asks Keap (within the quota) only when tag names or custom
    /// fields must be resolved.
    async fn new(config: &Config) -> Result<Planner, PreviewError> {
        let pg = db::parse(config.database().map_err(RunError::from)?)?;
        let db = db::connect(&pg).await?;
        schema::ensure_current(&db).await?;
        let table = UserTable::resolve(&db, &config.users).await?;
        let mapper = Mapper::new(&config.users);
        let on_delete = config.delivery.on_delete.clone();
        let names = mapper.uses_names()
            || matches!(&on_delete, OnDelete::Tag { tag: TagRef::Name(_), .. })
            || mapper.needs_model();
        let keap = if names {
            Some((KeapAccess::build(config, &pg).map_err(RunError::from)?, Catalog::default()))
        } else {
            None
        };
        let mut planner = Planner {
            db,
            table,
            mapper,
            on_delete,
            keap,
            _reserving: None,
            model: None,
            timeout: config.keap.request_timeout,
        };
        planner._reserving =
            planner.keap.as_ref().map(|(access, _)| Reserving::start_exact(&access.limiter, &pg));
        if planner.mapper.needs_model() {
            let model = planner.read_model().await.map_err(PreviewError::Model)?;
            planner
                .mapper
                .check_model(&model)
                .map_err(|e| RunError::Config(crate::config::ConfigError::Invalid(e)))?;
            planner.model = Some(model);
        }
        Ok(planner)
    }

    /// When a Keap read started now must be done: two request timeouts from now.
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout * 2
    }

    /// The credential for a Keap read, or why there is none.
    async fn auth(&self) -> Result<Auth, String> {
        let Some((access, _)) = &self.keap else { return Err("no Keap access configured".into()) };
        access.tokens.auth(&self.db).await.map_err(|e| e.to_string())
    }

    /// Keap's custom fields, read once through the catalog.
    async fn read_model(&self) -> Result<CustomModel, String> {
        let auth = self.auth().await?;
        let Some((access, catalog)) = &self.keap else { return Err("no Keap access".into()) };
        catalog
            .model(&access.keap, &auth, self.deadline())
            .await
            .cloned()
            .map_err(|e: KeapError| e.to_string())
    }

    /// Tag ids for `refs`, never creating one. A name not resolved (missing, with
    /// `create_missing`; or Keap not asked) gets a stand-in id below zero that is printed
    /// by name; a missing one without `create_missing` is the user's problem.
    async fn tags(&self, refs: &BTreeSet<TagRef>, names: &mut StandIns) -> Result<BTreeSet<i64>, String> {
        let mut ids = BTreeSet::new();
        // The credential is read once for all the names (for OAuth it is a database read).
        let mut credential: Option<Result<Auth, String>> = None;
        for r in refs {
            let name = match r {
                TagRef::Id(id) => {
                    ids.insert(*id);
                    continue;
                }
                TagRef::Name(name) => name,
            };
            let auth = match &mut credential {
                Some(read) => read,
                unread => unread.insert(self.auth().await),
            };
            let found = match auth {
                Ok(auth) => self.tag_id(auth, r).await,
                Err(e) => Err(e.clone()),
            };
            match found {
                Ok(Tags::Ids(m)) => ids.extend(m.into_values()),
                Ok(Tags::Missing(_)) if self.mapper.create_missing_tags() => {
                    names.notes.push(format!("tag {name} does not exist in Keap; it would be created"));
                    ids.insert(names.stand_in(name));
                }
                Ok(Tags::Missing(_)) => {
                    return Err(format!(
                    "Keap has no tag named {name}; create it in Keap, or set `[tags] create_missing = true`"
                ))
                }
                Err(e) => {
                    names.notes.push(format!("tag names not resolved ({e}); shown by name"));
                    ids.insert(names.stand_in(name));
                }
            }
        }
        Ok(ids)
    }

    /// One tag name looked up in Keap (cached by the catalog), never created.
    async fn tag_id(&self, auth: &Auth, r: &TagRef) -> Result<Tags, String> {
        let (access, catalog) = self.keap.as_ref().ok_or("no Keap access")?;
        let one = BTreeSet::from([r.clone()]);
        catalog.tag_ids(&access.keap, auth, &one, false, self.deadline()).await.map_err(|e| e.to_string())
    }

    /// Plans for `keys`, in order.
    async fn plan(&self, keys: &[String]) -> Result<Vec<Plan>, PreviewError> {
        let mut plans = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let mut rows = outbox::read_users(&self.db, &self.table, chunk).await?;
            let maps = outbox::mappings(&self.db, chunk).await?;
            for key in chunk {
                plans.push(self.plan_one(key, rows.remove(key), maps.get(key)).await);
            }
        }
        Ok(plans)
    }

    /// What delivery would do for one user now: the planner's first plan, shown as calls.
    async fn plan_one(&self, key: &str, row: Option<ReadUser>, mapping: Option<&Mapping>) -> Plan {
        let shown = Plan::new(key, mapping.map(|m| m.contact_id));
        let mut names = StandIns::default();
        let row = match row {
            None => return self.plan_delete(shown, names).await,
            Some(Err(unreadable)) => return shown.parked(unreadable.0),
            Some(Ok(row)) => row,
        };
        let payload = match self.mapper.payload(key, &row, self.model.as_ref()) {
            Ok(p) => p,
            Err(e) => return shown.parked(e.to_string()),
        };
        let mapped = mapping.map(|m| Mapped {
            id: m.contact_id,
            held: Held::of_mapping(m.sent.as_ref(), m.fingerprint.as_deref(), &payload),
        });
        let want = self.tags(&payload.tags, &mut names).await;
        let on_create = match plan::needs_on_create(mapped.as_ref()) {
            true => self.tags(&self.mapper.on_create().iter().cloned().collect(), &mut names).await,
            false => Ok(BTreeSet::new()),
        };
        let (want, on_create) = match (want, on_create) {
            (Ok(want), Ok(on_create)) => (want, on_create),
            (Err(e), _) | (_, Err(e)) => return shown.parked(format!("user {key}: {e}")),
        };
        let user = User {
            key,
            payload: &payload,
            mapped: mapped.as_ref(),
            in_doubt: None,
            want: &want,
            on_create: &on_create,
            seen: Seen::Nothing,
            keap_moved: false,
        };
        shown.present(mapped.is_some(), &plan::present(&user), names)
    }

    /// A deleted user: the `on_delete` policy on the contact mapped now.
    async fn plan_delete(&self, mut shown: Plan, mut names: StandIns) -> Plan {
        let Some(id) = shown.contact_id else {
            shown.notes.push("user deleted, never synced: nothing to do".into());
            return shown;
        };
        let tag = match &self.on_delete {
            OnDelete::Keep => {
                shown.action = "keep";
                shown.notes.push("user deleted: the contact is kept, the mapping forgotten".into());
                return shown;
            }
            OnDelete::DeleteContact => {
                shown.action = "delete";
                None
            }
            OnDelete::Tag { tag, .. } => {
                shown.action = "tag";
                match self.tags(&BTreeSet::from([tag.clone()]), &mut names).await {
                    Ok(ids) => ids.first().copied(),
                    Err(e) => {
                        let problem = format!("user {}: {e}", shown.user);
                        return shown.parked(problem);
                    }
                }
            }
        };
        shown.show(&plan::deleted(id, &self.on_delete, tag, None), names)
    }
}

/// Tag names shown in place of ids not known (a tag that would be created, or names Keap was
/// not asked for): each gets an id below zero for the planner, printed back as its name.
#[derive(Default)]
struct StandIns {
    names: Vec<String>,
    notes: Vec<String>,
}

impl StandIns {
    /// The id below zero that stands for the tag `name` (the same one each time it is asked).
    fn stand_in(&mut self, name: &str) -> i64 {
        let at = self.names.iter().position(|n| n == name).unwrap_or_else(|| {
            self.names.push(name.to_owned());
            self.names.len() - 1
        });
        -1 - at as i64
    }

    /// `ids` as shown: a stand-in as its tag name, any other id as a number.
    fn shown(&self, ids: &BTreeSet<i64>) -> Vec<Value> {
        let name = |id: i64| usize::try_from(-1 - id).ok().and_then(|at| self.names.get(at));
        ids.iter().map(|id| name(*id).map_or_else(|| json!(id), |n| json!(n))).collect()
    }
}

impl Plan {
    /// A plan for `user` that does nothing yet.
    fn new(user: &str, contact_id: Option<i64>) -> Plan {
        Plan {
            user: user.to_owned(),
            contact_id,
            action: "nothing",
            calls: Vec::new(),
            changed: Vec::new(),
            problem: None,
            notes: Vec::new(),
        }
    }

    /// The plan turned into parking the change for `problem`, with no calls.
    fn parked(mut self, problem: String) -> Plan {
        self.action = "parked";
        self.calls.clear();
        self.problem = Some(problem);
        self
    }

    /// A present user's plan: created or updated, and which owned properties change.
    fn present(mut self, mapped: bool, decided: &plan::Plan, names: StandIns) -> Plan {
        self.action = match (mapped, decided.steps.is_empty()) {
            (false, _) => "create_or_update",
            (true, true) => "nothing",
            (true, false) => "update",
        };
        if mapped {
            self.changed = decided.changed.clone();
        }
        if let Some(status) = &decided.withheld {
            self.notes.push(format!(
                "consent is not sent: Keap holds an opt-out ({status}) for the address (contact.opt_in_reason's over_opt_out lifts it)"
            ));
        }
        self.show(decided, names)
    }

    /// The planner's steps as the calls they make, with what is worth knowing about them.
    fn show(mut self, decided: &plan::Plan, names: StandIns) -> Plan {
        let deleting = matches!(self.action, "delete" | "tag");
        for step in &decided.steps {
            if let Step::Park(problem) = step {
                return self.parked(problem.clone());
            }
            self.calls.extend(call_of(step, &names));
            match step {
                Step::Lookup { .. } => self.notes.push(
                    "a contact found by this email is linked and gets a PATCH of what differs; otherwise the PUT creates it"
                        .into(),
                ),
                Step::Read { .. } if !deleting => self.notes.push(
                    "array properties are sent with the slots keap-sync does not own as Keap holds them at send time"
                        .into(),
                ),
                _ => {}
            }
        }
        self.notes.extend(names.notes);
        self
    }
}

/// The Keap call of one step (`None` for a step that is not a call).
fn call_of(step: &Step, names: &StandIns) -> Option<Call> {
    let (route, body) = match step {
        Step::Lookup { email } => (Route::find_by_email(email, &[]), None),
        Step::Read { id } => (Route::get_contact(id, &[]), None),
        Step::Create { body } => (Route::upsert_contact(), Some(Value::Object(body.clone()))),
        Step::Patch { id, body, mask } => {
            (Route::update_contact(id, mask), Some(Value::Object(body.clone())))
        }
        Step::ApplyTags { id, ids } => (Route::apply_tags(id), Some(route::tag_ids(&names.shown(ids)))),
        Step::RemoveTags { id, ids } => {
            (Route::remove_tags(id, &ids.iter().copied().collect::<Vec<_>>()), None)
        }
        Step::Delete { id } => (Route::delete_contact(id), None),
        Step::OptOut { email, reason } => (Route::opt_out(email.as_deref()), Some(route::opt_out(reason))),
        Step::Settle | Step::Link { .. } | Step::Park(_) => return None,
    };
    Some(Call { method: route.method_name(), path: route.path_and_query(), body })
}

/// Plans for the selected users. Makes no Keap write call and changes no table.
pub async fn preview(config: &Config, which: &Selection) -> Result<Vec<Plan>, PreviewError> {
    let planner = Planner::new(config).await?;
    let plans = planner.select_and_plan(which).await;
    planner.finish().await;
    plans
}

impl Planner {
    /// The users `which` selects (given keys, pending changes, or every user in pages), each planned.
    async fn select_and_plan(&self, which: &Selection) -> Result<Vec<Plan>, PreviewError> {
        let planner = self;
        let keys: Vec<String> = match which {
            Selection::Keys(keys) => keys.clone(),
            Selection::Pending(limit) => {
                outbox::pending(&planner.db, clamp(*limit)).await?.into_iter().map(|(k, _)| k).collect()
            }
            Selection::All(limit) => {
                let mut keys = Vec::new();
                let max = limit.map_or(i64::MAX, clamp);
                while (keys.len() as i64) < max {
                    let page = (max - keys.len() as i64).min(BATCH as i64 * 10);
                    let more =
                        outbox::user_keys(&planner.db, &planner.table, keys.last().map(String::as_str), page)
                            .await?;
                    if more.is_empty() {
                        break;
                    }
                    keys.extend(more);
                }
                keys
            }
        };
        planner.plan(&keys).await
    }

    /// Gives back the day's call reservations the name lookups did not use.
    async fn finish(&self) {
        if let Some((access, _)) = &self.keap {
            access.limiter.give_back(&self.db).await;
        }
    }
}

/// `n` as an `int8` limit; one too large for it becomes the largest.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `run --dry-run`: plans every pending change as it arrives and logs it, until `shutdown`.
/// Claims nothing and records nothing, so each change is logged once per version seen.
pub async fn dry_run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), PreviewError> {
    let planner = Planner::new(&config).await?;
    let pg = db::parse(config.database().map_err(RunError::from)?)?;
    let wake = Arc::new(Notify::new());
    let mut listener = db::connect_listener(&pg, db::NOTIFY_CHANNEL, Arc::clone(&wake)).await?;
    tracing::info!("dry run: logging what would be sent; nothing is sent and nothing is recorded");
    let mut seen: HashMap<String, i64> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        let pending = outbox::pending(&planner.db, 10_000).await?;
        let fresh: Vec<String> =
            pending.iter().filter(|(k, v)| seen.get(k) != Some(v)).map(|(k, _)| k.clone()).collect();
        for plan in planner.plan(&fresh).await? {
            let json = serde_json::to_string(&plan).unwrap_or_default();
            tracing::info!(user = %plan.user, action = plan.action, plan = %json, "dry run: would deliver");
        }
        seen = pending.into_iter().collect();
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = wake.notified() => {}
            _ = tokio::time::sleep(config.delivery.poll_interval) => {}
            reason = listener.lost.recv() => {
                tracing::warn!(reason = reason.unwrap_or_default(), "dry run: lost the LISTEN connection; reconnecting");
                listener = db::connect_listener(&pg, db::NOTIFY_CHANNEL, Arc::clone(&wake)).await?;
            }
        }
    }
}
