//! TLS for every connection keap-sync makes, to Postgres and to Keap: rustls with the ring
//! provider and the platform's trust store, in one client configuration built once per
//! process (loading the trust store is the slow part, and every reconnect would repeat it).

use std::sync::{Arc, OnceLock};

/// The one client configuration: the platform's verifier, no client certificate. Without a
/// usable system trust store it trusts nothing, so a TLS server fails verification with a
/// clear error instead of being trusted, and plaintext or Unix-socket servers still work.
pub(crate) fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Also the process default, for any rustls user that asks for it; harmless if set.
        let _ = rustls::crypto::CryptoProvider::install_default((*provider).clone());
        let builder = || {
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
        };
        let config =
            builder().with_platform_verifier().map(|b| b.with_no_client_auth()).unwrap_or_else(|_| {
                builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
            });
        Arc::new(config)
    }))
}

/// The connector `tokio-postgres` uses, built once: a copy is a reference count, so every
/// connect (and reconnect) shares the one configuration.
pub(crate) fn postgres() -> tokio_postgres_rustls::MakeRustlsConnect {
    static CONNECTOR: OnceLock<tokio_postgres_rustls::MakeRustlsConnect> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| tokio_postgres_rustls::MakeRustlsConnect::new((*client_config()).clone()))
        .clone()
}

/// The HTTP client builder every Keap call starts from (contacts, the token endpoint, `auth
/// login`'s code exchange), with the same TLS configuration.
pub(crate) fn http() -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured((*client_config()).clone())
}
