//! How the fake reads a contact write body: Keap's v1 `CreateOrPatchContact` / `UpsertContact`
//! properties, each checked the way Keap documents it (`docs/keap-api.md`, "Field rules"), and
//! rejected with a v1-style message naming the property otherwise. Written from the OpenAPI
//! file and the notes, not from the daemon's `mapping`: an independent witness.
//!
//! Where Keap's rule is unknown the fake is strict but plausible: an unknown property or item
//! key is refused, enums must be spelled exactly, `birthday`/`anniversary` take `YYYY-MM-DD` or
//! an RFC 3339 date-time, a `country_code` must be three capital letters (alpha-3 shape; the
//! fake keeps no country list), text without a documented length is capped at 255.

use serde_json::{Map, Value};

/// Which operation a contact body is for: only PUT takes `duplicate_option`, and needs it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    Upsert,
    Create,
    Patch,
}

/// A custom field of the fake's contact model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CustomField {
    pub(super) id: i64,
    pub(super) label: String,
    pub(super) field_name: String,
    pub(super) field_type: String,
}

/// Scalar text properties and their maximum length in characters.
const TEXT: &[(&str, usize)] = &[
    ("given_name", 40),
    ("family_name", 40),
    ("middle_name", 100),
    ("preferred_name", 100),
    ("spouse_name", 100),
    ("job_title", 255),
    ("website", 100),
    ("prefix", 255),
    ("suffix", 255),
    ("time_zone", 255),
    ("preferred_locale", 255),
    ("contact_type", 255),
    ("opt_in_reason", 255),
];

/// `source_type` values, exactly as the v1 spec spells them.
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

/// Properties that hold an array of slots.
pub(super) const ARRAYS: &[&str] = &["email_addresses", "phone_numbers", "addresses", "custom_fields"];

/// Checks a write body; the validated object (without `duplicate_option`) or Keap's message.
pub(super) fn parse_write(
    body: &[u8],
    kind: Write,
    model: &[CustomField],
) -> Result<Map<String, Value>, String> {
    let Ok(Value::Object(mut w)) = serde_json::from_slice::<Value>(body) else {
        return Err(super::BAD_INPUT.into());
    };
    match (kind, w.remove("duplicate_option")) {
        (Write::Upsert, None) => return Err("duplicate_option is required: Email or EmailAndName".into()),
        (Write::Upsert, Some(Value::String(o))) if o == "Email" || o == "EmailAndName" => {
            w.insert("duplicate_option".into(), Value::String(o));
        }
        (Write::Upsert, Some(_)) => return Err("duplicate_option must be Email or EmailAndName".into()),
        (_, Some(_)) => return Err("Unrecognized field \"duplicate_option\"".into()),
        (_, None) => {}
    }
    for (k, v) in &w {
        if k == "duplicate_option" {
            continue;
        }
        check_property(k, v, model)?;
    }
    Ok(w)
}

fn check_property(k: &str, v: &Value, model: &[CustomField]) -> Result<(), String> {
    if let Some((_, max)) = TEXT.iter().find(|(name, _)| *name == k) {
        return match v {
            Value::Null => Ok(()),
            Value::String(s) if s.chars().count() > *max => {
                Err(format!("{k} must be at most {max} characters"))
            }
            Value::String(_) => Ok(()),
            _ => Err(format!("{k} must be a string")),
        };
    }
    match k {
        "birthday" | "anniversary" => match v {
            Value::Null => Ok(()),
            Value::String(s) if s.is_empty() || is_date(s) || is_date_time(s) => Ok(()),
            _ => Err(format!("{k} must be a date (yyyy-MM-dd)")),
        },
        "lead_source_id" | "owner_id" => match v {
            Value::Null => Ok(()),
            Value::Number(n) if n.is_i64() => Ok(()),
            _ => Err(format!("{k} must be an integer")),
        },
        "source_type" => match v {
            Value::Null => Ok(()),
            Value::String(s) if SOURCE_TYPES.contains(&s.as_str()) => Ok(()),
            _ => Err(format!("source_type must be one of {}", SOURCE_TYPES.join(", "))),
        },
        "email_addresses" => items(k, v, &["email", "field"], email_item),
        "phone_numbers" => items(k, v, &["number", "extension", "type", "field", "number_e164"], phone_item),
        "addresses" => items(
            k,
            v,
            &[
                "field",
                "line1",
                "line2",
                "locality",
                "region",
                "postal_code",
                "zip_code",
                "zip_four",
                "country_code",
            ],
            address_item,
        ),
        "custom_fields" => items(k, v, &["id", "content"], |item| custom_item(item, model)),
        _ => Err(format!("Unrecognized field \"{k}\"")),
    }
}

