//! Access to Keap for one configuration: the REST client, the credential (API key or OAuth
//! grant), and the rate limiter and metrics they share. One factory, called by the daemon,
//! `preview` and (next) `reconcile`, so every path to Keap is limited and authorised alike.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::db;
use crate::keap::KeapClient;
use crate::metrics::Metrics;
use crate::ratelimit::Limiter;
use crate::token::{TokenPolicy, TokenSource};

/// The Keap client and credential of a configuration, with their shared limiter and metrics.
pub(crate) struct KeapAccess {
    pub(crate) keap: KeapClient,
    pub(crate) tokens: TokenSource,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) metrics: Arc<Metrics>,
}

/// Why Keap access could not be set up (no call is made, so never Keap's answer).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessError {
    /// No usable credential in the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (TLS setup).
    #[error("{0}")]
    Setup(String),
}

impl KeapAccess {
    /// Builds the access of `config`; `pg` is where the OAuth grant is kept. Makes no call.
    pub(crate) fn build(config: &Config, pg: &db::Target) -> Result<KeapAccess, AccessError> {
        let credential = config.credential()?.clone();
        let limiter = Arc::new(Limiter::new(&config.limits, &credential));
        let metrics = Arc::new(Metrics::new());
        let keap = KeapClient::new(
            &config.keap.api_url,
            config.keap.request_timeout,
            config.keap.connect_timeout,
            Arc::clone(&limiter),
            Arc::clone(&metrics),
        )
        .map_err(AccessError::Setup)?;
        let tokens = TokenSource::new(
            &credential,
            &config.keap.token_url,
            pg.clone(),
            TokenPolicy::from_config(&config.keap),
            config.keap.request_timeout,
            config.keap.connect_timeout,
            Arc::clone(&metrics),
        )
        .map_err(AccessError::Setup)?;
        Ok(KeapAccess { keap, tokens, limiter, metrics })
    }
}
