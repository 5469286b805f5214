//! Keap talks back, first part: the `[inbound]` columns of the users table, and the columns
//! of the properties Keap owns (`owner = "keap"` in `[contact]`), written from the mirror
//! (design invariants 17, 18, 21).
//!
//! Every store of a contact into the mirror marks its row `inbound_due`
//! (`sql/0019_inbound.sql`), whoever stored it (a sweep, a listing, a lookup's catch-up). After
//! each sweep the daemon runs [`apply`]: the due rows, 500 at a time, each batch in one
//! statement that, for the contacts linked to a user (`keap_sync.contact_map`), records what
//! came in (`keap_sync.inbound_event`), updates only the inbound columns of the rows whose
//! values differ, and clears the mark of the rows it read (unless stored again meanwhile). A
//! batch is applied whole or not at all; a failed one stays due for the next sweep, so nothing
//! is lost. A contact linked to no user changes nothing, and a value Keap did not report (no
//! EMAIL1, say) is no value: nothing is ever blanked (invariant 21), no row deleted. For a
//! Keap-owned property an empty value in Keap (absent, `null`, `""` or blank) is no value
//! either: it writes nothing, so clearing a phone in Keap leaves the column as it was.
//!
//! A Keap-owned or shared custom field is placed on the contact by its id in Keap's contact
//! model (`GET /v1/contacts/model`, read once per process through the daemon's
//! [`Catalog`], as deliveries read it): a field named by name that the model lacks is an error
//! naming its config key ([`InboundError::UnknownCustomField`]), and the rows stay due, so
//! nothing is skipped silently. The daemon refuses to start with such a field when it can ask
//! Keap at start-up; this catches the start that could not.
//!
//! `[inbound] tags`: the sorted names of the contact's tags of one category, `{}` when it has
//! none (Keap's word that none is applied, so it is written); a copy with no tag ids at all
//! writes nothing. Names come from Keap's tag list (`super::tag_book`, read when an id is
//! new); a contact carrying an id whose name is still unknown is not written and its row stays
//! due (the batches move on by contact id, so held rows never stall a pass).
//!
//! No echo (invariant 18) needs no mark in the transaction: the capture triggers compare only
//! the synced columns, and an inbound column is never one of them (the config refuses a column
//! mapped both ways, and `schema` one that an outbound SQL expression reads; a Keap-owned
//! property is not in `UsersConfig::fields`, so its column is not synced). So an inbound
//! write fires the update trigger, which finds no synced column changed and logs nothing.

use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Row};

use super::tag_book::{self, Names, TagBook};
use super::{Keap, MirrorError};
use crate::catalog::Catalog;
use crate::config::{CustomFieldRef, Field, InboundData, TagCategory};
use crate::db::DbError;
use crate::keap::KeapError;
use crate::mapping::{email1_opted_out, keap_value, moved_in_keap, path, CustomModel, Path};
use crate::schema::{InboundColumn, UserTable};

/// Mirror rows applied per statement.
const BATCH: i64 = 500;

/// At most this many batches a pass (500,000 contacts); the rest waits for the next sweep.
const MAX_BATCHES: usize = 1_000;

/// The due rows of the mirror, and the user each contact is linked to, if any.
const DUE: &str = "select m.contact_id, m.read_at::text, c.user_key, m.contact, c.sent
                     from keap_sync.mirror m
                     left join keap_sync.contact_map c on c.contact_id = m.contact_id
                    where m.inbound_due and m.contact_id > $2
                    order by m.contact_id
                    limit $1";

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Mirror rows read and no longer due.
    pub(crate) contacts: u64,
    /// Users rows updated.
    pub(crate) rows: u64,
    /// Values recorded in `keap_sync.inbound_event`.
    pub(crate) events: u64,
    /// Users whose shared properties Keap changed, queued for delivery to settle.
    pub(crate) settle: u64,
    /// Keap's values kept as history (`super::history`).
    pub(crate) observed: u64,
}

