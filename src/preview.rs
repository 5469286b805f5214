//! The dry run: what delivery would send for a user, worked out from the row and keap-sync's
//! own tables, without calling any of Keap's write endpoints and without changing any table
//! (`keap-sync preview`, `keap-sync run --dry-run`).
//!
//! A plan is what [`crate::deliver`] would do from the state keap-sync keeps: the mapping and
//! the per-field fingerprints of what Keap holds. Delivery itself also reads Keap (a contact
//! before an array property is written, a lookup by email before a first link), so the real
//! call can be smaller than the plan — never larger. Keap is asked only for names: the contact
//! model when custom fields are mapped by name (`GET /v1/contacts/model`) and tag ids of tags
//! configured by name (`GET /v1/tags`); a configuration that uses ids only makes no call at all.
//! Getting a credential for those reads may refresh the OAuth grant, which stores the new
//! token pair: that is the credential's upkeep, not sync state.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::catalog::{Catalog, Tags};
use crate::config::{Config, OnDelete, TagRef};
use crate::daemon::{keap_access, KeapAccess, RunError};
use crate::db::{self, DbError};
use crate::keap::{Auth, KeapError};
use crate::mapping::{ContactPayload, CustomModel, Held, Mapper};
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
    /// Keeps the day's reservations topped up while Keap may be asked for names.
    _reserving: Option<Reserving>,
    model: Option<CustomModel>,
    timeout: Duration,
}

