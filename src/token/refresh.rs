//! The refresh under the token row's lock: the token endpoint called, and its answer classified
//! into a stored pair, a transient failure, a lost grant, or a rotated answer kept aside.

use super::source::OAuth;
use super::store::{
    account_from_scope, check_state, mark_reauthorization_needed, store, stored_from, Stored, SELECT_STORED,
};
use super::{TokenError, REAUTHORIZE_HINT};
use crate::db;
use crate::keap::model::{ErrorBody, TokenResponse};
use crate::secret::Secret;

impl OAuth {
    /// The refresh itself; the caller holds `refreshing`. Takes the token row's lock, asks the
    /// token endpoint ([`OAuth::request_refresh`]) unless another refresher already did, and
    /// acts on the answer ([`OAuth::take_new_pair`], [`OAuth::take_refusal`]).
    pub(super) async fn refresh_locked(&self, stale: Option<&Secret>) -> Result<Secret, TokenError> {
        let mut conn = db::connect(&self.pg).await?;
        let tx = conn.transaction().await?;
        // This transaction holds the token row across Keap's token request (bounded by the
        // request timeout) and must commit the new pair Keap hands out, and a second refresher
        // must wait for it, not fail: the connection-wide timeouts (`db::parse`) do not apply.
        tx.batch_execute(
            "set local statement_timeout = 0; set local lock_timeout = 0;
             set local idle_in_transaction_session_timeout = 0",
        )
        .await?;
        let row = tx.query_opt(&format!("{SELECT_STORED} for update"), &[]).await?;
        let stored = stored_from(row)?;
        check_state(&stored)?;
        let someone_else_refreshed = stale.is_some_and(|s| s != &stored.access_token);
        if someone_else_refreshed && !self.needs_refresh(&stored) {
            tx.commit().await?;
            return Ok(stored.access_token);
        }

        let credentials = self.basic_credentials()?;
        let answer = match self.request_refresh(&stored, credentials).await {
            Ok(answer) => answer,
            Err(NoAnswer { error, counted }) => {
                tx.rollback().await.ok();
                if counted {
                    self.metrics.token_refresh(false);
                }
                return Err(error);
            }
        };
        if answer.status.is_success() {
            return self.take_new_pair(tx, &stored, answer.status, &answer.text).await;
        }
        self.take_refusal(tx, answer).await
    }

