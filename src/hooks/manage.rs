//! Keap's side of the hooks: the subscriptions (`GET/POST /v1/hooks`, `/verify`, `DELETE`),
//! as `keap-sync hooks install|status|verify|uninstall` and the daemon's watchdog use them.
//!
//! Which hooks are ours: those whose URL's path ends in `/<secret path>` (the receiver's
//! unguessable segment, `[hooks]`), whatever host reaches it; any other hook of the Keap app
//! (another integration's) is counted, never touched. `install` subscribes [`EVENT_KEYS`] at
//! `<base URL>/<secret path>`, each once: a hook with the same event key and URL is kept; with
//! `[inbound] tags` also [`TAG_EVENT_KEYS`] (a tag applied to or removed from a contact; Keap
//! sends these 5–10 minutes late, and their delivery's shape is unverified: the receiver
//! queues the ids of a delivery about contacts only, so the sweep stays the backstop).
//!
//! The secret path is never printed: every URL shown goes through [`mask`], and every error
//! through [`scrub`] (Keap's own error text may quote the URL it refused).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::db::DbError;
use crate::keap::model::RestHook;
use crate::keap::{Auth, KeapClient, KeapError};
use crate::secret::Secret;

/// The event keys keap-sync subscribes to: a contact added, edited, deleted.
pub(crate) const EVENT_KEYS: [&str; 3] = ["contact.add", "contact.edit", "contact.delete"];

/// The event keys subscribed besides, with `[inbound] tags`: a tag applied, a tag removed.
pub(crate) const TAG_EVENT_KEYS: [&str; 2] = ["contactGroup.applied", "contactGroup.removed"];

/// What a masked URL shows instead of the secret path.
const MASK: &str = "<secret path>";

/// The state Keap gives a hook that receives deliveries.
pub(crate) const VERIFIED: &str = "Verified";

/// How long the receiver probe may take (it answers a handshake at once).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keap's hook API with a credential, each call given twice the request timeout.
pub(crate) struct HookApi<'a> {
    pub(crate) keap: &'a KeapClient,
    pub(crate) auth: &'a Auth,
    pub(crate) timeout: Duration,
    /// The receiver's secret path: what makes a hook ours.
    pub(crate) path: &'a Secret,
    /// `[inbound] tags` is configured: [`TAG_EVENT_KEYS`] are subscribed too.
    pub(crate) tags: bool,
}

/// One of our hooks, as shown: its URL masked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct HookView {
    pub(crate) key: String,
    pub(crate) event_key: String,
    pub(crate) status: String,
    pub(crate) url: String,
}

/// Our hooks, and how many hooks of the Keap app are someone else's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Survey {
    pub(crate) ours: Vec<HookView>,
    pub(crate) others: usize,
}

impl Survey {
    /// Every hook of ours is Verified (and there is at least one).
    pub(crate) fn healthy(&self) -> bool {
        !self.ours.is_empty() && self.ours.iter().all(|h| h.status == VERIFIED)
    }
}

/// Why a hook command stopped; `Display` never holds the secret path.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    #[error("{0}")]
    Keap(String),
    #[error("{0}")]
    Refused(String),
}

