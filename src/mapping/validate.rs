//! Keap's documented rules for contact values, checked before anything is sent, so a row Keap
//! would reject is parked with a message that names the user key, the column and the rule,
//! and never the value itself (it is personal data, and messages end up in logs and tickets).
//!
//! The rules are those of `docs/keap-api.md` ("Validation rules and limits"): field lengths of
//! the v2 specification, the email shape, ISO 3166-1 alpha-3 country codes, `YYYY-MM-DD`
//! dates, Keap's `source_type` values. Where Keap's rule is unknown (which time zones it takes),
//! nothing is checked here and Keap's own 400 parks the change.

use serde_json::Value;

use crate::config::{AddressPart, PhonePart, ScalarKind};

/// Keap's `source_type` values (v1).
const SOURCE_TYPES: &[&str] = &[
    "APPOINTMENT",
    "FORMAPIHOSTED",
    "FORMAPIINTERNAL",
    "WEBFORM",
    "INTERNALFORM",
    "LANDINGPAGE",
    "IMPORT",
    "MANUAL",
    "API",
    "OTHER",
    "UNKNOWN",
];

/// The longest text custom field Keap stores.
const MAX_CUSTOM_TEXT: usize = 65_535;
/// The longest tag name sent (Keap documents none; its UI stops well before this).
pub(super) const MAX_TAG_NAME: usize = 100;

/// Why a value cannot be sent: the rule it breaks, phrased without the value.
pub(super) type Rule = String;

/// Whether a text value Keap takes: no control characters and at most `max` characters.
fn text(v: &str, max: usize) -> Result<Value, Rule> {
    if v.chars().any(char::is_control) {
        return Err("holds control characters (tabs, line breaks or others), which Keap refuses".into());
    }
    let n = v.chars().count();
    if n > max {
        return Err(format!("is {n} characters long; Keap takes at most {max}"));
    }
    Ok(Value::String(v.to_owned()))
}

/// A date as Keap takes it, `YYYY-MM-DD`. A date column reads so; a timestamp's date part is
/// used.
fn date(v: &str) -> Result<Value, Rule> {
    let d = v.get(..10).unwrap_or(v);
    let rest = v.get(10..).unwrap_or("");
    let parts: Vec<&str> = d.split('-').collect();
    let ok = parts.len() == 3
        && parts[0].len() == 4
        && parts[1].len() == 2
        && parts[2].len() == 2
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        && (rest.is_empty() || rest.starts_with([' ', 'T']));
    let valid = ok && {
        let (y, m, day): (u32, u32, u32) =
            (parts[0].parse().unwrap_or(0), parts[1].parse().unwrap_or(0), parts[2].parse().unwrap_or(0));
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        y >= 1 && (1..=12).contains(&m) && day >= 1 && day <= days[(m - 1) as usize]
    };
    if valid {
        Ok(Value::String(d.to_owned()))
    } else {
        Err("is not a date: Keap takes YYYY-MM-DD (map a date column, or format it with to_char)".into())
    }
}

/// Whether a Keap id: a positive whole number, sent as a JSON number.
fn id(v: &str) -> Result<Value, Rule> {
    match v.trim().parse::<i64>() {
        Ok(n) if n > 0 => Ok(Value::from(n)),
        _ => Err("is not a Keap id (a positive whole number)".into()),
    }
}

/// A scalar property's value as sent.
pub(super) fn scalar(kind: ScalarKind, v: &str) -> Result<Value, Rule> {
    match kind {
        ScalarKind::Text(max) => text(v, max),
        ScalarKind::Date => date(v),
        ScalarKind::Id => id(v),
        ScalarKind::SourceType => {
            let up = v.trim().to_ascii_uppercase();
            if SOURCE_TYPES.contains(&up.as_str()) {
                Ok(Value::String(up))
            } else {
                Err(format!("is not a Keap source_type: use one of {}", SOURCE_TYPES.join(", ")))
            }
        }
        ScalarKind::Locale => {
            let b = v.as_bytes();
            let ok = (b.len() == 2 || (b.len() == 5 && b[2] == b'_'))
                && b[..2].iter().all(u8::is_ascii_lowercase)
                && b.get(3..).is_none_or(|r| r.iter().all(u8::is_ascii_uppercase));
            if ok {
                Ok(Value::String(v.to_owned()))
            } else {
                Err("is not a locale like en_US".into())
            }
        }
    }
}

/// An email address in slot `n`: a plain `local@domain.tld`, at most 75 characters in EMAIL1
/// and 100 in EMAIL2/3.
pub(super) fn email(n: u8, v: &str) -> Result<Value, Rule> {
    let v = v.trim();
    let max = if n == 1 { 75 } else { 100 };
    text(v, max)?;
    if !email_shape(v) {
        return Err("is not an email address Keap accepts (local@domain.tld, ASCII)".into());
    }
    Ok(Value::String(v.to_owned()))
}