/// An array of objects with only `allowed` keys, each checked, no slot twice.
fn items(
    k: &str,
    v: &Value,
    allowed: &[&str],
    check: impl Fn(&Map<String, Value>) -> Result<Value, String>,
) -> Result<(), String> {
    let Value::Array(list) = v else { return Err(format!("{k} must be an array")) };
    let mut slots = Vec::new();
    for item in list {
        let Value::Object(m) = item else { return Err(format!("{k} items must be objects")) };
        if let Some(bad) = m.keys().find(|key| !allowed.contains(&key.as_str())) {
            return Err(format!("Unrecognized field \"{bad}\" in {k}"));
        }
        let slot = check(m)?;
        if slots.contains(&slot) {
            return Err(format!("Each {k} field may appear only once"));
        }
        slots.push(slot);
    }
    Ok(())
}

fn text<'a>(m: &'a Map<String, Value>, key: &str, what: &str) -> Result<Option<&'a str>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(format!("{what} {key} must be a string")),
    }
}

fn too_long(s: Option<&str>, max: usize) -> bool {
    s.is_some_and(|s| s.chars().count() > max)
}

fn email_item(m: &Map<String, Value>) -> Result<Value, String> {
    let field = text(m, "field", "email")?.unwrap_or("");
    let max = match field {
        "EMAIL1" => 75,
        "EMAIL2" | "EMAIL3" => 100,
        _ => return Err("Email field must be one of EMAIL1, EMAIL2, EMAIL3".into()),
    };
    match text(m, "email", "email")? {
        Some(a) if a.chars().count() > max => {
            Err(format!("Email address is too long (at most {max} characters)"))
        }
        Some(a) if !a.is_empty() && !super::contacts::email_is_valid(a) => {
            Err("Email address is invalid".into())
        }
        _ => Ok(Value::String(field.into())),
    }
}

fn phone_item(m: &Map<String, Value>) -> Result<Value, String> {
    let field = text(m, "field", "phone")?.unwrap_or("");
    let max = match field {
        "PHONE1" | "PHONE2" | "PHONE3" => 40,
        "PHONE4" | "PHONE5" => 20,
        _ => return Err("Phone field must be one of PHONE1 to PHONE5".into()),
    };
    let number = text(m, "number", field)?;
    if too_long(number, max) {
        return Err(format!("{field} number is too long (at most {max} characters)"));
    }
    // Keap's answer to a phone item with parts but no number is not documented (the v1 spec
    // requires only `field`); the fake refuses it, the strictest reading. An empty number is
    // how a slot is removed and stays accepted.
    if number.is_none() && m.keys().any(|k| k != "field") {
        return Err(format!("{field} needs a number"));
    }
    if too_long(text(m, "extension", field)?, 20) || too_long(text(m, "type", field)?, 255) {
        return Err(format!("{field} extension or type is too long"));
    }
    text(m, "number_e164", field)?;
    Ok(Value::String(field.into()))
}

fn address_item(m: &Map<String, Value>) -> Result<Value, String> {
    let field = text(m, "field", "address")?.unwrap_or("");
    let billing = match field {
        "BILLING" => true,
        "SHIPPING" | "OTHER" => false,
        _ => return Err("Address field must be one of BILLING, SHIPPING, OTHER".into()),
    };
    let limits = [
        ("line1", if billing { 75 } else { 100 }),
        ("line2", if billing { 75 } else { 100 }),
        ("locality", if billing { 50 } else { 100 }),
        ("region", 50),
        ("postal_code", if field == "SHIPPING" { 20 } else { 15 }),
        ("zip_code", if field == "SHIPPING" { 20 } else { 15 }),
        ("zip_four", 10),
    ];
    for (part, max) in limits {
        if too_long(text(m, part, field)?, max) {
            return Err(format!("{field} {part} is too long (at most {max} characters)"));
        }
    }
    let has = |part: &str| m.get(part).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let country = text(m, "country_code", field)?.unwrap_or("");
    let alpha3 = country.len() == 3 && country.chars().all(|c| c.is_ascii_uppercase());
    if !country.is_empty() && !alpha3 {
        return Err(format!("{field} Country Code is invalid"));
    }
    if has("region") && country.is_empty() {
        return Err("COUNTRY CODE needed if Region Exists".into());
    }
    if has("zip_code") && has("postal_code") {
        return Err(format!("{field} zip_code and postal_code cannot both be set"));
    }
    if has("zip_four") && !has("zip_code") {
        return Err(format!("{field} zip_four needs zip_code"));
    }
    Ok(Value::String(field.into()))
}