impl Planner {
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
        let keap = if names { Some((keap_access(config, &pg)?, Catalog::default())) } else { None };
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
        planner._reserving = planner.keap.as_ref().map(|(access, _)| Reserving::start(&access.limiter, &pg));
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

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout * 2
    }

    async fn auth(&self) -> Result<Auth, String> {
        let Some((access, _)) = &self.keap else { return Err("no Keap access configured".into()) };
        access.tokens.auth(&self.db).await.map_err(|e| e.to_string())
    }

    async fn read_model(&self) -> Result<CustomModel, String> {
        let auth = self.auth().await?;
        let Some((access, catalog)) = &self.keap else { return Err("no Keap access".into()) };
        catalog
            .model(&access.keap, &auth, self.deadline())
            .await
            .cloned()
            .map_err(|e: KeapError| e.to_string())
    }

    /// Tag ids for `refs`, never creating one: names not found are returned as names.
    async fn tags(&self, refs: &BTreeSet<TagRef>, notes: &mut Vec<String>) -> Result<Vec<Value>, String> {
        let mut shown = Vec::new();
        let mut names = BTreeSet::new();
        for r in refs {
            match r {
                TagRef::Id(id) => shown.push(json!(id)),
                TagRef::Name(_) => {
                    names.insert(r.clone());
                }
            }
        }
        if names.is_empty() {
            return Ok(shown);
        }
        let resolved = match self.auth().await {
            Ok(auth) => {
                let (access, catalog) = self.keap.as_ref().ok_or("no Keap access")?;
                let mut ids = Vec::new();
                for r in &names {
                    let one = BTreeSet::from([r.clone()]);
                    match catalog.tag_ids(&access.keap, &auth, &one, false, self.deadline()).await {
                        Ok(Tags::Ids(m)) => ids.extend(m.into_values().map(|id| json!(id))),
                        Ok(Tags::Missing(names)) if self.mapper.create_missing_tags() => {
                            notes.push(format!("tag {} does not exist in Keap; it would be created", names.join(", ")));
                            ids.push(json!(tag_name(r)));
                        }
                        Ok(Tags::Missing(names)) => {
                            return Err(format!(
                                "Keap has no tag named {}; create it in Keap, or set `[tags] create_missing = true`",
                                names.join(", ")
                            ))
                        }
                        Err(e) => {
                            notes.push(format!("tag names not resolved ({e}); shown by name"));
                            ids.push(json!(tag_name(r)));
                        }
                    }
                }
                ids
            }
            Err(e) => {
                notes.push(format!("tag names not resolved ({e}); shown by name"));
                names.iter().map(|r| json!(tag_name(r))).collect()
            }
        };
        shown.extend(resolved);
        Ok(shown)
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

    async fn plan_one(&self, key: &str, row: Option<ReadUser>, mapping: Option<&Mapping>) -> Plan {
        let mut plan = Plan {
            user: key.to_owned(),
            contact_id: mapping.map(|m| m.contact_id),
            action: "nothing",
            calls: Vec::new(),
            changed: Vec::new(),
            problem: None,
            notes: Vec::new(),
        };
        let row = match row {
            None => {
                self.plan_delete(&mut plan).await;
                return plan;
            }
            Some(Err(unreadable)) => return parked(plan, unreadable.0),
            Some(Ok(row)) => row,
        };
        let payload = match self.mapper.payload(key, &row, self.model.as_ref()) {
            Ok(p) => p,
            Err(e) => return parked(plan, e.to_string()),
        };
        let mut notes = Vec::new();
        let want = match self.tags(&payload.tags, &mut notes).await {
            Ok(t) => t,
            Err(e) => return parked(plan, format!("user {key}: {e}")),
        };
        plan.notes = notes;
        match mapping {
            Some(m) => self.plan_update(plan, &payload, m, want).await,
            None => self.plan_create(plan, &payload, want).await,
        }
    }

    async fn plan_create(&self, mut plan: Plan, payload: &ContactPayload, want: Vec<Value>) -> Plan {
        plan.action = "create_or_update";
        let on_create: BTreeSet<TagRef> = self.mapper.on_create().iter().cloned().collect();
        let mut tags = want;
        match self.tags(&on_create, &mut plan.notes).await {
            Ok(t) => tags.extend(t),
            Err(e) => {
                let problem = format!("user {}: {e}", plan.user);
                return parked(plan, problem);
            }
        }
        plan.calls.push(Call {
            method: "GET",
            path: format!("/v1/contacts?email={}", payload.email),
            body: None,
        });
        plan.notes.push(
            "a contact found by this email is linked and gets a PATCH of what differs; otherwise the PUT creates it"
                .into(),
        );
        plan.calls.push(Call {
            method: "PUT",
            path: "/v1/contacts".into(),
            body: Some(Value::Object(payload.create_body())),
        });
        if !tags.is_empty() {
            tags.dedup();
            plan.calls.push(Call {
                method: "POST",
                path: "/v1/contacts/{new}/tags".into(),
                body: Some(json!({ "tagIds": tags })),
            });
        }
        plan
    }

    async fn plan_update(
        &self,
        mut plan: Plan,
        payload: &ContactPayload,
        m: &Mapping,
        want: Vec<Value>,
    ) -> Plan {
        let id = m.contact_id;
        let held = Held::of_mapping(m.sent.as_ref(), m.fingerprint.as_deref(), payload);
        let changes = payload.changes(&held);
        let had: BTreeSet<i64> = held.tags().cloned().unwrap_or_default();
        let want_ids: BTreeSet<i64> = want.iter().filter_map(Value::as_i64).collect();
        let mut apply: Vec<Value> =
            want.iter().filter(|v| v.as_i64().is_none_or(|id| !had.contains(&id))).cloned().collect();
        if held.is_fresh() {
            let on_create: BTreeSet<TagRef> = self.mapper.on_create().iter().cloned().collect();
            match self.tags(&on_create, &mut plan.notes).await {
                Ok(t) => apply.extend(t),
                Err(e) => {
                    let problem = format!("user {}: {e}", plan.user);
                    return parked(plan, problem);
                }
            }
        }
        let remove: Vec<i64> = had.difference(&want_ids).copied().collect();
        if changes.any() {
            plan.action = "update";
            plan.changed = changes.paths();
            if changes.touch_arrays() {
                plan.calls.push(Call { method: "GET", path: format!("/v1/contacts/{id}"), body: None });
                plan.notes.push(
                    "array properties are sent with the slots keap-sync does not own as Keap holds them at send time".into(),
                );
            }
            let (body, mask) = payload.patch(&changes, None);
            let query: Vec<String> = mask.iter().map(|m| format!("update_mask={m}")).collect();
            plan.calls.push(Call {
                method: "PATCH",
                path: format!("/v1/contacts/{id}?{}", query.join("&")),
                body: Some(Value::Object(body)),
            });
        }
        if !apply.is_empty() {
            plan.action = if plan.action == "nothing" { "update" } else { plan.action };
            plan.calls.push(Call {
                method: "POST",
                path: format!("/v1/contacts/{id}/tags"),
                body: Some(json!({ "tagIds": apply })),
            });
        }
        if !remove.is_empty() {
            plan.action = if plan.action == "nothing" { "update" } else { plan.action };
            let ids: Vec<String> = remove.iter().map(i64::to_string).collect();
            plan.calls.push(Call {
                method: "DELETE",
                path: format!("/v1/contacts/{id}/tags?ids={}", ids.join(",")),
                body: None,
            });
        }
        plan
    }

    async fn plan_delete(&self, plan: &mut Plan) {
        let Some(id) = plan.contact_id else {
            plan.notes.push("user deleted, never synced: nothing to do".into());
            return;
        };
        match &self.on_delete {
            OnDelete::Keep => {
                plan.action = "keep";
                plan.notes.push("user deleted: the contact is kept, the mapping forgotten".into());
            }
            OnDelete::DeleteContact => {
                plan.action = "delete";
                plan.calls.push(Call { method: "DELETE", path: format!("/v1/contacts/{id}"), body: None });
            }
            OnDelete::Tag { tag, opt_out } => {
                plan.action = "tag";
                let mut notes = Vec::new();
                match self.tags(&BTreeSet::from([tag.clone()]), &mut notes).await {
                    Ok(ids) => plan.calls.push(Call {
                        method: "POST",
                        path: format!("/v1/contacts/{id}/tags"),
                        body: Some(json!({ "tagIds": ids })),
                    }),
                    Err(e) => {
                        plan.action = "parked";
                        plan.problem = Some(format!("user {}: {e}", plan.user));
                    }
                }
                plan.notes.extend(notes);
                if let Some(reason) = opt_out {
                    plan.calls.push(Call { method: "GET", path: format!("/v1/contacts/{id}"), body: None });
                    plan.calls.push(Call {
                        method: "PUT",
                        path: "/v1/emailAddresses/{EMAIL1 of the contact}".into(),
                        body: Some(json!({"opted_in": false, "reason": reason})),
                    });
                }
            }
        }
    }
}

fn parked(mut plan: Plan, problem: String) -> Plan {
    plan.action = "parked";
    plan.calls.clear();
    plan.problem = Some(problem);
    plan
}

fn tag_name(r: &TagRef) -> String {
    match r {
        TagRef::Id(id) => id.to_string(),
        TagRef::Name(n) => n.clone(),
    }
}

/// Plans for the selected users. Makes no Keap write call and changes no table.
pub async fn preview(config: &Config, which: &Selection) -> Result<Vec<Plan>, PreviewError> {
    let planner = Planner::new(config).await?;
    let plans = planner.select_and_plan(which).await;
    planner.finish().await;
    plans
}

impl Planner {
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
