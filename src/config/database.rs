//! `[database]`: the connection URL, the CA to trust for its TLS, and the session's timeouts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::values::secs;
use super::{ConfigError, Secret};

/// Where the daemon finds Postgres.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// libpq-style URL or `key=value` string; may hold a password, so it is a [`Secret`] and
    /// only its host, port, database and user are ever printed.
    pub url: Secret,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Server-side limit on any one statement (`statement_timeout`): a stuck statement costs
    /// that statement, not the session.
    pub statement_timeout: Duration,
    /// Server-side limit on waiting for a row or table lock (`lock_timeout`): an app
    /// transaction holding a user's row holds up that user's delivery, not everyone's.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: a transaction of ours left open (a bug, a stalled
    /// task) never holds its locks for longer.
    pub idle_in_transaction_timeout: Duration,
    /// TCP keepalive idle time: a connection silently cut by a firewall or failover is noticed
    /// within about this plus a few probes, instead of the kernel's two hours.
    pub keepalive_idle: Duration,
    /// `ca_file`: CA certificates trusted for the server's TLS certificate, besides the
    /// platform's trust store (a private CA, a cloud provider's database CA).
    pub ca_file: Option<CaFile>,
}

/// The CA certificates of a PEM file, read and checked when the configuration loads, so a
/// missing or broken file stops the start with the file's name instead of failing every
/// connect. Equal files share one TLS connector (`tls::postgres`).
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    path: PathBuf,
    certificates: Arc<[CertificateDer<'static>]>,
}

impl CaFile {
    /// Reads every certificate in the PEM file at `path` (one or more `BEGIN CERTIFICATE`
    /// sections; anything else in the file is skipped). An unreadable file, one that is not
    /// PEM, or one without a certificate is an error naming the file and the fix.
    pub fn read(path: &Path) -> Result<CaFile, ConfigError> {
        let shown = path.display();
        let fix = "set database.ca_file to a PEM file holding the certificate of the CA that signed \
                   the server's certificate (relative paths start at the config file's directory)";
        let invalid = |what: String| ConfigError::Invalid(format!("database.ca_file {shown}: {what}: {fix}"));
        // Read whole first, so an unreadable file (missing, a directory, no permission) says so.
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot be read ({e})")))?;
        let mut certificates = Vec::new();
        for item in CertificateDer::pem_slice_iter(&bytes) {
            // The reasons are ours, not the parser's: its messages can quote bytes of the file,
            // and a mistaken path may name a file that holds a key.
            let certificate = item.map_err(|e| {
                invalid(match e {
                    pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
                    pem::Error::SectionTooLarge => "a PEM section is too large".to_owned(),
                    _ => "it is not valid PEM".to_owned(),
                })
            })?;
            let n = certificates.len() + 1;
            rustls::RootCertStore::empty()
                .add(certificate.clone())
                .map_err(|e| invalid(format!("certificate {n} is not a usable CA certificate ({e})")))?;
            certificates.push(certificate);
        }
        if certificates.is_empty() {
            return Err(invalid(
                "it holds no PEM certificate (no -----BEGIN CERTIFICATE----- section; \
                 a DER file converts with `openssl x509 -inform der -in ca.der -out ca.pem`)"
                    .to_owned(),
            ));
        }
        Ok(CaFile { path: path.to_owned(), certificates: certificates.into() })
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The certificates, in the file's order.
    pub(crate) fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileDatabase {
    /// Or `DATABASE_URL`; commands that need the database refuse to start without one.
    pub(super) url: Option<String>,
    pub(super) connect_timeout_secs: u64,
    pub(super) statement_timeout_secs: u64,
    pub(super) lock_timeout_secs: u64,
    pub(super) idle_in_transaction_timeout_secs: u64,
    pub(super) keepalive_idle_secs: u64,
    /// PEM file of extra CA certificates for the server's TLS certificate; no default.
    pub(super) ca_file: Option<PathBuf>,
}

impl Default for FileDatabase {
    fn default() -> Self {
        FileDatabase {
            url: None,
            connect_timeout_secs: 10,
            statement_timeout_secs: 30,
            lock_timeout_secs: 5,
            idle_in_transaction_timeout_secs: 60,
            keepalive_idle_secs: 30,
            ca_file: None,
        }
    }
}

impl FileDatabase {
    /// `[database]` checked, or `None` without a URL; the lock timeout must be below the
    /// statement timeout, and `ca_file` (relative to `base_dir`, the config file's directory)
    /// must hold CA certificates.
    pub(super) fn validate(self, base_dir: &Path) -> Result<Option<DatabaseConfig>, ConfigError> {
        let Some(url) = self.url else { return Ok(None) };
        let statement_timeout = secs("database.statement_timeout_secs", self.statement_timeout_secs)?;
        let lock_timeout = secs("database.lock_timeout_secs", self.lock_timeout_secs)?;
        if lock_timeout >= statement_timeout {
            // Otherwise a lock wait always ends as a statement timeout, and the retry cannot
            // tell a locked row from a slow statement.
            return Err(ConfigError::Invalid(format!(
                "database.lock_timeout_secs ({}) must be less than database.statement_timeout_secs ({})",
                self.lock_timeout_secs, self.statement_timeout_secs
            )));
        }
        Ok(Some(DatabaseConfig {
            url: Secret::new(url),
            connect_timeout: secs("database.connect_timeout_secs", self.connect_timeout_secs)?,
            statement_timeout,
            lock_timeout,
            idle_in_transaction_timeout: secs(
                "database.idle_in_transaction_timeout_secs",
                self.idle_in_transaction_timeout_secs,
            )?,
            keepalive_idle: secs("database.keepalive_idle_secs", self.keepalive_idle_secs)?,
            ca_file: self.ca_file.map(|path| CaFile::read(&base_dir.join(path))).transpose()?,
        }))
    }
}