    /// The refresh request itself: the stored refresh token sent to the token endpoint, and its
    /// answer read up to the cap (invariant 16). No answer worth classifying (unreachable, a
    /// redirect, a success that cannot be read) is a [`NoAnswer`].
    async fn request_refresh(
        &self,
        stored: &Stored,
        credentials: reqwest::header::HeaderValue,
    ) -> Result<Answer, NoAnswer> {
        let answer = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::AUTHORIZATION, credentials)
            .form(&[("grant_type", "refresh_token"), ("refresh_token", stored.refresh_token.expose())])
            .send()
            .await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                return Err(NoAnswer {
                    error: TokenError::Transient(format!(
                        "token endpoint unreachable: {}",
                        crate::keap::describe_reqwest(&e)
                    )),
                    counted: false,
                });
            }
        };
        let status = response.status();
        if status.is_redirection() {
            // Not followed: the form holds the refresh token (ARCHITECTURE.md, invariant 16).
            // Transient, and the grant is kept: a redirect refuses nothing, and the refresh
            // token never left for the other host, so it is still good once the endpoint
            // answers again (or `keap.token_url` is corrected).
            return Err(NoAnswer {
                error: TokenError::Transient(format!(
                    "token endpoint answered {status}: {}",
                    crate::keap::redirect_refused(&response, "keap.token_url (KEAP_TOKEN_URL)")
                )),
                counted: true,
            });
        }
        // Read up to the cap (invariant 16). An error answer we cannot read is judged by its
        // status alone, as before.
        let (text, unread) = match crate::keap::read_reply(response).await {
            Ok(text) => (text, None),
            Err(e) => (String::new(), Some(e.to_string())),
        };
        if let (true, Some(e)) = (status.is_success(), &unread) {
            // A success we cannot read, too large or cut off, may still mean Keap rotated the
            // pair and the old refresh token is spent. There is nothing to store, so this is
            // the same case as an unreadable body below: transient. The next refresh tells
            // (invalid_grant asks for re-authorisation), and reading more would not help: the
            // cap exists so that no answer can grow memory without bound.
            return Err(NoAnswer {
                error: TokenError::Transient(format!("token endpoint answered {status}, but {e}")),
                counted: true,
            });
        }
        Ok(Answer { status, text, unread })
    }

    /// A success answer: the new pair stored and committed, unless it cannot be read or stored
    /// or names another Keap app; then an answer that rotated the pair is kept aside
    /// ([`OAuth::hold`]), and one that did not is transient or a lost grant.
    async fn take_new_pair(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        stored: &Stored,
        status: reqwest::StatusCode,
        text: &str,
    ) -> Result<Secret, TokenError> {
        let parsed: TokenResponse = match serde_json::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let why = format!(
                    "the token endpoint answered {status} with a body keap-sync cannot read as a token answer ({})",
                    e.classify_name()
                );
                if rotated(text) {
                    return self.hold(tx, text, &why, HeldUse::Salvage).await;
                }
                // No refresh token in it: nothing to keep. Retry, and if Keap then says
                // invalid_grant, ask for re-authorisation.
                tx.rollback().await.ok();
                return Err(TokenError::Transient(format!(
                    "token endpoint answered {status} with an unreadable body ({})",
                    e.classify_name()
                )));
            }
        };
        if let Some(detail) = refreshed_for_other_app(stored.account.as_deref(), &parsed) {
            if rotated(text) {
                return self.hold(tx, text, &detail, HeldUse::Switch).await;
            }
            self.metrics.token_refresh(false);
            mark_reauthorization_needed(&tx, &detail).await?;
            tx.commit().await?;
            tracing::error!(reason = %detail, "the token refresh answered for another Keap app; deliveries pause");
            return Err(TokenError::NeedsAuthorization(format!("{detail}; {REAUTHORIZE_HINT}")));
        }
        match store(&tx, &parsed, false).await {
            Ok(()) => {}
            Err(TokenError::InvalidResponse(why)) if rotated(text) => {
                let why = format!("Keap's answer to the token refresh cannot be stored: {why}");
                return self.hold(tx, text, &why, HeldUse::Salvage).await;
            }
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        self.metrics.token_refresh(true);
        tracing::info!(expires_in_secs = parsed.expires_in, "refreshed the Keap access token");
        Ok(Secret::new(parsed.access_token))
    }

    /// An error answer: the grant marked "re-authorisation needed" when Keap refused it for
    /// good ([`grant_lost`]), else a transient failure.
    async fn take_refusal(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        answer: Answer,
    ) -> Result<Secret, TokenError> {
        let Answer { status, text, unread } = answer;
        let body: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
        let code = body.error.clone().unwrap_or_default();
        let describe = body.summary().unwrap_or_else(|| match &unread {
            Some(e) => format!("{status}; {e}"),
            None => status.to_string(),
        });
        let lost = grant_lost(status, &code, &describe);
        self.metrics.token_refresh(false);
        if lost {
            let detail = format!("Keap refused the token refresh ({status}: {describe})");
            mark_reauthorization_needed(&tx, &detail).await?;
            tx.commit().await?;
            return Err(TokenError::NeedsAuthorization(format!("{detail}; {REAUTHORIZE_HINT}")));
        }
        tx.rollback().await.ok();
        Err(TokenError::Transient(format!("token endpoint answered {status}: {describe}")))
    }

    /// Keeps aside a 200 answer that rotated the pair but is refused (`why`), in the
    /// transaction that holds the token row, marks the grant "re-authorisation needed" with a
    /// detail that says it was kept and how to store it, and commits. Keap has spent the old
    /// refresh token, so the answer's is the only live one: thrown away, the grant would be
    /// lost for good. The answer is a secret: it goes to the table, never to a log or error.
    async fn hold(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        answer: &str,
        why: &str,
        used: HeldUse,
    ) -> Result<Secret, TokenError> {
        self.metrics.token_refresh(false);
        let how = match used {
            HeldUse::Switch => {
                "to move the sync to that app with it, stop every keap-sync daemon, then run \
                 `psql \"$DATABASE_URL\" -Atc 'select held_answer from keap_sync.oauth_token' | keap-sync auth \
                 import --switch-account`"
            }
            HeldUse::Salvage => {
                "its refresh token is still unspent: once the answer is corrected (or Keap support \
                 confirms it), `psql \"$DATABASE_URL\" -Atc 'select held_answer from keap_sync.oauth_token' | \
                 keap-sync auth import` stores it"
            }
        };
        let detail = format!(
            "{why}. Keap rotated the pair all the same (the refresh token sent is spent), so its answer is kept \
             aside, unused, in keap_sync.oauth_token.held_answer (a secret: never logged); {how}"
        );
        tx.execute(
            "update keap_sync.oauth_token set held_answer = $1, held_at = now() where id = 1",
            &[&answer],
        )
        .await?;
        mark_reauthorization_needed(&tx, &detail).await?;
        tx.commit().await?;
        tracing::error!(reason = %detail, "refused the token refresh answer and kept it aside; deliveries pause");
        Err(TokenError::NeedsAuthorization(format!("{detail}; otherwise {REAUTHORIZE_HINT}")))
    }
}