/// Why the inbound columns could not be written (they stay due: the next sweep tries again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboundError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// Keap's tag list could not be read for want of a credential.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// Keap's contact model could not be read, to place a custom field on the contact.
    #[error(
        "cannot read Keap's contact model (GET /v1/contacts/model) to place the mapped custom fields: {0}"
    )]
    Model(KeapError),
    /// A Keap-owned or shared custom field Keap's contact model does not have.
    #[error(
        "{key}: Keap's contact model has no custom field {field}, so Keap's values of it cannot \
         be written into column {column}; create the field in Keap (then restart the daemon: the \
         model is read once) or fix the mapping (names match a field's label or field_name exactly)"
    )]
    UnknownCustomField { key: String, field: String, column: String },
    /// The daemon's role may not update (or read) an inbound column.
    #[error(
        "cannot write Keap's data into {table} ({columns}): {reason}; as the table's owner, run \
         `{grant}` (the next sweep then applies what waits; deliveries go on meanwhile)"
    )]
    Refused { table: String, columns: String, reason: String, grant: String },
}

/// Where the inbound pass finds what Keap names by id: tag names for `[inbound] tags` (the tag
/// book) and custom fields (Keap's contact model, in the catalog), read through the client.
#[derive(Clone, Copy)]
pub(crate) struct Tagging<'a> {
    pub(crate) book: &'a TagBook,
    pub(crate) catalog: &'a Catalog,
    pub(crate) keap: &'a Keap<'a>,
}

/// Applies every due mirror row to the inbound columns of `table` that the mirror feeds (not
/// the stamp of a contact found gone, `super::gone`); nothing when there are none. `tags`
/// resolves tag names for an `[inbound] tags` column (without it, such a column waits) and
/// custom fields (without it, a Keap-owned or shared custom field is an error).
pub(crate) async fn apply(
    db: &Client,
    table: &UserTable,
    tags: Option<Tagging<'_>>,
) -> Result<Applied, InboundError> {
    let mut applied = Applied::default();
    let fed: Vec<InboundColumn> = table.inbound.iter().filter(|c| c.data.from_mirror()).cloned().collect();
    if fed.is_empty() {
        return Ok(applied);
    }
    let places = places(&fed, model(db, &fed, tags).await?)?;
    let is_shared = |c: &InboundColumn| matches!(c.data, InboundData::Shared { .. });
    let shared: Vec<Path> =
        fed.iter().zip(&places).filter(|(c, _)| is_shared(c)).filter_map(|(_, p)| p.clone()).collect();
    let (written, places): (Vec<InboundColumn>, Vec<Option<Path>>) =
        fed.into_iter().zip(places).filter(|(c, _)| !is_shared(c)).unzip();
    let table = &UserTable { inbound: written, ..table.clone() };
    let sql = if table.inbound.is_empty() { CLEAR.to_owned() } else { statement(table) };
    let category = table.inbound.iter().find_map(|c| match &c.data {
        InboundData::Tags(category) => Some(category),
        _ => None,
    });
    let mut after = 0_i64;
    for _ in 0..MAX_BATCHES {
        let due = db.query(DUE, &[&BATCH, &after]).await.map_err(DbError::from)?;
        after = due.last().map_or(after, |r| r.get(0));
        applied.settle += settle_shared(db, &shared, &due).await?;
        applied.observed += super::history::observe(db, &table.observed, &due).await?;
        let names = tag_names(db, tags, category, &due).await?;
        let batch: Vec<Value> = due.iter().map(|r| values(&table.inbound, &places, r, &names)).collect();
        let done = match db.query_one(&sql, &[&Value::Array(batch)]).await {
            Ok(done) => done,
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(refused(db, table, &e).await);
            }
            Err(e) => return Err(DbError::from(e).into()),
        };
        let count = |i: usize| u64::try_from(done.get::<_, i64>(i)).unwrap_or(0);
        applied.contacts += count(0);
        applied.rows += count(1);
        applied.events += count(2);
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    Ok(applied)
}