impl HookApi<'_> {
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout * 2
    }

    fn keap_error(&self, e: &KeapError) -> HookError {
        HookError::Keap(scrub(&e.to_string(), self.path))
    }

    /// Every hook of the app, split into ours and the others' count.
    pub(crate) async fn survey(&self) -> Result<(Vec<RestHook>, usize), HookError> {
        let all = self.keap.list_hooks(self.auth, self.deadline()).await.map_err(|e| self.keap_error(&e))?;
        let (ours, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|h| is_ours(&h.hook_url, self.path));
        Ok((ours, others.len()))
    }

    /// Our hooks as they are now, masked.
    pub(crate) async fn status(&self) -> Result<Survey, HookError> {
        let (ours, others) = self.survey().await?;
        Ok(Survey { ours: ours.iter().map(|h| self.view(h)).collect(), others })
    }

    fn view(&self, h: &RestHook) -> HookView {
        HookView {
            key: h.key.clone(),
            event_key: h.event_key.clone(),
            status: h.status.clone(),
            url: mask(&h.hook_url, self.path),
        }
    }

    /// The event keys to subscribe: [`EVENT_KEYS`], and [`TAG_EVENT_KEYS`] with `tags`.
    pub(crate) fn event_keys(&self) -> Vec<&'static str> {
        let tags = if self.tags { &TAG_EVENT_KEYS[..] } else { &[] };
        EVENT_KEYS.iter().chain(tags).copied().collect()
    }

    /// Checks that Keap offers every key of [`HookApi::event_keys`].
    pub(crate) async fn check_event_keys(&self) -> Result<(), HookError> {
        let offered =
            self.keap.hook_event_keys(self.auth, self.deadline()).await.map_err(|e| self.keap_error(&e))?;
        let missing: Vec<&str> =
            self.event_keys().into_iter().filter(|k| !offered.iter().any(|o| o == k)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(HookError::Refused(format!(
            "Keap does not offer the hook event key(s) {} (GET /v1/hooks/event_keys); nothing was subscribed",
            missing.join(", ")
        )))
    }

    /// Subscribes `url` to each of [`HookApi::event_keys`] that has no hook with that URL yet, then
    /// verifies every one of ours with that URL that is not Verified. Returns the survey after.
    pub(crate) async fn install(&self, url: &str) -> Result<Survey, HookError> {
        let (ours, _) = self.survey().await?;
        for key in self.event_keys() {
            let existing = ours.iter().find(|h| h.event_key == key && h.hook_url == url);
            let hook = match existing {
                Some(h) => h.clone(),
                None => self
                    .keap
                    .create_hook(self.auth, key, url, self.deadline())
                    .await
                    .map_err(|e| self.keap_error(&e))?,
            };
            if hook.status != VERIFIED {
                self.verify_one(&hook).await?;
            }
        }
        self.status().await
    }

    /// Runs the handshake of `hook` again; Keap's answer says its state after.
    pub(crate) async fn verify_one(&self, hook: &RestHook) -> Result<RestHook, HookError> {
        self.keap.verify_hook(self.auth, &hook.key, self.deadline()).await.map_err(|e| self.keap_error(&e))
    }

    /// Verifies each of ours (`all`), or only those that are not Verified.
    pub(crate) async fn verify(&self, all: bool) -> Result<Survey, HookError> {
        let (ours, _) = self.survey().await?;
        for hook in ours.iter().filter(|h| all || h.status != VERIFIED) {
            self.verify_one(hook).await?;
        }
        self.status().await
    }

    /// Deletes every hook of ours; returns how many.
    pub(crate) async fn uninstall(&self) -> Result<usize, HookError> {
        let (ours, _) = self.survey().await?;
        for hook in &ours {
            self.keap
                .delete_hook(self.auth, &hook.key, self.deadline())
                .await
                .map_err(|e| self.keap_error(&e))?;
        }
        Ok(ours.len())
    }
}

/// Replaces `keap_sync.hook_state` with `survey`'s hooks, in one statement (for `status`).
pub(crate) async fn record(db: &tokio_postgres::Client, survey: &Survey) -> Result<(), DbError> {
    let rows = serde_json::to_value(&survey.ours).unwrap_or_default();
    db.execute(
        "with x as (select * from jsonb_to_recordset($1::jsonb)
                           as x(key text, event_key text, status text, url text)),
              gone as (delete from keap_sync.hook_state where key not in (select key from x))
         insert into keap_sync.hook_state (key, event_key, status, url)
         select key, event_key, status, url from x
         on conflict (key) do update
            set event_key = excluded.event_key, status = excluded.status, url = excluded.url,
                checked_at = now()",
        &[&rows],
    )
    .await?;
    Ok(())
}

/// Our hooks as last recorded, with the seconds since: what `status` shows.
pub(crate) async fn recorded(db: &tokio_postgres::Client) -> Result<Vec<(HookView, f64)>, DbError> {
    let rows = db
        .query(
            "select key, event_key, status, url, extract(epoch from now() - checked_at)::float8
               from keap_sync.hook_state order by event_key, key",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (HookView { key: r.get(0), event_key: r.get(1), status: r.get(2), url: r.get(3) }, r.get(4)))
        .collect())
}

