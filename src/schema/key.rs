//! The users table's key column as the generated SQL must name it.
//!
//! The change log and the outbox keep a user's key as text (`key::text`), and the daemon and
//! the fold read the row back with `key = user_key::<type>`. Two things make that fragile:
//!
//! - **Names.** The generated functions pin `search_path = pg_catalog, pg_temp`, so a type of an
//!   extension (`citext`) or a domain must be named with its schema, and so must its equality
//!   operator, or the lookup either fails (every fold, forever) or falls back to `text = text`
//!   and cannot use the table's index.
//! - **Text that depends on the session.** A date, a time, an interval, money or a float prints
//!   differently under another `DateStyle`, `IntervalStyle`, `TimeZone`, `lc_monetary` or
//!   `extra_float_digits`: the key written by the application's session might not read back as
//!   the same value in the daemon's. `migrate` refuses such a key instead.

use tokio_postgres::GenericClient;

use super::SchemaError;
use crate::db::quote_ident;

/// Base types whose text form depends on session settings: `date`, `time`, `timetz`,
/// `timestamp`, `timestamptz`, `interval`, `money`, `real`, `double precision` (by oid).
const SESSION_DEPENDENT: [u32; 9] = [1082, 1083, 1266, 1114, 1184, 1186, 790, 700, 701];

/// The key column's type, resolved for generated SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyType {
    /// The type, schema-qualified unless it is in `pg_catalog`, without a modifier
    /// (`bigint`, `public.citext`, `"app".user_ref`).
    pub(super) name: String,
    /// Its equality operator: `=` or `operator(schema.=)`.
    pub(super) eq: String,
}

impl KeyType {
    /// Resolves column `column` of the table with oid `table` (`shown` for messages), or
    /// refuses a type whose text form does not round-trip.
    pub(super) async fn resolve(
        client: &impl GenericClient,
        table: u32,
        column: &str,
        shown: &str,
    ) -> Result<KeyType, SchemaError> {
        // The type, then each domain's base type in turn: [column's type, ..., base type].
        let chain = client
            .query(
                "with recursive chain(oid, depth) as (
                     select a.atttypid, 0 from pg_catalog.pg_attribute a
                      where a.attrelid = $1 and a.attname = $2 and not a.attisdropped
                     union all
                     select t.typbasetype, c.depth + 1 from chain c
                       join pg_catalog.pg_type t on t.oid = c.oid
                      where t.typtype = 'd' and c.depth < 32
                 )
                 select c.oid, n.nspname::text, t.typname::text, pg_catalog.format_type(c.oid, null),
                        (select opn.nspname::text from pg_catalog.pg_operator op
                           join pg_catalog.pg_namespace opn on opn.oid = op.oprnamespace
                          where op.oprname = '=' and op.oprleft = c.oid and op.oprright = c.oid
                          order by op.oid limit 1)
                   from chain c
                   join pg_catalog.pg_type t on t.oid = c.oid
                   join pg_catalog.pg_namespace n on n.oid = t.typnamespace
                  order by c.depth",
                &[&table, &column],
            )
            .await?;
        let (Some(first), Some(base)) = (chain.first(), chain.last()) else {
            return Err(SchemaError::MissingColumn {
                table: shown.to_owned(),
                column: column.to_owned(),
                key: "users.key".to_owned(),
            });
        };
        let (schema, type_name, printed): (String, String, String) =
            (first.get(1), first.get(2), first.get(3));
        let base_oid: u32 = base.get(0);
        let base_printed: String = base.get(3);
        if SESSION_DEPENDENT.contains(&base_oid) {
            let is = if chain.len() > 1 { format!("{printed} (a {base_printed})") } else { base_printed };
            return Err(SchemaError::BadMapping {
                key: "users.key".into(),
                message: format!(
                    "column {column} of {shown} is {is}, whose text form depends on the session's settings \
                     (DateStyle, IntervalStyle, TimeZone, lc_monetary, extra_float_digits), so a key written \
                     by the application could read back as another value; make the key a column whose \
                     text is exact (integer, bigint, numeric, uuid, text), for example a generated \
                     `text` column or a surrogate id"
                ),
            });
        }
        let name = if schema == "pg_catalog" {
            printed
        } else {
            format!("{}.{}", quote_ident(&schema), quote_ident(&type_name))
        };
        let eq = match chain.iter().find_map(|r| r.get::<_, Option<String>>(4)) {
            Some(op_schema) if op_schema != "pg_catalog" => {
                format!("operator({}.=)", quote_ident(&op_schema))
            }
            _ => "=".to_owned(),
        };
        Ok(KeyType { name, eq })
    }
}
