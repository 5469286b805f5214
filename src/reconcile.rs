//! Keap as it is: bringing keap-sync's mirror of Keap up to date (`keap_sync.mirror`, see
//! [`crate::mirror`]), the ground the drift report and its repair stand on.

use crate::access::KeapAccess;
use crate::config::Config;
use crate::daemon::RunError;
use crate::db;
use crate::mapping::Mapper;
use crate::mirror::{self, MirrorError};
use crate::ratelimit::Reserving;
use crate::schema;

pub use crate::mirror::Listing;

/// Why the mirror could not be refreshed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The configuration, schema or database.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Keap's listing failed; what was stored stays, and the next refresh resumes the listing.
    #[error("{0}")]
    Mirror(String),
}

impl From<MirrorError> for ReconcileError {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::Db(e) => ReconcileError::Run(e.into()),
            other => ReconcileError::Mirror(other.to_string()),
        }
    }
}

/// Lists every Keap contact into the mirror (resuming a listing stopped half-way), counting
/// the calls against the day like deliveries. Changes nothing in Keap or the users table.
pub async fn refresh_mirror(config: &Config) -> Result<Listing, ReconcileError> {
    let pg = db::parse(config.database().map_err(RunError::from)?).map_err(RunError::from)?;
    let client = db::connect(&pg).await.map_err(RunError::from)?;
    schema::ensure_current(&client).await.map_err(RunError::from)?;
    let access = KeapAccess::build(config, &pg).map_err(RunError::from)?;
    let reserving = Reserving::start(&access.limiter, &pg);
    let mapper = Mapper::new(&config.users);
    let listed = mirror::list_all(&client, &access, &mapper, config.keap.request_timeout).await;
    drop(reserving);
    access.limiter.give_back(&client).await;
    Ok(listed?)
}
