//! `[delivery]`: concurrency, timing, retries, what a deleted user does in Keap, stopping.

use std::time::Duration;

use serde::Deserialize;

use super::keap::KeapConfig;
use super::values::{millis, secs};
use super::{contact, ConfigError, TagRef};

/// What happens in Keap when a user row is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDelete {
    /// Leave the contact in Keap (marketing history, consent records) — the default. The
    /// mapping stays, so a user restored under the same key updates the same contact.
    Keep,
    /// `DELETE /v1/contacts/{id}`, and forget the mapping.
    DeleteContact,
    /// Keep the contact but apply `tag` (e.g. "Account deleted"); with `opt_out`, also opt its
    /// email out of marketing (`PUT /v1/emailAddresses/{email}`, this reason). The mapping is
    /// forgotten: a user restored later is linked again by email.
    Tag {
        /// The tag to apply.
        tag: TagRef,
        /// The opt-out reason, when the email is to be opted out.
        opt_out: Option<String>,
    },
}

/// `on_delete` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum FileOnDelete {
    Keep,
    DeleteContact,
    Tag,
}

/// How changes are delivered: concurrency, timing, retries, deletes, stopping.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Keap calls in flight at once (never two for the same user).
    pub concurrency: usize,
    /// How often the outbox is scanned even without a notification.
    pub poll_interval: Duration,
    /// How long a claim is valid; a crashed daemon's claims are retried after this.
    pub lease: Duration,
    /// A change waits this long for further changes to the same user, so a burst costs one call.
    pub settle: Duration,
    /// The first retry's delay; each further one doubles it (with jitter).
    pub retry_base: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
    /// What a deleted user does to its Keap contact.
    pub on_delete: OnDelete,
    /// How long a graceful stop waits for calls in flight.
    pub shutdown_grace: Duration,
    /// How often the daemon checks that capture still works (the trigger installed and enabled,
    /// the key and synced columns present).
    pub capture_check: Duration,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileDelivery {
    pub(super) concurrency: usize,
    pub(super) poll_interval_ms: u64,
    pub(super) lease_secs: u64,
    pub(super) settle_ms: u64,
    pub(super) retry_base_ms: u64,
    pub(super) retry_max_secs: u64,
    pub(super) on_delete: FileOnDelete,
    /// With `on_delete = "tag"`: the tag (name or id).
    pub(super) on_delete_tag: contact::FileTagRefOrDefault,
    /// With `on_delete = "tag"`: also opt the email out of marketing.
    pub(super) on_delete_opt_out: bool,
    pub(super) on_delete_opt_out_reason: String,
    pub(super) shutdown_grace_secs: u64,
    pub(super) capture_check_secs: u64,
}

impl Default for FileDelivery {
    fn default() -> Self {
        FileDelivery {
            concurrency: 4,
            poll_interval_ms: 5_000,
            lease_secs: 120,
            settle_ms: 100,
            retry_base_ms: 1_000,
            retry_max_secs: 3_600,
            on_delete: FileOnDelete::Keep,
            on_delete_tag: contact::FileTagRefOrDefault::default(),
            on_delete_opt_out: false,
            on_delete_opt_out_reason: "Account deleted in the application".into(),
            shutdown_grace_secs: 20,
            capture_check_secs: 30,
        }
    }
}

impl FileDelivery {
    /// `[delivery]` checked: concurrency from 1 to 64, and a lease longer than two worst-case Keap calls.
    pub(super) fn validate(self, keap: &KeapConfig) -> Result<DeliveryConfig, ConfigError> {
        if !(1..=64).contains(&self.concurrency) {
            return Err(ConfigError::Invalid(format!(
                "delivery.concurrency = {} is out of range: use 1 to 64",
                self.concurrency
            )));
        }
        // A claim must outlive a call started under it (calls that could not finish in time are
        // not started), with room for a retry after a 401; else a slow call could be sent twice.
        let lease = secs("delivery.lease_secs", self.lease_secs)?;
        let worst_call = keap.connect_timeout.saturating_add(keap.request_timeout).saturating_mul(2);
        if lease <= worst_call {
            return Err(ConfigError::Invalid(format!(
                "delivery.lease_secs = {} is too short: it must exceed 2 x (keap.request_timeout_secs + \
                 keap.connect_timeout_secs) = {} s so a claim never expires while its call is in flight",
                lease.as_secs(),
                worst_call.as_secs()
            )));
        }
        Ok(DeliveryConfig {
            concurrency: self.concurrency,
            poll_interval: millis("delivery.poll_interval_ms", self.poll_interval_ms)?,
            lease,
            settle: Duration::from_millis(self.settle_ms),
            retry_base: millis("delivery.retry_base_ms", self.retry_base_ms)?,
            retry_max: secs("delivery.retry_max_secs", self.retry_max_secs)?,
            on_delete: self.on_delete()?,
            shutdown_grace: secs("delivery.shutdown_grace_secs", self.shutdown_grace_secs)?,
            capture_check: secs("delivery.capture_check_secs", self.capture_check_secs)?,
        })
    }
}

impl FileDelivery {
    /// What a deleted user's contact gets; an opt-out is allowed only with `on_delete = "tag"`, and needs
    /// a reason because Keap asks for one.
    fn on_delete(&self) -> Result<OnDelete, ConfigError> {
        let opt_out = self.on_delete_opt_out.then(|| self.on_delete_opt_out_reason.clone());
        match self.on_delete {
            FileOnDelete::Tag => {
                if opt_out.as_ref().is_some_and(|r| r.trim().is_empty()) {
                    return Err(ConfigError::Invalid(
                        "delivery.on_delete_opt_out_reason is empty: Keap needs a reason for an opt-out".into(),
                    ));
                }
                Ok(OnDelete::Tag { tag: self.on_delete_tag.validate("delivery.on_delete_tag")?, opt_out })
            }
            _ if opt_out.is_some() => Err(ConfigError::Invalid(
                "delivery.on_delete_opt_out needs on_delete = \"tag\" (a deleted contact has no email to opt out; \
                 a kept one is left alone)"
                    .into(),
            )),
            FileOnDelete::Keep => Ok(OnDelete::Keep),
            FileOnDelete::DeleteContact => Ok(OnDelete::DeleteContact),
        }
    }
}