/// Keap's contact model, when a Keap-owned or shared custom field is among `columns` (read once
/// per process, `Catalog::model`); `None` when none is.
async fn model<'a>(
    db: &Client,
    columns: &[InboundColumn],
    tags: Option<Tagging<'a>>,
) -> Result<Option<&'a CustomModel>, InboundError> {
    let custom = columns.iter().any(|c| {
        matches!(
            &c.data,
            InboundData::Owned { field: Field::Custom(_), .. }
                | InboundData::Shared { field: Field::Custom(_), .. }
        )
    });
    let Some(tags) = tags.filter(|_| custom) else { return Ok(None) };
    if let Some(model) = tags.catalog.model_if_known() {
        return Ok(Some(model));
    }
    let auth = tags.keap.tokens.auth(db).await.map_err(MirrorError::Token)?;
    let deadline = tokio::time::Instant::now() + tags.keap.timeout * 2;
    let model = tags.catalog.model(tags.keap.client, &auth, deadline).await.map_err(InboundError::Model)?;
    Ok(Some(model))
}

/// Where each of `columns`' properties is on a contact (`None` for the columns of `[inbound]`):
/// a custom field through Keap's `model`, which must have it.
fn places(columns: &[InboundColumn], model: Option<&CustomModel>) -> Result<Vec<Option<Path>>, InboundError> {
    columns
        .iter()
        .map(|c| match &c.data {
            InboundData::Owned { key, field } | InboundData::Shared { key, field, .. } => {
                let placed = match field {
                    Field::Custom(_) if model.is_none() => None,
                    field => path(field, model),
                };
                let field = match field {
                    Field::Custom(CustomFieldRef::Name(n)) => format!("named {n:?}"),
                    Field::Custom(CustomFieldRef::Id(id)) => format!("with id {id}"),
                    other => format!("{other:?}"),
                };
                let unknown =
                    || InboundError::UnknownCustomField { key: key.clone(), field, column: c.name.clone() };
                placed.map(Some).ok_or_else(unknown)
            }
            _ => Ok(None),
        })
        .collect()
}

/// The names of the category's tags among the due contacts' tag ids (none without an
/// `[inbound] tags` column).
async fn tag_names(
    db: &Client,
    tags: Option<Tagging<'_>>,
    category: Option<&TagCategory>,
    due: &[Row],
) -> Result<Names, MirrorError> {
    let (Some(tags), Some(category)) = (tags, category) else { return Ok(Names::default()) };
    let contacts: Vec<Value> = due.iter().map(|r| r.get(3)).collect();
    let ids = tag_book::ids_of(contacts.iter());
    tags.book.names(db, tags.keap, category, &ids).await
}

/// With shared properties only: the due rows read are no longer due (unless stored again).
const CLEAR: &str = "with v as (
                         select * from jsonb_to_recordset($1::jsonb) as v(contact_id bigint, read_at timestamptz, hold boolean)
                     ), cleared as (
                         update keap_sync.mirror m set inbound_due = false
                           from v where m.contact_id = v.contact_id and m.read_at = v.read_at and not v.hold
                         returning 1
                     )
                     select (select count(*) from cleared), 0::bigint, 0::bigint";

/// Queues for delivery the linked users of `due` whose mirror copy shows a shared property
/// changed in Keap since both sides last agreed: delivery reads the contact (the mirror's
/// word decides nothing alone, invariant 20), writes Keap's value into the column or settles
/// a conflict by `prefer` (`deliver::take`). Answers how many were queued.
async fn settle_shared(db: &Client, shared: &[Path], due: &[Row]) -> Result<u64, DbError> {
    if shared.is_empty() {
        return Ok(0);
    }
    let keys: Vec<String> = due
        .iter()
        .filter_map(|r| {
            let (key, sent) = (r.get::<_, Option<String>>(2)?, r.get::<_, Option<Value>>(4)?);
            moved_in_keap(shared, &sent, &r.get::<_, Value>(3)).then_some(key)
        })
        .collect();
    if keys.is_empty() {
        return Ok(0);
    }
    db.execute("insert into keap_sync.change (user_key) select unnest($1::text[])", &[&keys]).await?;
    crate::db::wake_daemons(db).await?;
    Ok(keys.len() as u64)
}