fn custom_item(m: &Map<String, Value>, model: &[CustomField]) -> Result<Value, String> {
    let Some(id) = m.get("id").and_then(Value::as_i64) else {
        return Err("Custom field id must be an integer".into());
    };
    let Some(f) = model.iter().find(|f| f.id == id) else {
        return Err(format!("Custom field {id} does not exist"));
    };
    let content = m.get("content").unwrap_or(&Value::Null);
    let ok = match (f.field_type.as_str(), content) {
        (_, Value::Null) => true,
        (_, Value::String(s)) if s.is_empty() => true,
        ("WholeNumber", Value::Number(n)) => n.is_i64(),
        ("WholeNumber", Value::String(s)) => s.parse::<i64>().is_ok(),
        ("DecimalNumber" | "Currency" | "Percent", Value::Number(_)) => true,
        ("DecimalNumber" | "Currency" | "Percent", Value::String(s)) => s.parse::<f64>().is_ok(),
        ("YesNo", Value::Bool(_)) => true,
        ("YesNo", Value::String(s)) => ["Yes", "No", "true", "false"].contains(&s.as_str()),
        ("Date", Value::String(s)) => is_date(s),
        ("DateTime", Value::String(s)) => is_date(s) || is_date_time(s),
        ("Text" | "TextArea", Value::String(s)) => s.chars().count() <= 65_535,
        (_, Value::String(s)) => s.chars().count() <= 65_535,
        _ => false,
    };
    if ok {
        Ok(Value::from(id))
    } else {
        Err(format!("Custom field {id} ({}) has an invalid value for a {} field", f.label, f.field_type))
    }
}

/// `YYYY-MM-DD` with a real calendar day.
pub(super) fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        s.get(r).filter(|t| t.bytes().all(|c| c.is_ascii_digit())).and_then(|t| t.parse::<u32>().ok())
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else { return false };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    (1..=12).contains(&m) && d >= 1 && d <= days[(m - 1) as usize]
}

/// An RFC 3339 date-time such as `2024-08-14T12:34:56.789Z` (shape only).
fn is_date_time(s: &str) -> bool {
    s.len() >= 20
        && is_date(&s[..10])
        && s.as_bytes()[10] == b'T'
        && (s.ends_with('Z') || s[19..].contains(['+', '-']))
}

/// The slot name of an array item: `field`, or a custom field's `id`.
pub(super) fn slot_of(prop: &str, item: &Value) -> Value {
    let key = if prop == "custom_fields" { "id" } else { "field" };
    item.get(key).cloned().unwrap_or(Value::Null)
}

/// Whether an item of `prop` is empty, so writing it removes the slot: an email without an
/// address, a phone without a number, a custom field without content.
pub(super) fn removes_slot(prop: &str, item: &Value) -> bool {
    let main = match prop {
        "email_addresses" => "email",
        "phone_numbers" => "number",
        "custom_fields" => "content",
        _ => {
            return item
                .as_object()
                .is_some_and(|m| m.iter().all(|(k, v)| k == "field" || v.is_null() || v == ""))
        }
    };
    match item.get(main) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> Vec<CustomField> {
        vec![CustomField {
            id: 12,
            label: "Seats".into(),
            field_name: "Seats".into(),
            field_type: "WholeNumber".into(),
        }]
    }

    fn check(v: Value) -> Result<Map<String, Value>, String> {
        parse_write(v.to_string().as_bytes(), Write::Patch, &model())
    }

    #[test]
    fn each_rule_names_the_field() {
        for (body, want) in [
            (json!({"given_name": "x".repeat(41)}), "given_name must be at most 40"),
            (json!({"birthday": "10/12/1815"}), "birthday must be a date"),
            (json!({"lead_source_id": "7"}), "lead_source_id must be an integer"),
            (json!({"source_type": "api"}), "source_type must be one of"),
            (json!({"phone_numbers": [{"field": "PHONE6", "number": "1"}]}), "PHONE1 to PHONE5"),
            (
                json!({"phone_numbers": [{"field": "PHONE4", "number": "1".repeat(21)}]}),
                "PHONE4 number is too long",
            ),
            (json!({"addresses": [{"field": "BILLING", "region": "Arizona"}]}), "COUNTRY CODE needed"),
            (json!({"addresses": [{"field": "BILLING", "country_code": "US"}]}), "Country Code is invalid"),
            (json!({"addresses": [{"field": "OTHER", "zip_code": "1", "postal_code": "2"}]}), "cannot both"),
            (json!({"addresses": [{"field": "OTHER", "zip_four": "1"}]}), "zip_four needs zip_code"),
            (json!({"addresses": [{"field": "BILLING", "street": "1"}]}), "Unrecognized field \"street\""),
            (json!({"custom_fields": [{"id": 13, "content": 1}]}), "Custom field 13 does not exist"),
            (json!({"custom_fields": [{"id": 12, "content": "many"}]}), "invalid value for a WholeNumber"),
            (json!({"tag_ids": [1]}), "Unrecognized field \"tag_ids\""),
            (json!({"email_addresses": [{"field": "EMAIL1", "email": "a"}]}), "Email address is invalid"),
        ] {
            let err = check(body.clone()).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let fine = json!({"birthday": "2000-02-29", "anniversary": "2024-08-14T12:34:56.789Z", "owner_id": 9,
            "addresses": [{"field": "BILLING", "region": "Arizona", "country_code": "USA", "zip_code": "85001", "zip_four": "1234"}],
            "custom_fields": [{"id": 12, "content": 3}], "phone_numbers": [{"field": "PHONE1", "number": "555", "type": "Work"}]});
        assert!(check(fine).is_ok());
        assert!(!is_date("2023-02-29") && is_date("2024-02-29"));
    }
}
