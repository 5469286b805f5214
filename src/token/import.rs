//! New grants (`auth import`, `auth login`, [`import_grant`]): the token answer parsed and
//! stored in one transaction, refusing another Keap app unless the switch is asked for.

use tokio_postgres::Client;

use super::refresh::ClassifyName;
use super::store::{account_from_scope, write_grant, Write};
use super::{ImportError, TokenError};
use crate::db;
use crate::keap::model::TokenResponse;

/// Parses a token endpoint answer (`auth import`'s standard input, or the code exchange's
/// reply). Extra fields such as `token_type` are ignored.
pub(crate) fn parse_token_response(text: &str) -> Result<TokenResponse, TokenError> {
    let parsed: TokenResponse = serde_json::from_str(text.trim()).map_err(|e| {
        TokenError::InvalidResponse(format!(
            "not a token response: expected JSON with access_token, refresh_token and expires_in ({})",
            e.classify_name()
        ))
    })?;
    if parsed.access_token.trim().is_empty()
        || parsed.refresh_token.trim().is_empty()
        || parsed.expires_in <= 0
    {
        return Err(TokenError::InvalidResponse(
            "the token response needs a non-empty access_token and refresh_token and a positive expires_in"
                .into(),
        ));
    }
    Ok(parsed)
}

/// Stores a new OAuth grant given as the token endpoint's JSON answer (what `keap-sync auth
/// import` reads on standard input) and wakes any daemon paused for authorisation. Returns the
/// access token's lifetime in seconds.
///
/// A grant for another Keap app than the stored one is refused with [`ImportError::OtherApp`]
/// and nothing is stored: the contact map holds contact ids of the stored grant's app.
/// Switching apps is `keap-sync auth import --switch-account`.
pub async fn import_grant(client: &Client, token_json: &str) -> Result<i64, ImportError> {
    let tokens = parse_token_response(token_json)?;
    let imported = import_new_grant(client, &tokens, false).await?;
    // Wake any paused daemon now rather than at its next recheck.
    db::wake_daemons(client).await.map_err(TokenError::from)?;
    Ok(imported.expires_in)
}

/// What storing a new grant did, for the command to report.
#[derive(Debug)]
pub(crate) struct Imported {
    /// The access token's lifetime in seconds.
    pub expires_in: i64,
    /// The app the stored grant is for now (`None`: unknown).
    pub account: Option<String>,
    /// The token response named no app (its `scope`, if any, is here); `account` is what was
    /// known before.
    pub unnamed_scope: Option<Option<String>>,
    /// Set when the grant moved the sync to another app.
    pub switched: Option<Switched>,
    /// Users the contact map links to contacts of an app keap-sync cannot name (made under a
    /// grant stored before the app was recorded, or an API key): they may be in another app.
    pub unverified_links: i64,
}

/// A deliberate switch to another Keap app.
#[derive(Debug)]
pub(crate) struct Switched {
    /// The app before (`None`: unknown).
    pub from: Option<String>,
    /// Links of the contact map to contacts of the old app that were forgotten.
    pub unlinked: u64,
}

/// Stores a new grant for `auth import` and `auth login`, in one transaction. With
/// `switch_account`, a grant for another app than the stored one (or than the contact map's
/// links, when their app is unknown) is accepted: the links to the old app's contacts are
/// forgotten, so no call ever goes to one of its contact ids in the new app, and the switch is
/// recorded and logged. That needs no daemon delivering meanwhile, so it takes the delivery
/// lock (waiting briefly for a daemon that is just stopping).
pub(crate) async fn import(
    client: &mut Client,
    tokens: &TokenResponse,
    switch_account: bool,
) -> Result<Imported, ImportError> {
    let tx = client.transaction().await?;
    let imported = import_new_grant(&tx, tokens, switch_account).await?;
    tx.commit().await?;
    db::wake_daemons(client).await.map_err(TokenError::from)?;
    Ok(imported)
}

/// Stores a new grant, refusing one for another app unless `allow_switch`; see [`import`].
/// `allow_switch` only inside a transaction: the contact map is cleared under the delivery
/// lock, in the same transaction as the new grant is stored.
async fn import_new_grant(
    db: &impl tokio_postgres::GenericClient,
    tokens: &TokenResponse,
    allow_switch: bool,
) -> Result<Imported, ImportError> {
    let offered = tokens.scope.as_deref().and_then(account_from_scope);
    // Read without a row lock: the refusal is also part of the write's one statement, and the
    // delivery lock below must not be waited for while holding the token row a daemon refreshes.
    let row = db
        .query_one(
            "select (select account from keap_sync.oauth_token where id = 1),
                    (select count(*) from keap_sync.contact_map)",
            &[],
        )
        .await?;
    let (stored, linked): (Option<String>, i64) = (row.get(0), row.get(1));
    let same = stored.is_some() && stored == offered;
    let words = |a: &Option<String>| a.clone().unwrap_or_else(|| "an app keap-sync did not record".into());
    if let (Some(stored), Some(offered), false, false) = (&stored, &offered, same, allow_switch) {
        return Err(ImportError::OtherApp { stored: stored.clone(), offered: offered.clone(), linked });
    }
    let switching = allow_switch && !same && (stored.is_some() || linked > 0);
    let mut unlinked = 0;
    if switching {
        // A daemon that is just stopping releases the lock within moments; one that runs does not.
        db.batch_execute("set local lock_timeout = '3s'").await?;
        if let Err(e) = db.execute("select pg_advisory_xact_lock($1)", &[&db::DELIVERY_LOCK]).await {
            if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                return Err(ImportError::SwitchWhileDelivering { from: words(&stored), to: words(&offered) });
            }
            return Err(e.into());
        }
        unlinked = db.execute("delete from keap_sync.contact_map", &[]).await?;
        // The mirror pictures the old app's contacts: a lookup must never find one there.
        db.batch_execute(
            "delete from keap_sync.mirror;
             update keap_sync.mirror_state
                set watermark = null, listing_token = null, listing_started_at = null, listed_at = null,
                    reconciled_at = null, reconciled_users = null, drift = null",
        )
        .await?;
    }
    let how = if switching { Write::SwitchApp } else { Write::NewGrant };
    if !write_grant(db, tokens, how).await? {
        // Another import stored a grant for another app since the read above.
        let now: Option<String> =
            db.query_one("select account from keap_sync.oauth_token where id = 1", &[]).await?.get(0);
        return Err(ImportError::OtherApp { stored: words(&now), offered: words(&offered), linked });
    }
    if switching {
        tracing::warn!(
            from = %words(&stored),
            to = %words(&offered),
            unlinked,
            "switched the Keap app of the grant; links to contacts of the old app were forgotten"
        );
    }
    Ok(Imported {
        expires_in: tokens.expires_in,
        account: if switching { offered.clone() } else { offered.clone().or_else(|| stored.clone()) },
        unnamed_scope: offered.is_none().then(|| tokens.scope.clone()),
        switched: switching.then(|| Switched { from: stored.clone(), unlinked }),
        unverified_links: if !switching && stored.is_none() && linked > 0 { linked } else { 0 },
    })
}
