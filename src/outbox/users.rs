//! Reading the users table: its keys in order, and the current rows of claimed users, a bad row
//! isolated (the user parked with the reason) instead of failing its batch.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::db::DbError;
use crate::schema::UserTable;

/// The mapped values of one user, as text, in the order of `UserTable::selects` (the mapped
/// fields, then the tag rules); NULL reads as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserRow {
    pub(crate) values: Vec<Option<String>>,
}

/// Why one user's row could not be read: the park reason, naming the user key and the column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreadable(pub(crate) String);

/// One user as [`read_users`] found it: its synced columns, or why they could not be read.
pub(crate) type ReadUser = Result<UserRow, Unreadable>;

/// Keys of the users table in key order, at most `limit` (`None`: all), after `after`.
pub(crate) async fn user_keys(
    client: &Client,
    table: &UserTable,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let sql = format!(
        "select t.{key}::text from {table} t
          where $1::text is null or t.{key} > $1::text::{key_type}
          order by t.{key} limit $2",
        key = table.key,
        table = table.qualified,
        key_type = table.key_type,
    );
    let rows = client.query(&sql, &[&after, &limit]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Reads the current rows of `keys` from the users table. A key with no row was deleted.
///
/// Only the key and the synced columns are read (so the daemon's role needs `SELECT` on those
/// columns alone: `sql/role.example.sql`), each as text. The key as `key::text` is the text the
/// trigger writes (`to_jsonb(row) ->> key`) for integer, bigint, uuid and text keys, so it
/// matches the outbox key (`tests/it/capture.rs` checks each type); any column type (citext,
/// varchar, …) reads as text.
///
/// One bad row stays bad alone: if the batch statement fails on a value (a `::text` conversion
/// that raises, a key the key type no longer accepts after a type change) or a value does not
/// decode (non-UTF-8 bytes in a `SQL_ASCII` database), every key of the batch is read again on
/// its own, column by column, and the one that fails gets an [`Unreadable`] reason for
/// `outbox::park` instead of failing the batch — every batch, forever. A failure that is not
/// about a value (a dropped column, a lost connection, a missing privilege) is still an error:
/// it concerns every user alike.
pub(crate) async fn read_users(
    client: &Client,
    table: &UserTable,
    keys: &[String],
) -> Result<HashMap<String, ReadUser>, DbError> {
    match read_batch(client, table, keys).await {
        Ok(Some(rows)) => return Ok(rows.into_iter().map(|(k, row)| (k, Ok(row))).collect()),
        Ok(None) => {
            tracing::warn!("a user row of this batch does not decode; reading the batch one user at a time")
        }
        Err(e) if is_about_a_value(&e) => {
            tracing::warn!(error = %e, "a user row of this batch cannot be read; reading the batch one user at a time")
        }
        Err(e) => return Err(e),
    }
    let mut found = HashMap::with_capacity(keys.len());
    for key in keys {
        if let Some(row) = read_one(client, table, key).await? {
            found.insert(key.clone(), row);
        }
    }
    Ok(found)
}

/// `t.key::text, <every mapped value>`: the one select list of a user read.
pub(crate) fn user_select_list(table: &UserTable) -> String {
    let mut list = format!("t.{}::text", table.key);
    for s in &table.selects {
        list.push_str(", ");
        list.push_str(&s.sql);
    }
    list
}

/// The whole batch in one statement; `Ok(None)` when a value does not decode.
async fn read_batch(
    client: &Client,
    table: &UserTable,
    keys: &[String],
) -> Result<Option<HashMap<String, UserRow>>, DbError> {
    let sql = format!(
        "select {list}
           from {table} t
          where t.{key} = any($1::text[]::{key_type}[])",
        list = user_select_list(table),
        table = table.qualified,
        key = table.key,
        key_type = table.key_type,
    );
    let rows = client.query(&sql, &[&keys]).await?;
    let mut found = HashMap::with_capacity(rows.len());
    for r in &rows {
        let decoded = (|| {
            let values = (1..=table.selects.len()).map(|i| r.try_get(i)).collect::<Result<_, _>>()?;
            Ok::<_, tokio_postgres::Error>((r.try_get::<_, Option<String>>(0)?, UserRow { values }))
        })();
        match decoded {
            Ok((Some(key), row)) => {
                found.insert(key, row);
            }
            Ok((None, _)) => {}
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(found))
}

/// One user, one column at a time, so a failure names its column. `Ok(None)`: no such row.
async fn read_one(client: &Client, table: &UserTable, key: &str) -> Result<Option<ReadUser>, DbError> {
    let row_of = |select: &str| {
        format!(
            "select {select} from {table} t where t.{key} = $1::text::{key_type}",
            table = table.qualified,
            key = table.key,
            key_type = table.key_type,
        )
    };
    let exists = client.query_opt(&row_of("1"), &[&key]).await;
    match exists {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(None),
        Err(e) => {
            let e = DbError::from(e);
            if !is_about_a_value(&e) {
                return Err(e);
            }
            return Ok(Some(Err(Unreadable(format!(
                "user {key}: the key does not read as {key_type} (column {column}): {why}; fix the row or \
                 the column's type, then run `keap-sync failures retry {key}`",
                key_type = table.key_type,
                column = table.key,
                why = reason(&e),
            )))));
        }
    }
    let mut values: Vec<Option<String>> = Vec::with_capacity(table.selects.len());
    for selected in &table.selects {
        let result = client.query_opt(&row_of(&selected.sql), &[&key]).await.map_err(DbError::from);
        let value = match result {
            // Deleted meanwhile.
            Ok(None) => return Ok(None),
            Ok(Some(r)) => r.try_get::<_, Option<String>>(0).map_err(DbError::from),
            Err(e) if is_about_a_value(&e) => Err(e),
            Err(e) => return Err(e),
        };
        match value {
            Ok(v) => values.push(v),
            Err(e) => {
                return Ok(Some(Err(Unreadable(format!(
                    "user {key}: {what} cannot be read as text: {why}; fix the value (or the \
                     column's type, or the expression), and the user syncs on its next change or on \
                     `keap-sync failures retry {key}`",
                    what = selected.what,
                    why = reason(&e),
                )))))
            }
        }
    }
    Ok(Some(Ok(UserRow { values })))
}

/// True when a failure is about a value of one row rather than the setup or the connection:
/// any server error outside the classes of connection (08), resources (53), operator
/// intervention (57), system (58) and schema/privilege problems (42: a dropped column, a
/// revoked grant), and any value that does not decode on our side.
fn is_about_a_value(e: &DbError) -> bool {
    if e.is_connection_lost() {
        return false;
    }
    let DbError::Query(e) = e else { return false };
    match e.code() {
        Some(code) => !["08", "42", "53", "57", "58"].iter().any(|class| code.code().starts_with(class)),
        // No server code and not a lost connection: a value that did not decode (`try_get`).
        None => true,
    }
}

/// The server's message, without driver framing.
fn reason(e: &DbError) -> String {
    match e {
        DbError::Query(q) => match q.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => std::error::Error::source(q).map_or_else(|| q.to_string(), |s| s.to_string()),
        },
        other => other.to_string(),
    }
}
