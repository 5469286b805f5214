//! Keap's side of a shared property (`owner = "shared"`, `mapping::shared`): whether the
//! mirror shows it changed, and, once the plan has settled it against a read of the contact,
//! Keap's values written into their columns and the conflicts recorded.
//!
//! The write is one statement that first sets `keap_sync.origin = 'keap'` for its own
//! transaction (`set_config(…, true)`): the capture trigger of a table with shared properties
//! skips such a statement, so Keap's value is never sent back (invariant 18). One statement,
//! not a transaction, because delivery tasks share one connection. A column is written only if
//! it still holds what the delivery read: an application write that came in between wins,
//! and is delivered next (it was captured).

use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

use super::plan::Mapped;
use super::Deliverer;
use crate::db::{quote_ident, DbError};
use crate::mapping::{value_text, ContactPayload, Settled};
use crate::outbox::{self, Claim};

impl Deliverer {
    /// Whether the mirror's copy of the mapped contact shows a shared property changed in Keap
    /// since both sides last agreed; false without shared properties, a mapping or a copy.
    pub(super) async fn keap_moved(
        &self,
        payload: &ContactPayload,
        mapped: Option<&Mapped>,
    ) -> Result<bool, DbError> {
        let Some(mapped) = mapped.filter(|_| payload.has_shared()) else { return Ok(false) };
        let row = self
            .db
            .cached_query_opt("select contact from keap_sync.mirror where contact_id = $1", &[&mapped.id])
            .await?;
        Ok(row.is_some_and(|r| payload.keap_moved(&mapped.held, &r.get::<_, Value>(0))))
    }

    /// Writes Keap's values `settled` took into their columns, and records its conflicts (a
    /// conflict the same as the last one recorded for that user and column is not recorded
    /// again: a delivery repeated after a lost answer settles it again).
    pub(super) async fn take(
        &self,
        claim: &Claim,
        contact_id: i64,
        settled: &Settled,
    ) -> Result<(), DbError> {
        self.metrics.conflicts(settled.conflicts.len() as u64);
        for c in &settled.conflicts {
            tracing::info!(
                user = %claim.user_key, contact = contact_id, column = %c.column, winner = c.winner.as_str(),
                "a shared property changed on both sides; the preferred side's value is kept (keap_sync.conflict)"
            );
        }
        let conflicts: Vec<Value> = settled
            .conflicts
            .iter()
            .map(|c| {
                json!({"column_name": c.column, "property": c.path.key(), "winner": c.winner.as_str(),
                       "app_value": c.app, "keap_value": c.keap})
            })
            .collect();
        let conflicts = Value::Array(conflicts);
        let values: Vec<(Option<String>, Option<String>)> =
            settled.taken.iter().map(|t| (value_text(&t.value), t.expected.clone())).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&claim.user_key, &contact_id, &conflicts];
        for (value, expected) in &values {
            params.push(value);
            params.push(expected);
        }
        let sql = self.take_statement(settled);
        outbox::with_retries("take_from_keap", &claim.user_key, || async {
            self.db.execute(&sql, &params).await.map_err(DbError::from)
        })
        .await?;
        Ok(())
    }

    /// The statement of [`Deliverer::take`]: `$1` the user's key, `$2` the contact, `$3` the
    /// conflicts, then each taken value and the text the column is expected to hold.
    fn take_statement(&self, settled: &Settled) -> String {
        let table = &self.table;
        let sets: Vec<String> = settled
            .taken
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (q, v, e) = (quote_ident(&t.column), 4 + 2 * i, 5 + 2 * i);
                format!("{q} = case when t.{q}::text is not distinct from ${e}::text then ${v}::text else t.{q}::text end")
            })
            .collect();
        let written = match sets.is_empty() {
            true => String::new(),
            false => format!(
                "written as (
                     update {t} t set {sets} from origin
                      where t.{key} {eq} $1::text::{key_type} and origin.o = 'keap'
                     returning 1
                 ),",
                t = table.qualified,
                sets = sets.join(", "),
                key = table.key,
                eq = table.key_eq,
                key_type = table.key_type,
            ),
        };
        format!(
            "with origin as (select pg_catalog.set_config('keap_sync.origin', 'keap', true) as o),
             {written}
             recorded as (
                 insert into keap_sync.conflict
                        (user_key, contact_id, column_name, property, winner, app_value, keap_value)
                 select $1::text, $2::bigint, x.column_name, x.property, x.winner, x.app_value, x.keap_value
                   from jsonb_to_recordset($3::jsonb)
                        as x(column_name text, property text, winner text, app_value text, keap_value text)
                  where not exists (
                        select from (select c.winner, c.app_value, c.keap_value from keap_sync.conflict c
                                      where c.user_key = $1::text and c.column_name = x.column_name
                                      order by c.id desc limit 1) l
                         where l.winner = x.winner and l.app_value is not distinct from x.app_value
                           and l.keap_value is not distinct from x.keap_value)
                 returning 1
             )
             select (select count(*) from recorded), (select o from origin)"
        )
    }
}
