//! TLS for every connection keap-sync makes, to Postgres and to Keap: rustls with the ring
//! provider and the platform's trust store, in one client configuration built once per
//! process (loading the trust store is the slow part, and every reconnect would repeat it).
//! Postgres may also trust the CA certificates of `[database] ca_file`: one more configuration
//! per distinct set of them, built on first use and then shared the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::pki_types::CertificateDer;

use crate::config::CaFile;

/// The ring provider, installed as the process default too, for any rustls user that asks for
/// it (harmless if one is set already).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let _ = rustls::crypto::CryptoProvider::install_default((*provider).clone());
        provider
    }))
}

/// A client configuration builder with the ring provider and rustls' safe protocol versions.
fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
}

/// The one client configuration: the platform's verifier, no client certificate. Without a
/// usable system trust store it trusts nothing, so a TLS server fails verification with a
/// clear error instead of being trusted, and plaintext or Unix-socket servers still work.
pub(crate) fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        use rustls_platform_verifier::BuilderVerifierExt;
        let config =
            builder().with_platform_verifier().map(|b| b.with_no_client_auth()).unwrap_or_else(|_| {
                builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
            });
        Arc::new(config)
    }))
}

/// A client configuration that trusts `extra` besides the platform's store. Without a usable
/// system store it trusts `extra` alone (the certificates were checked when the configuration
/// loaded, so none is skipped).
fn with_extra_roots(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    match rustls_platform_verifier::Verifier::new_with_extra_roots(extra.iter().cloned(), provider()) {
        Ok(verifier) => builder().dangerous().with_custom_certificate_verifier(Arc::new(verifier)),
        Err(_) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(extra.iter().cloned());
            builder().with_root_certificates(roots)
        }
    }
    .with_no_client_auth()
}

/// The Postgres connectors built for a `ca_file`, by its certificates.
type ByRoots = HashMap<Vec<CertificateDer<'static>>, tokio_postgres_rustls::MakeRustlsConnect>;

/// [`ByRoots`], locked: held while a new configuration is built (the trust store is read once),
/// never across an await.
fn with_ca() -> std::sync::MutexGuard<'static, ByRoots> {
    static WITH_CA: OnceLock<Mutex<ByRoots>> = OnceLock::new();
    WITH_CA.get_or_init(Mutex::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connector `tokio-postgres` uses: with no `ca_file`, the one configuration of
/// [`client_config`]; with one, a configuration that also trusts its certificates, built once
/// per distinct set of certificates. A copy is a reference count, so every connect (and
/// reconnect) shares one configuration.
pub(crate) fn postgres(ca_file: Option<&CaFile>) -> tokio_postgres_rustls::MakeRustlsConnect {
    static PLATFORM: OnceLock<tokio_postgres_rustls::MakeRustlsConnect> = OnceLock::new();
    let Some(ca_file) = ca_file else {
        return PLATFORM
            .get_or_init(|| tokio_postgres_rustls::MakeRustlsConnect::new((*client_config()).clone()))
            .clone();
    };
    with_ca()
        .entry(ca_file.certificates().to_vec())
        .or_insert_with(|| {
            tokio_postgres_rustls::MakeRustlsConnect::new(with_extra_roots(ca_file.certificates()))
        })
        .clone()
}

/// The HTTP client builder every Keap call starts from (contacts, the token endpoint, `auth
/// login`'s code exchange), with the same TLS configuration.
pub(crate) fn http() -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured((*client_config()).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many configurations with a `ca_file` were built so far.
    fn built() -> usize {
        with_ca().len()
    }

    #[test]
    fn one_postgres_configuration_per_distinct_ca_file_however_often_it_is_asked_for() {
        let dir = std::env::temp_dir().join(format!(
            "keap-sync-tls-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = include_str!("config/testdata/two-cas.pem");
        // The same certificates in two files count as one CA configuration.
        std::fs::write(dir.join("a.pem"), ca).unwrap();
        std::fs::write(dir.join("b.pem"), ca).unwrap();
        let a = CaFile::read(&dir.join("a.pem")).unwrap();
        let b = CaFile::read(&dir.join("b.pem")).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let before = built();
        for _ in 0..3 {
            let _ = postgres(Some(&a));
            let _ = postgres(Some(&b));
            let _ = postgres(None);
        }
        assert_eq!(built(), before + 1);
    }
}