/// One due row as the statement reads it: `c0`, `c1`… the values of the inbound columns in
/// order (a Keap-owned property's at its place in `places`), `null` where Keap said nothing;
/// `hold` when it must stay due (a tag whose name is not known yet).
fn values(columns: &[InboundColumn], places: &[Option<Path>], row: &Row, names: &Names) -> Value {
    let contact: Value = row.get(3);
    let mut v = json!({"contact_id": row.get::<_, i64>(0), "read_at": row.get::<_, String>(1),
                       "user_key": row.get::<_, Option<String>>(2), "hold": false});
    for (i, c) in columns.iter().enumerate() {
        v[format!("c{i}")] = match &c.data {
            InboundData::Tags(_) => {
                let (value, hold) = names.value(&contact);
                v["hold"] = json!(hold);
                value
            }
            InboundData::EmailOptOut => json!(email1_opted_out(&contact)),
            InboundData::ContactGone => Value::Null,
            InboundData::Owned { .. } => json!(places[i].as_ref().and_then(|p| keap_value(&contact, p))),
            InboundData::Shared { .. } => Value::Null,
        };
    }
    v
}

/// The statement that applies one batch (`$1`, rows as [`values`] makes them) and answers
/// how many mirror rows it cleared, users rows it updated and values it recorded.
fn statement(table: &UserTable) -> String {
    let cols = &table.inbound;
    let (t, key, eq, key_type) = (&table.qualified, &table.key, &table.key_eq, &table.key_type);
    let typed: Vec<String> =
        cols.iter().enumerate().map(|(i, c)| format!("c{i} {}", c.data.sql_type())).collect();
    let came: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c.name.replace('\'', "''");
            format!(
                "('{name}', to_jsonb(v.c{i}), t.{q}::{ty} is distinct from v.c{i})",
                q = c.quoted,
                ty = c.data.sql_type()
            )
        })
        .collect();
    let set: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{q} = coalesce(v.c{i}, t.{q}::{ty})", q = c.quoted, ty = c.data.sql_type()))
        .collect();
    let differ: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "(v.c{i} is not null and t.{q}::{ty} is distinct from v.c{i})",
                q = c.quoted,
                ty = c.data.sql_type()
            )
        })
        .collect();
    format!(
        "with v as (
             select * from jsonb_to_recordset($1::jsonb)
                 as v(contact_id bigint, read_at timestamptz, user_key text, hold boolean, {typed})
         ), cleared as (
             update keap_sync.mirror m set inbound_due = false
               from v where m.contact_id = v.contact_id and m.read_at = v.read_at and not v.hold
             returning 1
         ), events as (
             insert into keap_sync.inbound_event (contact_id, user_key, column_name, value, changed)
             select v.contact_id, v.user_key, x.name, x.value, x.changed
               from v join {t} t on t.{key} {eq} v.user_key::{key_type}
               cross join lateral (values {came}) as x(name, value, changed)
              where x.value is not null
                and (x.changed or x.value is distinct from
                     (select e.value from keap_sync.inbound_event e
                       where e.contact_id = v.contact_id and e.column_name = x.name
                       order by e.id desc limit 1))
             returning 1
         ), changed as (
             update {t} t set {set}
               from v where t.{key} {eq} v.user_key::{key_type} and ({differ})
             returning 1
         )
         select (select count(*) from cleared), (select count(*) from changed), (select count(*) from events)",
        typed = typed.join(", "),
        came = came.join(", "),
        set = set.join(", "),
        differ = differ.join(" or "),
    )
}

/// The refusal, with the grant that fixes it (for the role the daemon runs as).
async fn refused(db: &Client, table: &UserTable, e: &tokio_postgres::Error) -> InboundError {
    let reason = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned());
    let role = match db.query_one("select quote_ident(current_user)", &[]).await {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => "<the daemon's role>".to_owned(),
    };
    let quoted: Vec<&str> = table.inbound.iter().map(|c| c.quoted.as_str()).collect();
    let list = quoted.join(", ");
    let columns =
        table.inbound.iter().map(|c| format!("column {} ({})", c.name, c.data.key())).collect::<Vec<_>>();
    InboundError::Refused {
        table: table.qualified.clone(),
        columns: columns.join(", "),
        reason,
        grant: format!("grant select ({list}), update ({list}) on {} to {role}", table.qualified),
    }
}