/// Whether `e` has the plain ASCII `local@domain.tld` shape Keap accepts (no quoted or IP-literal forms).
fn email_shape(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else { return false };
    let local_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c);
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(local_char);
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let tld_ok = labels.last().is_some_and(|t| t.len() >= 2 && t.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && labels.len() >= 2 && labels.iter().all(label_ok) && tld_ok
}

/// A part of phone slot `n`: numbers take 40 characters in PHONE1–3 and 20 in PHONE4–5.
pub(super) fn phone(n: u8, part: PhonePart, v: &str) -> Result<Value, Rule> {
    match part {
        PhonePart::Number => text(v, if n <= 3 { 40 } else { 20 }),
        PhonePart::Extension => text(v, 20),
        PhonePart::Type => text(v, 255),
    }
}

/// A part of an address (`field` BILLING, SHIPPING or OTHER).
pub(super) fn address(field: &str, part: AddressPart, v: &str) -> Result<Value, Rule> {
    let billing = field == "BILLING";
    match part {
        AddressPart::Line1 | AddressPart::Line2 => text(v, if billing { 75 } else { 100 }),
        AddressPart::Locality => text(v, if billing { 50 } else { 100 }),
        AddressPart::Region => text(v, 50),
        AddressPart::PostalCode | AddressPart::ZipCode => text(v, if field == "SHIPPING" { 20 } else { 15 }),
        AddressPart::ZipFour => text(v, 10),
        AddressPart::CountryCode => {
            let up = v.trim().to_ascii_uppercase();
            if super::countries::is_alpha_3(&up) {
                Ok(Value::String(up))
            } else {
                Err("is not an ISO 3166-1 alpha-3 country code (USA, CAN, GBR …)".into())
            }
        }
    }
}

/// A custom field's content, typed by the field's `field_type` in Keap's model.
pub(super) fn custom(field_type: &str, v: &str) -> Result<Value, Rule> {
    match field_type {
        "WholeNumber" | "Year" => match v.trim().parse::<i64>() {
            Ok(n) => Ok(Value::from(n)),
            Err(_) => Err(format!("is not a whole number, which the {field_type} custom field needs")),
        },
        "DecimalNumber" | "Currency" | "Percent" => match v.trim().parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Value::from(n)),
            _ => Err(format!("is not a number, which the {field_type} custom field needs")),
        },
        "Date" => date(v),
        "Email" => email(2, v),
        _ => text(v, MAX_CUSTOM_TEXT),
    }
}

/// A tag name derived from a column (`Plan: {value}`).
pub(super) fn tag_name(name: &str) -> Result<(), Rule> {
    text(name, MAX_TAG_NAME).map(|_| ())
}

/// Truth as Postgres prints it (`true`/`t`), or as people write it in text columns.
pub(super) fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "t" | "yes" | "y" | "1" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_never_quote_the_value() {
        let secret = "ada.lovelace.private@example";
        for r in [email(1, secret), text(&"x".repeat(50), 40), date("31/12/1990"), id("abc")] {
            let rule = r.unwrap_err();
            assert!(!rule.contains("ada") && !rule.contains("xxxx") && !rule.contains("1990"), "{rule}");
        }
    }

    #[test]
    fn values_are_checked_and_normalised() {
        assert_eq!(date("1990-05-01").unwrap(), "1990-05-01");
        assert_eq!(date("1990-05-01 00:00:00+00").unwrap(), "1990-05-01");
        assert!(date("1990-02-30").is_err() && date("2000-02-29").is_ok() && date("1900-02-29").is_err());
        assert_eq!(address("BILLING", AddressPart::CountryCode, "usa").unwrap(), "USA");
        assert!(address("BILLING", AddressPart::CountryCode, "US").is_err());
        assert!(address("BILLING", AddressPart::Line1, &"a".repeat(76)).is_err());
        assert!(address("SHIPPING", AddressPart::Line1, &"a".repeat(76)).is_ok());
        assert!(phone(4, PhonePart::Number, &"1".repeat(21)).is_err());
        assert!(phone(1, PhonePart::Number, &"1".repeat(21)).is_ok());
        assert_eq!(scalar(ScalarKind::SourceType, "api").unwrap(), "API");
        assert!(
            scalar(ScalarKind::Locale, "en_US").is_ok() && scalar(ScalarKind::Locale, "english").is_err()
        );
        assert_eq!(custom("WholeNumber", " 42 ").unwrap(), 42);
        assert!(custom("WholeNumber", "4.2").is_err());
        assert!(text("a\u{7}b", 10).is_err() && text("ünïcödé \"quoted\"", 40).is_ok());
        assert!(email(1, "a@b.co").is_ok() && email(1, "a@b").is_err() && email(1, "a b@c.io").is_err());
        assert!(truthy("t") && truthy("true") && !truthy("f") && !truthy(""));
    }
}
