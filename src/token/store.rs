//! The token row, `keap_sync.oauth_token`: the stored grant read and checked, a token answer
//! written (refusing one for another Keap app), and the app a grant's scope names.

use tokio_postgres::Client;

use super::{GrantState, TokenError, REAUTHORIZE_HINT};
use crate::db::DbError;
use crate::keap::model::TokenResponse;
use crate::secret::Secret;

/// A stored OAuth grant, as read from the token table.
pub(super) struct Stored {
    pub(super) access_token: Secret,
    pub(super) refresh_token: Secret,
    /// Seconds until the access token expires (negative: expired).
    pub(super) expires_in: f64,
    /// Seconds since the refresh token was issued.
    pub(super) refresh_age: f64,
    pub(super) state: GrantState,
    pub(super) state_detail: Option<String>,
    /// The Keap app the grant is for, if known.
    pub(super) account: Option<String>,
}

/// Reads the grant as [`Stored`] (columns in `stored_from`'s order).
pub(super) const SELECT_STORED: &str = "select access_token, refresh_token,
        extract(epoch from expires_at - now())::float8,
        extract(epoch from now() - refresh_token_issued_at)::float8,
        state, state_detail, account
   from keap_sync.oauth_token where id = 1";

/// Puts the stored grant in the "re-authorisation needed" state with `detail` as the reason.
pub(super) async fn mark_reauthorization_needed(
    db: &impl tokio_postgres::GenericClient,
    detail: &str,
) -> Result<(), TokenError> {
    db.execute(
        "update keap_sync.oauth_token
            set state = 'reauthorization_needed', state_detail = $1, updated_at = now()
          where id = 1",
        &[&detail],
    )
    .await?;
    Ok(())
}

/// Whether the stored grant may be used; one marked for re-authorisation is an error saying why.
pub(super) fn check_state(s: &Stored) -> Result<(), TokenError> {
    if s.state == GrantState::Ok {
        return Ok(());
    }
    Err(TokenError::NeedsAuthorization(format!(
        "{}; {REAUTHORIZE_HINT}",
        s.state_detail.as_deref().unwrap_or("the Keap grant needs re-authorisation")
    )))
}

/// The stored grant, or an error asking for re-authorisation when none is stored.
pub(super) async fn read(db: &Client) -> Result<Stored, TokenError> {
    let row = db.query_opt(SELECT_STORED, &[]).await?;
    stored_from(row)
}

/// The grant in a row of [`SELECT_STORED`], or an error asking for re-authorisation when there is none.
pub(super) fn stored_from(row: Option<tokio_postgres::Row>) -> Result<Stored, TokenError> {
    let row = row.ok_or_else(|| {
        TokenError::NeedsAuthorization(format!("no Keap OAuth tokens are stored yet; {REAUTHORIZE_HINT}"))
    })?;
    Ok(Stored {
        access_token: Secret::new(row.get::<_, String>(0)),
        refresh_token: Secret::new(row.get::<_, String>(1)),
        expires_in: row.get(2),
        refresh_age: row.get(3),
        state: GrantState::from_db(row.get(4))?,
        state_detail: row.get(5),
        account: row.get(6),
    })
}

/// Writes a token response into the store. `new_grant` (import, login) also resets the grant's
/// start time and clears a "re-authorisation needed" state. A refresh must have been checked
/// with [`refreshed_for_other_app`] first; a new grant for another app than the stored one is
/// not written (see [`Write::NewGrant`]).
pub(crate) async fn store(
    db: &impl tokio_postgres::GenericClient,
    t: &TokenResponse,
    new_grant: bool,
) -> Result<(), TokenError> {
    let how = if new_grant { Write::NewGrant } else { Write::Refresh };
    if write_grant(db, t, how).await? {
        Ok(())
    } else {
        Err(TokenError::InvalidResponse("the grant is for another Keap app than the stored one".into()))
    }
}

/// How [`write_grant`] treats the app (account) a token response names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// A refresh of the stored grant: same app (checked before), or the stored one kept.
    Refresh,
    /// A new grant: written only if it is for the stored app, or either app is unknown; a
    /// response that names no app keeps the stored one.
    NewGrant,
    /// A new grant for another app, on the user's explicit word: recorded as the switch.
    SwitchApp,
}

/// Writes `t`; false if [`Write::NewGrant`] found a grant for another app stored (nothing
/// written). The check is part of the one statement, so two imports racing cannot both win.
pub(super) async fn write_grant(
    db: &impl tokio_postgres::GenericClient,
    t: &TokenResponse,
    how: Write,
) -> Result<bool, TokenError> {
    if t.access_token.is_empty() || t.refresh_token.is_empty() || t.expires_in <= 0 {
        return Err(TokenError::InvalidResponse(
            "the token response needs a non-empty access_token and refresh_token and a positive expires_in"
                .into(),
        ));
    }
    let account = t.scope.as_deref().and_then(account_from_scope);
    let new_grant = how != Write::Refresh;
    let switch = how == Write::SwitchApp;
    let written = db
        .execute(
            "insert into keap_sync.oauth_token as o
                    (id, access_token, refresh_token, expires_at, scope, account, account_switched_at, granted_at,
                     refresh_token_issued_at, refreshed_at, state, state_detail, updated_at)
             values (1, $1, $2, now() + make_interval(secs => $3), $4, $6, case when $7 then now() end, now(),
                     now(), null, 'ok', null, now())
             on conflict (id) do update
                set access_token = excluded.access_token,
                    refresh_token = excluded.refresh_token,
                    expires_at = excluded.expires_at,
                    scope = coalesce(excluded.scope, o.scope),
                    account = case when $7 then excluded.account else coalesce(excluded.account, o.account) end,
                    previous_account = case when $7 then o.account else o.previous_account end,
                    account_switched_at = case when $7 then now() else o.account_switched_at end,
                    granted_at = case when $5 then now() else o.granted_at end,
                    refresh_token_issued_at = now(),
                    refreshed_at = case when $5 then o.refreshed_at else now() end,
                    held_answer = case when $5 then null else o.held_answer end,
                    held_at = case when $5 then null else o.held_at end,
                    state = 'ok', state_detail = null, updated_at = now()
              where $7 or o.account is null or excluded.account is null or o.account = excluded.account",
            &[&t.access_token, &t.refresh_token, &(t.expires_in as f64), &t.scope, &new_grant, &account, &switch],
        )
        .await
        .map_err(|e| TokenError::Db(DbError::Query(e)))?;
    Ok(written == 1)
}

/// The Keap app (account, tenant) a token response's `scope` names: Keap answers
/// `full|abc123.infusionsoft.com`, and the part after the `|` is the app's host name
/// (`docs/keap-api.md`, "Token response"). `None` when it names none recognisably: no `|`,
/// more than one, or anything but letters, digits, dots and dashes after it. Lower case, as
/// host names compare. `sql/0006_grant_account.sql` (`keap_sync.grant_account`) reads stored
/// scopes the same way.
pub(crate) fn account_from_scope(scope: &str) -> Option<String> {
    let (_, app) = scope.split_once('|')?;
    let app = app.trim();
    let host_like = app.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    (host_like && app.chars().any(|c| c.is_ascii_alphanumeric())).then(|| app.to_ascii_lowercase())
}
