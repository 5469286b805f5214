//! The drift of one user, decided from its row, its mapping and the mirror: pure, so every
//! class is a unit test. The comparison is the planner's own ([`ContactPayload::changes`]
//! against what Keap holds), so "differs" means "a delivery would send this".

use std::collections::BTreeSet;

use serde_json::Value;

use crate::mapping::ContactPayload;

/// How a user stands against Keap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Keap holds what the table says (of what keap-sync owns).
    InSync,
    /// Keap's contact differs in an owned property, or lacks a tag keap-sync applied.
    Differs,
    /// The mapped contact is no longer in Keap (deleted, or merged into another).
    ContactGone,
    /// No contact yet, and none in Keap has the user's address as EMAIL1.
    NoContact,
    /// No contact linked yet, but one in Keap has the user's address: the next delivery links it.
    Unlinked,
    /// The change is parked (a rule the row breaks, or Keap's refusal): `keap-sync failures`.
    Parked,
    /// Two or more contacts in Keap have the user's address as EMAIL1: a person merges them.
    Duplicates,
}

impl Class {
    /// Every class, in the order the report counts them.
    pub const ALL: [Class; 7] = [
        Class::InSync,
        Class::Differs,
        Class::ContactGone,
        Class::NoContact,
        Class::Unlinked,
        Class::Parked,
        Class::Duplicates,
    ];

    /// Its name in JSON, `status` and `/metrics` (`contact_gone`).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::InSync => "in_sync",
            Class::Differs => "differs",
            Class::ContactGone => "contact_gone",
            Class::NoContact => "no_contact",
            Class::Unlinked => "unlinked",
            Class::Parked => "parked",
            Class::Duplicates => "duplicates",
        }
    }

    /// Whether `reconcile --apply` repairs it (by delivering the user again).
    pub fn repairable(self) -> bool {
        matches!(self, Class::Differs | Class::ContactGone | Class::NoContact | Class::Unlinked)
    }
}

/// What keap-sync knows of one user, for [`classify`].
pub(crate) struct Facts<'a> {
    /// The owned values of the row now; `None` if the row breaks a rule (it is then parked).
    pub(crate) payload: Option<&'a ContactPayload>,
    /// The mapped contact id and the tags keap-sync applied to it.
    pub(crate) mapped: Option<(i64, BTreeSet<i64>)>,
    /// The mapped contact as the mirror holds it (`None`: not in Keap).
    pub(crate) contact: Option<(&'a Value, &'a [i64])>,
    /// Contacts whose EMAIL1 is the user's address, by id.
    pub(crate) by_email: &'a [i64],
    pub(crate) parked: bool,
}

/// The class, and what differs (owned paths, `tag <id>` for a tag removed in Keap).
pub(crate) fn classify(f: &Facts<'_>) -> (Class, Vec<String>) {
    if f.parked {
        return (Class::Parked, Vec::new());
    }
    let Some(payload) = f.payload else { return (Class::Parked, Vec::new()) };
    let Some((_, ours)) = &f.mapped else {
        return match f.by_email.len() {
            0 => (Class::NoContact, Vec::new()),
            1 => (Class::Unlinked, Vec::new()),
            _ => (Class::Duplicates, f.by_email.iter().map(|id| format!("contact {id}")).collect()),
        };
    };
    let Some((json, tags)) = f.contact else { return (Class::ContactGone, Vec::new()) };
    let mut differs = payload.drift(json).paths();
    differs.extend(ours.iter().filter(|t| !tags.contains(t)).map(|t| format!("tag {t}")));
    if f.by_email.len() > 1 {
        return (Class::Duplicates, f.by_email.iter().map(|id| format!("contact {id}")).collect());
    }
    if differs.is_empty() {
        (Class::InSync, differs)
    } else {
        (Class::Differs, differs)
    }
}

#[cfg(test)]
mod tests {
    use super::Class;

    #[test]
    fn a_class_is_named_as_serde_names_it() {
        for class in Class::ALL {
            assert_eq!(serde_json::to_value(class).unwrap(), class.as_str());
        }
    }
}
