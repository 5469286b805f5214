//! The walk over the users: batch by batch, each user classified against the mirror, each one
//! not in sync handed on as it is found and counted; with `apply`, each batch's repairable
//! users queued. Memory holds one batch (1,000 users) whatever the number of users or drifts.

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::Client;

use super::classify::{self, Class};
use super::{Difference, Drift, ReconcileOptions, Report, ReportSink};
use crate::db::{self, DbError};
use crate::mapping::{Held, Mapper};
use crate::mirror;
use crate::outbox;
use crate::schema::UserTable;

/// Users read per statement.
const BATCH: usize = 1_000;

/// Compares `keys` (every user, in key order, when empty) with the mirror, adding to `report`'s
/// counts and handing each user not in sync to `sink` as its batch is compared; with
/// `options.apply`, queues each batch's repairable users before handing them on.
pub(super) async fn walk<S: ReportSink + ?Sized>(
    client: &Client,
    table: &UserTable,
    mapper: &Mapper,
    keys: &[String],
    options: ReconcileOptions,
    report: &mut Report,
    sink: &mut S,
) -> Result<(), DbError> {
    let mut after: Option<String> = None;
    loop {
        let batch = match keys.is_empty() {
            true => outbox::user_keys(client, table, after.as_deref(), BATCH as i64).await?,
            false if after.is_none() => keys.to_vec(),
            false => Vec::new(),
        };
        let Some(last) = batch.last().cloned() else { break };
        let found = compare(client, table, mapper, &batch, options.show_values).await?;
        report.users += batch.len() as u64;
        report.in_sync += batch.len() as u64 - found.len() as u64;
        if options.apply {
            report.queued += repair(client, &found, &mapper.shared_path_keys()).await?;
        }
        for drift in found {
            *report.counts.entry(drift.class).or_default() += 1;
            sink.drift(drift);
        }
        after = Some(last);
    }
    Ok(())
}

/// The users of `keys` that are not in sync, in key order.
async fn compare(
    client: &Client,
    table: &UserTable,
    mapper: &Mapper,
    keys: &[String],
    show_values: bool,
) -> Result<Vec<Drift>, DbError> {
    let mut rows = outbox::read_users(client, table, keys).await?;
    let maps = outbox::mappings(client, keys).await?;
    let parked = parked(client, keys).await?;
    let contact_ids: Vec<i64> = maps.values().map(|m| m.contact_id).collect();
    let contacts = mirror::contacts(client, &contact_ids).await?;
    let mut drift = Vec::new();
    let mut payloads = HashMap::new();
    for key in keys {
        let Some(row) = rows.remove(key) else { continue };
        payloads.insert(key.clone(), row.ok().and_then(|row| mapper.payload(key, &row, None).ok()));
    }
    let emails: Vec<String> =
        payloads.values().flatten().map(|p| p.email.trim().to_ascii_lowercase()).collect();
    let by_email = mirror::by_email1(client, &emails).await?;
    for key in keys {
        let Some(payload) = payloads.get(key) else { continue };
        let mapping = maps.get(key);
        let mapped = mapping.map(|m| {
            let held =
                payload.as_ref().map(|p| Held::of_mapping(m.sent.as_ref(), m.fingerprint.as_deref(), p));
            (m.contact_id, held.and_then(|h| h.tags().cloned()).unwrap_or_default())
        });
        let contact =
            mapping.and_then(|m| contacts.get(&m.contact_id)).map(|(json, tags)| (json, tags.as_slice()));
        let email = payload.as_ref().map(|p| p.email.trim().to_ascii_lowercase()).unwrap_or_default();
        let facts = classify::Facts {
            payload: payload.as_ref(),
            mapped,
            contact,
            by_email: by_email.get(&email).map_or(&[][..], Vec::as_slice),
            parked: parked.contains(key),
        };
        let (class, differs) = classify::classify(&facts);
        if class == Class::InSync {
            continue;
        }
        let values = match (show_values, payload, contact) {
            (true, Some(p), Some((json, _))) => p
                .differences(json)
                .into_iter()
                .map(|(path, table, keap)| Difference { path, table, keap })
                .collect(),
            _ => Vec::new(),
        };
        let contact_id = mapping.map(|m| m.contact_id);
        drift.push(Drift { user: key.clone(), class, contact_id, differs, values });
    }
    Ok(drift)
}

/// Keeps a whole-table run's counts by class (no key, no value) for `status` and `/metrics`.
pub(super) async fn record_counts(client: &Client, report: &Report) -> Result<(), DbError> {
    let counts: serde_json::Map<String, serde_json::Value> = report
        .counts
        .iter()
        .filter(|(class, n)| **class != Class::InSync && **n > 0)
        .map(|(class, n)| (class.as_str().to_owned(), (*n).into()))
        .collect();
    client
        .execute(
            "update keap_sync.mirror_state set reconciled_at = now(), reconciled_users = $1, drift = $2",
            &[&i64::try_from(report.users).unwrap_or(i64::MAX), &serde_json::Value::Object(counts)],
        )
        .await?;
    Ok(())
}

/// The users of `keys` whose change is parked.
async fn parked(client: &Client, keys: &[String]) -> Result<BTreeSet<String>, DbError> {
    let rows = client
        .query(
            "select user_key from keap_sync.outbox where user_key = any($1) and parked_at is not null",
            &[&keys],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Queues the repairable users for delivery, in one statement. The mirror only suggests
/// (invariant 20): nothing is unlinked here. A differing or gone user's record of what Keap
/// holds is cleared, so its next delivery sends every owned property to its contact (reading
/// it first for arrays); Keap then confirms a gone contact with a 404, and only then does
/// delivery link the user again by email, or create its contact. Users with no contact are
/// simply queued. Each at the backfill's priority, behind live changes. Returns how many.
/// The base of each shared property (`shared`, its `sent` keys) is kept: it says which side
/// changed, and without it the row's value would be sent over a correction made in Keap.
async fn repair(client: &Client, drift: &[Drift], shared: &[String]) -> Result<u64, DbError> {
    let rewrite: Vec<String> = drift
        .iter()
        .filter(|d| matches!(d.class, Class::Differs | Class::ContactGone))
        .map(|d| d.user.clone())
        .collect();
    let queue: Vec<String> = drift.iter().filter(|d| d.class.repairable()).map(|d| d.user.clone()).collect();
    if queue.is_empty() {
        return Ok(0);
    }
    let row = client
        .query_one(
            "with cleared as (
                 update keap_sync.contact_map
                    set fingerprint = '',
                        sent = case when cardinality($4::text[]) = 0 or sent->>'v' is distinct from '2' then null
                                    else jsonb_build_object('v', 2, 'f',
                                         (select coalesce(jsonb_object_agg(e.key, e.value), '{}')
                                            from jsonb_each(sent->'f') e where e.key = any($4)))
                               end
                  where user_key = any($1)
                 returning 1
             ), queued as (
                 insert into keap_sync.outbox (user_key, priority)
                 select k, 2 from unnest($2::text[]) k
                 on conflict (user_key) do update set version = keap_sync.outbox.version + 1
                 returning 1
             )
             select (select count(*) from queued), pg_notify($3, '')::text is null",
            &[&rewrite, &queue, &db::NOTIFY_CHANNEL, &shared],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}
