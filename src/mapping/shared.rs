//! Properties both sides may change (`owner = "shared"`, design invariant 17): which side
//! changed since they last agreed, and, when both did, which wins.
//!
//! The base is what keap-sync last knew both sides to hold: the hash in `contact_map.sent`
//! ([`Held`]), written when Keap accepted our value or when Keap's value was written into the
//! column. Against it, with the contact as Keap holds it now (a read: the mirror may be stale,
//! invariant 20) and the row as it is now:
//!
//! | the row | Keap | outcome |
//! | --- | --- | --- |
//! | as the base | as the base | nothing |
//! | changed | as the base | the row's value is sent |
//! | as the base | changed | Keap's value is written into the column, nothing sent |
//! | changed | changed, to the same value | nothing |
//! | changed | changed, differently | a conflict: `prefer` wins, and it is recorded |
//!
//! Clocks are never compared: "changed" means "differs from the base", so a late read or a
//! clock skew cannot reorder anything. A value Keap cleared is not taken (a column is never
//! blanked from Keap's side, invariant 21) and the row's value is not sent over it either:
//! the two stay apart until the row changes. With no base (a contact linked by this delivery),
//! the row's value is sent, as for a property the application owns.

use std::collections::BTreeMap;

use serde_json::Value;

use super::held::{hash, value_at, Changes, Held};
use super::{value_text, ContactPayload, Path};
use crate::config::Prefer;

/// A shared property's place in a payload: the side that wins, and the row's text as read (what
/// delivery expects the column still to hold when it writes Keap's value into it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedValue {
    pub(crate) prefer: Prefer,
    pub(crate) column: String,
    pub(crate) row: Option<String>,
}

/// Both sides changed a shared property differently since they last agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub(crate) path: Path,
    pub(crate) column: String,
    pub(crate) winner: Prefer,
    pub(crate) app: Option<String>,
    pub(crate) keap: Option<String>,
}

/// What a delivery does with the shared properties beyond its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Keap's values to write into their columns.
    pub(crate) taken: Vec<Taken>,
    pub(crate) conflicts: Vec<Conflict>,
}

/// One of Keap's values to write into its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) path: Path,
    pub(crate) column: String,
    /// The column's text as the delivery read it: written over only if it still holds it.
    pub(crate) expected: Option<String>,
    pub(crate) value: Value,
}

impl Settled {
    /// Whether there is anything to write to the users table or the conflict record.
    pub(crate) fn any(&self) -> bool {
        !self.taken.is_empty() || !self.conflicts.is_empty()
    }
}

impl ContactPayload {
    /// Whether `changes` sends a shared property: then Keap's value must be read first.
    pub(crate) fn shared_changed(&self, changes: &Changes) -> bool {
        changes.0.iter().any(|p| self.shared.contains_key(p))
    }

    /// Whether the mapping has shared properties.
    pub(crate) fn has_shared(&self) -> bool {
        !self.shared.is_empty()
    }

    /// Whether `contact` (the mirror's copy) shows a shared property changed in Keap since the
    /// base: then delivery reads the contact, even with nothing of the row's to send.
    pub(crate) fn keap_moved(&self, base: &Held, contact: &Value) -> bool {
        self.shared.keys().any(|p| moved(base, contact, p).is_some())
    }

    /// Settles the shared properties against `contact` as Keap holds it now (the table above),
    /// taking out of `changes` (computed against Keap's values) what must not be sent.
    pub(crate) fn settle_shared(&self, base: &Held, contact: &Value, changes: &mut Changes) -> Settled {
        let mut settled = Settled::default();
        for (path, shared) in &self.shared {
            let Some(keap) = moved(base, contact, path) else { continue };
            changes.0.remove(path);
            let Some(text) = value_text(&keap) else { continue };
            let ours = self.values.get(path);
            let app_moved = ours.is_some_and(|v| Some(&hash(path, v)) != base.hashes.get(&path.key()));
            let same = ours.is_some_and(|v| hash(path, v) == hash(path, &keap));
            if app_moved && !same {
                settled.conflicts.push(Conflict {
                    path: path.clone(),
                    column: shared.column.clone(),
                    winner: shared.prefer,
                    app: ours.and_then(value_text),
                    keap: Some(text),
                });
                if shared.prefer == Prefer::App {
                    changes.0.insert(path.clone());
                    continue;
                }
            }
            if !same {
                settled.taken.push(Taken {
                    path: path.clone(),
                    column: shared.column.clone(),
                    expected: shared.row.clone(),
                    value: keap,
                });
            }
        }
        settled
    }

    /// This payload with Keap's values taken into it: what both sides hold once they are
    /// written into their columns, for `contact_map.sent`.
    pub(crate) fn with_taken(&self, settled: &Settled) -> ContactPayload {
        let mut payload = self.clone();
        for t in &settled.taken {
            payload.values.insert(t.path.clone(), t.value.clone());
        }
        payload
    }
}

/// Whether `contact` (the mirror's copy) shows any of the shared properties at `paths` (custom
/// fields placed through Keap's model, `super::path`) changed in Keap since the base `sent` (a
/// `contact_map.sent` record): the inbound pass then has delivery read the contact and settle
/// them. An email address compares without case, as everywhere ([`hash`]).
pub(crate) fn moved_in_keap(paths: &[Path], sent: &Value, contact: &Value) -> bool {
    let base = Held::from_sent(sent);
    paths.iter().any(|p| moved(&base, contact, p).is_some())
}

/// Keap's value at `path` when it differs from the base; `None` when it does not, or when
/// there is no base (nothing known to have agreed).
fn moved(base: &Held, contact: &Value, path: &Path) -> Option<Value> {
    let was = base.hashes.get(&path.key())?;
    let keap = value_at(contact, path);
    (hash(path, &keap) != *was).then_some(keap)
}

/// The shared properties of a mapping, by path.
pub(crate) type SharedPaths = BTreeMap<Path, SharedValue>;
