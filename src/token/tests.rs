//! Unit tests of reading the Keap app from a grant's scope and refusing a refresh for another.

use super::refresh::refreshed_for_other_app;
use super::store::account_from_scope;
use super::ImportError;
use crate::keap::model::TokenResponse;

#[test]
fn the_account_is_the_host_after_the_bar_of_scope() {
    let cases = [
        ("full|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
        (" full| Abc123.Infusionsoft.com ", Some("abc123.infusionsoft.com")),
        ("|abc123.infusionsoft.com", Some("abc123.infusionsoft.com")),
        ("full|my-app.keap.app", Some("my-app.keap.app")),
        // Without a bar, or with nothing after it: no account.
        ("full", None),
        ("", None),
        ("full|", None),
        ("full|  ", None),
        // Odd input is not guessed at.
        ("full|a|b", None),
        ("full|abc 123", None),
        ("full|abc123.infusionsoft.com openid", None),
        ("full|...", None),
        ("full|abc/../x", None),
        ("full|äbc.infusionsoft.com", None),
    ];
    for (scope, want) in cases {
        assert_eq!(account_from_scope(scope).as_deref(), want, "scope {scope:?}");
    }
}

fn answer(scope: Option<&str>) -> TokenResponse {
    TokenResponse {
        access_token: "at".into(),
        token_type: None,
        expires_in: 60,
        refresh_token: "rt".into(),
        scope: scope.map(Into::into),
    }
}

#[test]
fn only_a_refresh_naming_another_app_is_refused() {
    let a = "a1.infusionsoft.com";
    assert!(refreshed_for_other_app(Some(a), &answer(Some("full|a1.infusionsoft.com"))).is_none());
    assert!(refreshed_for_other_app(Some(a), &answer(Some("full|A1.Infusionsoft.com"))).is_none());
    assert!(refreshed_for_other_app(Some(a), &answer(None)).is_none(), "names none: keep the app");
    assert!(refreshed_for_other_app(Some(a), &answer(Some("full"))).is_none());
    assert!(refreshed_for_other_app(None, &answer(Some("full|b2.infusionsoft.com"))).is_none());
    let why = refreshed_for_other_app(Some(a), &answer(Some("full|b2.infusionsoft.com"))).unwrap();
    assert!(why.contains(a) && why.contains("b2.infusionsoft.com"), "{why}");
    assert!(why.contains("--switch-account"), "{why}");
}

#[test]
fn the_refusal_names_both_apps_and_the_ways_out() {
    let e = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 3 };
    let text = e.to_string();
    for needle in
        ["a1.x", "b2.x", "links 3 users", "--switch-account", "keap-sync auth login", "backfill --restart"]
    {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    let none = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 0 };
    assert!(!none.to_string().contains("contact map links"), "{none}");
    let one = ImportError::OtherApp { stored: "a1.x".into(), offered: "b2.x".into(), linked: 1 };
    assert!(one.to_string().contains("links 1 user to a contact there"), "{one}");
}