/// The token endpoint's answer to a refresh, read up to the cap.
struct Answer {
    status: reqwest::StatusCode,
    /// The body; empty when it could not be read.
    text: String,
    /// Why the body could not be read, if it could not.
    unread: Option<String>,
}

/// A refresh request that ended without an answer worth classifying.
struct NoAnswer {
    error: TokenError,
    /// Whether it counts as a failed refresh in the metrics (Keap answered, if unusably).
    counted: bool,
}

/// Whether an error answer of the token endpoint refuses the grant for good: a 401 or 403, or a
/// 400 that names the grant, the client or the refresh token.
fn grant_lost(status: reqwest::StatusCode, code: &str, describe: &str) -> bool {
    match status.as_u16() {
        401 | 403 => true,
        400 => {
            code == "invalid_grant"
                || code == "invalid_client"
                || code == "unauthorized_client"
                || describe.to_ascii_lowercase().contains("refresh token")
        }
        _ => false,
    }
}

/// How a kept answer can be used, for the message that says it was kept.
#[derive(Debug, Clone, Copy)]
enum HeldUse {
    /// A valid grant for another Keap app: `auth import --switch-account`.
    Switch,
    /// An answer that failed a check: worth keeping for its refresh token.
    Salvage,
}

/// True when a 200 answer of the token endpoint carries a refresh token: Keap rotated the
/// pair, so the one sent is spent and this one must not be thrown away.
fn rotated(answer: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v.get("refresh_token").and_then(|t| t.as_str()).map(|t| !t.trim().is_empty()))
        .unwrap_or(false)
}

pub(super) trait ClassifyName {
    /// What kind of parse failure this is, in a few words that quote nothing of the text (it may
    /// hold a token).
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or mistyped fields",
            serde_json::error::Category::Eof => "cut off",
        }
    }
}

/// Why a refresh answer must not be stored: it names another app than the stored grant's.
/// Contact ids are per app, so adopting it would point the contact map at unrelated contacts;
/// the grant is treated as refused instead (ARCHITECTURE.md, invariant 7). An answer that
/// names no app, or a stored grant whose app is unknown, is no evidence of a switch.
pub(super) fn refreshed_for_other_app(stored: Option<&str>, answer: &TokenResponse) -> Option<String> {
    let stored = stored?;
    let answered = answer.scope.as_deref().and_then(account_from_scope)?;
    (answered != stored).then(|| {
        format!(
            "Keap answered the token refresh for Keap app {answered}, but the grant is for {stored}, whose contacts \
             the contact map links; the answer was not stored (to move the sync to {answered}, use \
             `keap-sync auth login --switch-account`)"
        )
    })
}
