//! Email consent (invariant 17). Sending `opt_in_reason` makes EMAIL1 marketable in Keap, and
//! Keap's v1 spec says it lifts a hand opt-out ("Opt-Out: Manual") too. So consent is not an
//! owned value like the others:
//!
//! - it is sent only when the user's consent *becomes* given (the row's `opt_in_reason` has a
//!   value and the last delivery's record says it had none), never because a read of the
//!   contact lacks it: Keap's reads may not answer it at all (unverified; the fake plays that);
//! - a withdrawal sends nothing: keap-sync does not opt a person in or out for it;
//! - it is not sent over an opt-out Keap holds for the address (a read's `email_status`, or the
//!   mirror's v2 `email_opt_status`), unless the mapping says `over_opt_out = true`. The user's
//!   record then says consent was handled, so it is not tried again on the next change.

use serde_json::Value;

use super::Path;

/// The consent property.
pub(crate) const CONSENT: Path = Path::Scalar("opt_in_reason");

/// Keap's email statuses that are an opt-out (v1 `email_status`; v2 `email_opt_status` spells
/// them in upper snake case), compared without case or underscores. The others (unengaged,
/// non-marketable, single or double opt-in, confirmed) are no person's refusal.
const OPT_OUTS: [&str; 11] = [
    "lockdown",
    "bounce",
    "hardbounce",
    "manual",
    "admin",
    "system",
    "listunsubscribe",
    "feedback",
    "spam",
    "invalid",
    "deactivated",
];

/// The opt-out status `contact` (as Keap answered it, or as the mirror keeps it) shows for its
/// EMAIL1, if any; `None` when it shows none or does not say.
pub(crate) fn opt_out(contact: &Value) -> Option<String> {
    let status = email1_status(contact)?;
    is_opt_out(status).then(|| status.to_owned())
}

/// Whether `contact` shows its EMAIL1 opted out (`[inbound] email_opt_out`): `Some(true)` for
/// an opt-out status, `Some(false)` for any other status, `None` when it says none (no EMAIL1,
/// or a read that did not ask for it), which must change nothing.
pub(crate) fn email1_opted_out(contact: &Value) -> Option<bool> {
    email1_status(contact).map(is_opt_out)
}

/// The status of EMAIL1: v1's account-level `email_status`, or v2's `email_opt_status` of the
/// EMAIL1 item.
pub(crate) fn email1_status(contact: &Value) -> Option<&str> {
    let v1 = contact.get("email_status").and_then(Value::as_str);
    let v2 = || {
        let items = contact.get("email_addresses")?.as_array()?;
        let email1 = items.iter().find(|e| e.get("field").and_then(Value::as_str) == Some("EMAIL1"))?;
        email1.get("email_opt_status")?.as_str()
    };
    v1.or_else(v2)
}

/// Whether `status` is one of [`OPT_OUTS`], in either version's spelling.
fn is_opt_out(status: &str) -> bool {
    let plain: String = status.chars().filter(|c| *c != '_').collect::<String>().to_ascii_lowercase();
    OPT_OUTS.contains(&plain.as_str())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{email1_opted_out, opt_out};

    #[test]
    fn an_opt_out_is_read_from_either_version_and_nothing_else_is_one() {
        assert_eq!(opt_out(&json!({"email_status": "Manual"})).as_deref(), Some("Manual"));
        assert_eq!(opt_out(&json!({"email_status": "ListUnsubscribe"})).as_deref(), Some("ListUnsubscribe"));
        let v2 = json!({"email_addresses": [
            {"field": "EMAIL2", "email_opt_status": "UNENGAGED_MARKETABLE"},
            {"field": "EMAIL1", "email_opt_status": "HARD_BOUNCE"}]});
        assert_eq!(opt_out(&v2).as_deref(), Some("HARD_BOUNCE"));
        for marketable in ["UnengagedMarketable", "NonMarketable", "UnengagedNonMarketable", "DoubleOptin"] {
            assert_eq!(opt_out(&json!({"email_status": marketable})), None, "{marketable}");
        }
        assert_eq!(opt_out(&json!({"given_name": "Ada"})), None, "not said");
    }

    #[test]
    fn email1_opted_out_says_nothing_when_keap_said_nothing() {
        let v2 = |status: &str| json!({"email_addresses": [{"field": "EMAIL1", "email_opt_status": status}]});
        assert_eq!(email1_opted_out(&v2("MANUAL")), Some(true));
        assert_eq!(email1_opted_out(&v2("LIST_UNSUBSCRIBE")), Some(true));
        assert_eq!(email1_opted_out(&v2("SINGLE_OPT_IN")), Some(false));
        assert_eq!(email1_opted_out(&v2("UNENGAGED_NON_MARKETABLE")), Some(false));
        assert_eq!(
            email1_opted_out(
                &json!({"email_addresses": [{"field": "EMAIL2", "email_opt_status": "MANUAL"}]})
            ),
            None
        );
        assert_eq!(email1_opted_out(&json!({"email_addresses": [{"field": "EMAIL1"}]})), None);
    }
}
