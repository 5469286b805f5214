//! What came in from Keap, kept whether or not a column receives it (issue 29: "everything that
//! came in is also kept as history"): for each linked contact the inbound pass reads, Keap's
//! value of every mapped property (the application's too: a hand edit in Keap that the next
//! delivery overwrites is still on record), EMAIL1's email status and the contact's tag ids.
//!
//! Rows of `keap_sync.inbound_event` with `property` set and no `column_name`
//! (`sql/0025_inbound_history.sql`), a value recorded only when it differs from the last one
//! recorded for that contact and property, so overlapping sweeps and repeated reads add
//! nothing. A property Keap holds no value for is recorded as JSON `null` only once something
//! was recorded for it (a clearing), never on first sight. Custom fields named by name are left
//! out (their ids need Keap's model); those named by id are kept. Kept only while two-way sync is on (`[inbound]` or a Keap-owned or
//! shared property): the pass does not run otherwise.

use serde_json::{json, Value};
use tokio_postgres::{Client, Row};

use crate::config::Field;
use crate::db::DbError;
use crate::mapping::{email1_status, keap_value, path};

/// Records what `due` (rows of the inbound pass: contact id, read time, user key, contact)
/// shows of `observed` for its linked contacts; answers how many values were recorded.
pub(super) async fn observe(db: &Client, observed: &[Field], due: &[Row]) -> Result<u64, DbError> {
    let paths: Vec<_> = observed.iter().filter_map(|f| path(f, None)).collect();
    let mut values = Vec::new();
    for row in due {
        let Some(user_key) = row.get::<_, Option<String>>(2) else { continue };
        let (contact_id, contact): (i64, Value) = (row.get(0), row.get(3));
        let mut seen = |property: &str, value: Value| {
            values.push(
                json!({"contact_id": contact_id, "user_key": user_key, "property": property, "value": value}),
            );
        };
        for p in &paths {
            seen(&p.key(), json!(keap_value(&contact, p)));
        }
        seen("email1_status", json!(email1_status(&contact)));
        seen("tag_ids", sorted_ids(&contact));
    }
    if values.is_empty() {
        return Ok(0);
    }
    let n = db.execute(RECORD, &[&Value::Array(values)]).await?;
    Ok(n)
}

/// The contact's tag ids, sorted (`null` when the listing did not say).
fn sorted_ids(contact: &Value) -> Value {
    let Some(ids) = contact.get("tag_ids").and_then(Value::as_array) else { return Value::Null };
    let mut ids: Vec<i64> =
        ids.iter().filter_map(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))).collect();
    ids.sort_unstable();
    json!(ids)
}

/// Records each value that differs from the last recorded for its contact and property (a
/// `null` only after something else).
/// (`jsonb_to_recordset` reads a JSON `null` as SQL `NULL`: it is put back.)
const RECORD: &str = "insert into keap_sync.inbound_event (contact_id, user_key, property, value, changed)
                      select x.contact_id, x.user_key, x.property, coalesce(x.value, 'null'::jsonb), false
                        from jsonb_to_recordset($1::jsonb)
                             as x(contact_id bigint, user_key text, property text, value jsonb)
                       where coalesce(x.value, 'null'::jsonb) is distinct from coalesce(
                             (select e.value from keap_sync.inbound_event e
                               where e.contact_id = x.contact_id and e.property = x.property
                               order by e.id desc limit 1), 'null'::jsonb)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_ids_are_sorted_whether_numbers_or_strings() {
        assert_eq!(sorted_ids(&json!({"tag_ids": ["12", 3, "7"]})), json!([3, 7, 12]));
        assert_eq!(sorted_ids(&json!({})), Value::Null);
    }
}
