//! `keap-sync init`: a first configuration written from the live table, instead of by hand
//! from the 6 kB example.
//!
//! The table's columns and types are read from the catalog; each Keap property is matched to
//! the column whose name and type most likely hold it (`guess`), every match marked in the
//! file as a guess with its reason, the columns left out listed commented (`render`). The file
//! is then loaded and checked exactly as `run` would load and check it: [`Config::load`], then
//! the mapping resolved against the live table (`schema::UserTable`), which is what `migrate`
//! and the daemon do first. A file that does not pass stays written, and the error says what
//! to edit.
//!
//! Two promises: an existing file is never overwritten without `--force` (the file is created
//! with `create_new`, so not even a file that appears meanwhile is); and no password is written
//! (a URL that holds one is written without it, commented, with the advice to put the URL in
//! `DATABASE_URL`, which wins over the file: config files get copied, committed and pasted).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::config::{Config, ConfigError};
use crate::db::{self, DbError};
use crate::schema::{SchemaError, UserTable};
use crate::secret::Secret;

mod guess;
mod render;

use guess::{Column, Proposal, Section};
use render::Database;

/// Why `init` wrote nothing, or wrote a file that does not pass.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    /// The output file exists and `--force` was not given.
    #[error("{} exists; keap-sync init never overwrites a file: pass --force to replace it, or --out to write another", .0.display())]
    Exists(PathBuf),
    /// The URL or the connection.
    #[error(transparent)]
    Db(#[from] DbError),
    /// `--database-url` is not one (the message never quotes it).
    #[error(transparent)]
    Config(ConfigError),
    /// No such table.
    #[error("table {0} does not exist (or this role cannot see it): give the application's users table with --table schema.table")]
    NoTable(String),
    /// No column can be the key.
    #[error("table {0} has no one-column primary key, nor a one-column unique index on a column that is not null: keap-sync needs one as the user's key (`users.key`)")]
    NoKey(String),
    /// The file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was written but does not load or does not match the table.
    #[error("wrote {}, but it does not pass the checks `run` makes: {message}; edit it (each guess says why it was made) and run `keap-sync doctor`", path.display())]
    Invalid {
        /// The output file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// What `init` wrote.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) path: PathBuf,
    /// `key → column` of every guess, for the operator to review.
    pub(crate) guesses: Vec<String>,
    /// Columns left out.
    pub(crate) unused: usize,
    /// The URL held a password, which went elsewhere: `DATABASE_URL` must carry it.
    pub(crate) password_elsewhere: bool,
}

/// What to write and where.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    /// The database, as `DATABASE_URL` would give it.
    pub(crate) url: Secret,
    /// `schema.table` (or `table`, then `public`), as `users.table` takes it.
    pub(crate) table: &'a str,
    pub(crate) out: &'a Path,
    pub(crate) force: bool,
}

/// Reads the table, writes the proposed configuration, and checks it as `run` would.
pub(crate) async fn init(request: &Request<'_>) -> Result<Written, InitError> {
    if !request.force && request.out.exists() {
        return Err(InitError::Exists(request.out.to_owned()));
    }
    let env = |name: &str| (name == "DATABASE_URL").then(|| request.url.expose().to_owned());
    let config = Config::from_env(&env).map_err(InitError::Config)?;
    let client = db::connect(&db::parse(config.database().map_err(InitError::Config)?)?).await?;
    let (schema, name) = split_table(request.table);
    let columns = columns(&client, schema, name).await?;
    if columns.is_empty() {
        return Err(InitError::NoTable(request.table.to_owned()));
    }
    let proposal = guess::propose(&columns).ok_or_else(|| InitError::NoKey(request.table.to_owned()))?;
    let database = database(&request.url);
    write(request, &render::render(request.table, &database, &proposal))?;
    check(&client, request.out, &env).await?;
    Ok(written(request.out, &proposal, &database))
}