/// Whether `url` reaches our receiver: its path ends in `/<secret path>`.
pub(crate) fn is_ours(url: &str, path: &Secret) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else { return false };
    parsed.path().strip_suffix(path.expose()).is_some_and(|head| head.ends_with('/'))
}

/// `url` with the secret path replaced by [`MASK`].
pub(crate) fn mask(url: &str, path: &Secret) -> String {
    scrub(url, path)
}

/// `text` with every occurrence of the secret path replaced by [`MASK`].
pub(crate) fn scrub(text: &str, path: &Secret) -> String {
    if path.expose().is_empty() {
        return text.to_owned();
    }
    text.replace(path.expose(), MASK)
}

/// The URL Keap is to call: `base` (where the reverse proxy reaches the receiver) and the
/// secret path. `https://` (Keap calls nothing else), or `http://` to a loopback host (tests,
/// a local try-out).
pub(crate) fn hook_url(base: &str, path: &Secret) -> Result<String, HookError> {
    let bad = |why: &str| HookError::Refused(format!("--base-url {base:?}: {why}"));
    let url = reqwest::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
    let loopback = match url.host_str() {
        Some("localhost") => true,
        Some(host) => host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(bad("Keap calls only https:// URLs (http:// only to a loopback host)"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("a base URL has no query, fragment or user"));
    }
    Ok(format!("{}/{}", url.as_str().trim_end_matches('/'), path.expose()))
}

/// Asks our own receiver at `listen` for a handshake, as Keap would: a POST to the secret path
/// with `X-Hook-Secret`, to be answered 200 with the same header. An unspecified address
/// (`0.0.0.0`) is reached on loopback.
pub(crate) async fn probe(listen: SocketAddr, path: &Secret) -> Result<(), HookError> {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let refused = |why: String| {
        HookError::Refused(format!(
            "the hook receiver at {listen} ([hooks] listen) does not answer a handshake ({why}); \
             start the daemon (`keap-sync run`) with this configuration first; nothing was subscribed"
        ))
    };
    let secret = format!("probe-{:032x}", rand::random::<u128>());
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST /{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\nX-Hook-Secret: {secret}\r\n\r\n",
            path.expose()
        );
        stream.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(refused(e.to_string())),
        Err(_) => return Err(refused(format!("no answer within {} s", PROBE_TIMEOUT.as_secs()))),
    };
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    let status = head.split(' ').nth(1).unwrap_or_default();
    let echoed = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(name, value)| name.trim().eq_ignore_ascii_case("x-hook-secret") && value.trim() == secret);
    match (status, echoed) {
        ("200", true) => Ok(()),
        ("200", false) => Err(refused("it answered 200 without echoing X-Hook-Secret".into())),
        (other, _) => Err(refused(format!("it answered {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_are_the_hooks_at_the_secret_path_and_urls_are_masked() {
        let path = Secret::new("abcdefghijklmnopqrstuvwxyz");
        assert!(is_ours("https://hooks.example.com/abcdefghijklmnopqrstuvwxyz", &path));
        assert!(is_ours("https://other.example.com/keap/abcdefghijklmnopqrstuvwxyz", &path));
        assert!(!is_ours("https://hooks.example.com/xabcdefghijklmnopqrstuvwxyz", &path));
        assert!(!is_ours("https://hooks.example.com/abcdefghijklmnopqrstuvwxyz/x", &path));
        assert!(!is_ours("https://hooks.example.com/elsewhere", &path));
        assert_eq!(
            mask("https://h.example.com/abcdefghijklmnopqrstuvwxyz", &path),
            "https://h.example.com/<secret path>"
        );
    }

    #[test]
    fn the_hook_url_is_https_or_loopback_http() {
        let path = Secret::new("abcdefghijklmnopqrstuvwxyz");
        let url = |base: &str| hook_url(base, &path).map_err(|e| e.to_string());
        assert_eq!(
            url("https://h.example.com/keap/").unwrap(),
            "https://h.example.com/keap/abcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(url("http://127.0.0.1:9188").unwrap(), "http://127.0.0.1:9188/abcdefghijklmnopqrstuvwxyz");
        assert!(url("http://h.example.com").unwrap_err().contains("https"));
        assert!(url("https://h.example.com/?a=1").is_err());
        assert!(url("not a url").is_err());
    }
}