/// `schema.table` split as `users.table` is (`UsersConfig::schema_and_table`).
fn split_table(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// The table's columns with their types and which may be the key, in order; none when there
/// is no such table.
async fn columns(client: &Client, schema: &str, table: &str) -> Result<Vec<Column>, DbError> {
    let rows = client
        .query(
            "select a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                    b.typname::text,
                    exists (select from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary
                               and i.indnatts = 1 and i.indkey[0] = a.attnum),
                    a.attnotnull and exists (select from pg_catalog.pg_index i
                               where i.indrelid = c.oid and i.indisunique and i.indpred is null
                                 and i.indnatts = 1 and i.indkey[0] = a.attnum)
               from pg_catalog.pg_class c
               join pg_catalog.pg_namespace n on n.oid = c.relnamespace
               join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
               join pg_catalog.pg_type t on t.oid = a.atttypid
               join pg_catalog.pg_type b on b.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
              where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')
              order by a.attnum",
            &[&schema, &table],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
            base: r.get(2),
            primary: r.get(3),
            unique: r.get(4),
        })
        .collect())
}

/// How the file names the database: the URL as given, unless it holds a password.
fn database(url: &Secret) -> Database {
    match url.expose().parse::<tokio_postgres::Config>() {
        Ok(parsed) if parsed.get_password().is_some() => {
            Database::PasswordElsewhere(without_password(&parsed))
        }
        _ => Database::Url(url.expose().to_owned()),
    }
}

/// The connection settings that matter for the file, without the password, as `key=value`.
fn without_password(c: &tokio_postgres::Config) -> String {
    let hosts = crate::db::host_names(c);
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    let ssl = match c.get_ssl_mode() {
        tokio_postgres::config::SslMode::Require => Some("require"),
        tokio_postgres::config::SslMode::Disable => Some("disable"),
        _ => None,
    };
    let pairs = [
        ("host", (!hosts.is_empty()).then(|| hosts.join(","))),
        ("port", (!ports.is_empty()).then(|| ports.join(","))),
        ("dbname", c.get_dbname().map(str::to_owned)),
        ("user", c.get_user().map(str::to_owned)),
        ("sslmode", ssl.map(str::to_owned)),
    ];
    let shown: Vec<String> =
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", conninfo_value(&v)))).collect();
    shown.join(" ")
}

/// A `key=value` connection string's value, quoted when it must be.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
        return v.to_owned();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Writes `text` to the output: a new file, or with `--force` over the old one.
fn write(request: &Request<'_>, text: &str) -> Result<(), InitError> {
    let path = request.out;
    let fail = |source| InitError::Write { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if request.force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => InitError::Exists(path.to_owned()),
        _ => fail(e),
    })?;
    file.write_all(text.as_bytes()).map_err(fail)
}

/// The written file loaded as `run` loads it, and its mapping resolved against the table.
async fn check(client: &Client, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<(), InitError> {
    let invalid = |message: String| InitError::Invalid { path: path.to_owned(), message };
    let config = Config::load(Some(path), env).map_err(|e| invalid(e.to_string()))?;
    match UserTable::resolve(client, &config.users).await {
        Ok(_) => Ok(()),
        Err(SchemaError::Db(e)) => Err(e.into()),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// The summary of what was written.
fn written(path: &Path, p: &Proposal, database: &Database) -> Written {
    let guesses = p
        .guesses
        .iter()
        .map(|g| {
            let key = match g.section {
                Section::Users | Section::Contact => g.key.to_owned(),
                Section::Phone1 => format!("PHONE1 {}", g.key),
                Section::Billing => format!("BILLING {}", g.key),
            };
            match &g.value {
                guess::Value::Column(c) => format!("{key} ← {c}"),
                guess::Value::Sql(_) => format!("{key} ← an SQL expression"),
            }
        })
        .collect();
    Written {
        path: path.to_owned(),
        guesses,
        unused: p.unused.len(),
        password_elsewhere: matches!(database, Database::PasswordElsewhere(_)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_reaches_the_file() {
        let url = Secret::new("postgresql://app:s3cret@db.example:6432/crm?sslmode=require");
        let Database::PasswordElsewhere(shown) = database(&url) else { panic!("the password was kept") };
        assert_eq!(shown, "host=db.example port=6432 dbname=crm user=app sslmode=require");
        let plain = Secret::new("host=/run/postgresql dbname=crm user=keap_sync");
        assert_eq!(database(&plain), Database::Url("host=/run/postgresql dbname=crm user=keap_sync".into()));
    }

    #[test]
    fn conninfo_values_are_quoted_when_they_must_be() {
        assert_eq!(conninfo_value("crm"), "crm");
        assert_eq!(conninfo_value("my db"), "'my db'");
        assert_eq!(conninfo_value("it's"), "'it\\'s'");
        assert_eq!(conninfo_value(""), "''");
    }
}
