//! Unit tests of loading and validating the configuration.

use super::load::FileConfig;
use super::*;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn the_lock_timeout_must_be_below_the_statement_timeout() {
    let toml = "[database]\nurl = \"postgres://h/db\"\nlock_timeout_secs = 30\n";
    let err = load_str(toml, &[]).unwrap_err().to_string();
    assert!(err.contains("lock_timeout_secs (30)") && err.contains("statement_timeout_secs (30)"), "{err}");
    let err = load_str("[database]\nurl = \"postgres://h/db\"\nkeepalive_idle_secs = 0\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("database.keepalive_idle_secs must be at least 1"), "{err}");
}

fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir().join(format!(
        "keap-sync-config-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keap-sync.toml");
    std::fs::write(&path, toml_text).unwrap();
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let result = Config::load(Some(&path), &|k| env.get(k).cloned());
    std::fs::remove_dir_all(&dir).ok();
    result
}

#[test]
fn defaults_apply() {
    let c = load_str("", &[]).unwrap();
    assert!(c.database.is_none());
    assert_eq!(c.users.table, "public.users");
    assert_eq!(c.users.synced_columns(), vec!["email", "first_name", "last_name"]);
    assert_eq!(c.keap.api_url, DEFAULT_API_URL);
    assert_eq!(c.delivery.concurrency, 4);
    assert_eq!(c.limits, LimitsConfig::OAUTH);
    assert!(c.credential().is_err());
}

#[test]
fn the_example_file_parses_to_the_defaults() {
    let example = Config::from_toml(include_str!("../../keap-sync.example.toml"), &|_| None).unwrap();
    let defaults = Config::from_toml("", &|_| None).unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn mirror_lookups_are_on_by_default_and_their_confirmation_must_be_in_range() {
    let c = load_str("", &[]).unwrap();
    assert!(c.mirror.lookups);
    assert_eq!(c.mirror.confirm, Duration::from_secs(10));
    let off = load_str("[mirror]\nlookups = false\n", &[]).unwrap();
    assert!(!off.mirror.lookups);
    let err = load_str("[mirror]\nconfirm_secs = 0\n", &[]).unwrap_err().to_string();
    assert!(err.contains("mirror.confirm_secs = 0") && err.contains("1 to 3600"), "{err}");
}

#[test]
fn the_scheduled_reconcile_is_off_by_default_and_its_period_must_be_in_range() {
    assert_eq!(load_str("", &[]).unwrap().mirror.reconcile, None);
    let daily = load_str("[mirror]\nreconcile_hours = 24\n", &[]).unwrap();
    assert_eq!(daily.mirror.reconcile, Some(Duration::from_secs(86_400)));
    assert_eq!(load_str("[mirror]\nreconcile_hours = 0\n", &[]).unwrap().mirror.reconcile, None);
    let monthly = load_str("[mirror]\nreconcile_hours = 720\n", &[]).unwrap();
    assert_eq!(monthly.mirror.reconcile, Some(Duration::from_secs(720 * 3_600)));
    let err = load_str("[mirror]\nreconcile_hours = 721\n", &[]).unwrap_err().to_string();
    assert!(
        err.contains("mirror.reconcile_hours = 721") && err.contains("1 to 720") && err.contains("0 to turn"),
        "{err}"
    );
}

#[test]
fn unknown_key_is_named() {
    let err = load_str("[delivery]\nconcurency = 3\n", &[]).unwrap_err().to_string();
    assert!(err.contains("concurency"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn environment_wins_over_file() {
    let c = load_str(
        "[database]\nurl = \"postgres://file/db\"\n[keap]\napi_url = \"https://file.example/crm/rest\"\n",
        &[("DATABASE_URL", "postgres://env/db"), ("KEAP_API_URL", "http://127.0.0.1:9/crm/rest/")],
    )
    .unwrap();
    assert_eq!(c.database().unwrap().url.expose(), "postgres://env/db");
    assert_eq!(c.keap.api_url, "http://127.0.0.1:9/crm/rest");
}

#[test]
fn keap_urls_must_be_https_except_on_loopback() {
    let load = |key: &str, value: &str| load_str(&format!("[keap]\n{key} = {value:?}\n"), &[]);
    for key in ["api_url", "token_url", "authorize_url", "redirect_uri"] {
        // Plain http to a real host: refused, naming the key and the fix, on one line.
        let err = load(key, "http://api.example.com/crm/rest").unwrap_err().to_string();
        assert!(err.starts_with(&format!("keap.{key}")), "{err}");
        assert!(err.contains("http://api.example.com/crm/rest") && err.contains("use https://"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        // Another scheme, or no URL at all.
        for bad in ["ftp://api.example.com/x", "api.example.com/crm/rest"] {
            let err = load(key, bad).unwrap_err().to_string();
            assert!(err.contains(&format!("keap.{key}")) && err.contains("https://"), "{err}");
        }
        // Credentials inside the URL: refused without quoting them.
        let err = load(key, "https://user:hunter2@api.example.com/").unwrap_err().to_string();
        assert!(err.contains("user name or password") && !err.contains("hunter2"), "{err}");
        // https anywhere, and plain http on loopback hosts (the tests, the demo, `--listen`).
        for good in [
            "https://api.example.com/crm/rest",
            "http://127.0.0.1:8080/crm/rest",
            "http://127.9.9.9/token",
            "http://[::1]:9/token",
            "http://localhost:1234/keap/callback",
            "http://LOCALHOST/cb",
        ] {
            assert!(load(key, good).is_ok(), "keap.{key} = {good}: {:?}", load(key, good).err());
        }
    }
    // Lookalikes of loopback are not loopback.
    for bad in ["http://localhost.example.com/", "http://127.0.0.1.example.com/", "http://[::2]/"] {
        assert!(load("api_url", bad).is_err(), "{bad}");
    }
    // The environment's value is checked the same way, and the message names the variable.
    let err = load_str("", &[("KEAP_TOKEN_URL", "http://token.example.com/token")]).unwrap_err().to_string();
    assert!(err.contains("KEAP_TOKEN_URL") && err.contains("keap.token_url"), "{err}");
    // The redirect URL is kept exactly as registered; the endpoints lose trailing slashes.
    let c = load_str("[keap]\nredirect_uri = \"https://app.example.com/cb/\"\n", &[]).unwrap();
    assert_eq!(c.keap.redirect_uri.as_deref(), Some("https://app.example.com/cb/"));
}

#[test]
fn api_key_selects_api_key_limits_and_is_redacted() {
    let c = load_str("", &[("KEAP_API_KEY", "KeapAK-secretvalue")]).unwrap();
    assert!(matches!(c.credential().unwrap(), Credential::ApiKey(_)));
    assert_eq!(c.limits, LimitsConfig::API_KEY);
    assert!(!format!("{c:?}").contains("secretvalue"));
}

#[test]
fn half_an_oauth_client_is_an_error() {
    let err = load_str("", &[("KEAP_CLIENT_ID", "abc")]).unwrap_err().to_string();
    assert!(err.contains("KEAP_CLIENT_SECRET"), "{err}");
}

#[test]
fn lease_shorter_than_a_call_is_refused() {
    let err = load_str("[delivery]\nlease_secs = 60\n", &[]).unwrap_err().to_string();
    assert!(err.contains("delivery.lease_secs"), "{err}");
}

#[test]
fn empty_optional_column_disables_it() {
    let c = load_str("[users]\ngiven_name = \"\"\n", &[]).unwrap();
    assert_eq!(c.users.synced_columns(), vec!["email", "last_name"]);
}

#[test]
fn a_double_quote_in_a_name_is_kept_for_quoting_and_a_nul_is_refused() {
    // Quoted wherever it is used (`db::quote_ident` doubles the quote): no injection.
    let c = load_str("[users]\ntable = 'x\"; drop table y'\ngiven_name = 'First \"Name\"'\n", &[]).unwrap();
    assert_eq!(c.users.table, "x\"; drop table y");
    let err = load_str("[users]\ngiven_name = \"a\\u0000b\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("users.given_name") && err.contains("NUL"), "{err}");
}

/// A scratch directory for secret files; the caller removes it.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keap-sync-secrets-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn defaults_are_written_once() {
    // Leaving a key out of the file means the section's `Default`, and the example's values
    // are exactly those.
    assert_eq!(toml::from_str::<FileConfig>("").unwrap(), FileConfig::default());
    assert_eq!(toml::from_str::<FileConfig>("[delivery]\n").unwrap(), FileConfig::default());
    let example = toml::from_str::<FileConfig>(include_str!("../../keap-sync.example.toml")).unwrap();
    assert_eq!(example, FileConfig::default());
    // And the file shape's `Default` validated is what an empty file gives.
    let validated = FileConfig::default().validate(None, std::path::Path::new("."), &|_| None).unwrap();
    let empty = Config::from_toml("", &|_| None).unwrap();
    assert_eq!(format!("{validated:?}"), format!("{empty:?}"));
}

#[test]
fn the_example_mapping_once_uncommented_is_valid() {
    // The commented `[contact]` and `[tags]` of the example are documentation: each line
    // must still be a valid setting when a user uncomments it.
    let text = include_str!("../../keap-sync.example.toml");
    let start = text.find("# [contact]").unwrap();
    let end = text.find("[keap]").unwrap();
    let mapping: String =
        text[start..end].lines().map(|l| l.strip_prefix("# ").unwrap_or("")).collect::<Vec<_>>().join("\n");
    let c = Config::from_toml(&mapping, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.users.contact.fields.len(), 27, "every field the example shows");
    assert_eq!(c.users.contact.tags.rules.len(), 2);
    assert_eq!(c.users.contact.tags.on_create.len(), 1);
}

#[test]
fn a_key_left_out_keeps_its_default_beside_one_set() {
    let c = load_str("[delivery]\nconcurrency = 8\n[limits]\nper_day = 1000\n", &[]).unwrap();
    assert_eq!(c.delivery.concurrency, 8);
    assert_eq!(c.delivery.lease, Duration::from_secs(120));
    assert_eq!(c.limits, LimitsConfig { per_day: 1000, ..LimitsConfig::OAUTH });
    let c = load_str("[limits]\nper_second = 5\n", &[("KEAP_API_KEY", "k")]).unwrap();
    assert_eq!(c.limits, LimitsConfig { per_second: 5, ..LimitsConfig::API_KEY });
}

#[test]
fn an_environment_secret_wins_over_the_secret_file() {
    let dir = scratch_dir();
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, "from-file\n").unwrap();
    let text = format!("[keap]\napi_key_file = {:?}\n", key_file.to_str().unwrap());
    let api_key = |c: &Config| match c.credential().unwrap() {
        Credential::ApiKey(key) => key.expose().to_owned(),
        other => panic!("{other:?}"),
    };
    assert_eq!(api_key(&load_str(&text, &[]).unwrap()), "from-file");
    assert_eq!(api_key(&load_str(&text, &[("KEAP_API_KEY", " from-env\n")]).unwrap()), "from-env");

    // The OAuth client secret: systemd's credential, unless the environment has one.
    std::fs::write(dir.join("keap-client-secret"), "from-systemd").unwrap();
    let creds = ("CREDENTIALS_DIRECTORY", dir.to_str().unwrap());
    let client_secret = |env: &[(&str, &str)]| match load_str("[keap]\nclient_id = \"file-id\"\n", env)
        .unwrap()
        .credential()
        .unwrap()
    {
        Credential::OAuth { client_id, client_secret } => {
            (client_id.clone(), client_secret.expose().to_owned())
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(client_secret(&[creds]), ("file-id".into(), "from-systemd".into()));
    assert_eq!(
        client_secret(&[creds, ("KEAP_CLIENT_SECRET", "from-env"), ("KEAP_CLIENT_ID", "env-id")]),
        ("env-id".into(), "from-env".into())
    );
    std::fs::remove_dir_all(&dir).ok();

    // Never from the TOML itself.
    let err = load_str("[keap]\nclient_secret = \"hunter2\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("client_secret"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_syntax_error_never_echoes_the_source() {
    for (text, line) in [
        ("[database]\nurl = \"postgres://u:secret@h/db\" oops\n", 2),
        ("[database]\nurl = \"postgres://u:secret@h/db\"\n= 3\n", 3),
        ("[database]\nurl = \"postgres://u:secret@h/db\n", 2),
        ("[database]\nurl = postgres://u:secret@h/db\n", 2),
        ("[database]\nurl = \"postgres://u:secret@h/db\"\nurl = \"postgres://u:secret@h/db\"\n", 3),
    ] {
        let err = load_str(text, &[]).unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains(&format!("TOML parse error at line {line}, column ")), "{err}");
    }
}

/// Two self-signed CA certificates (EC P-256, valid until 2126), made with the openssl command
/// line for these tests only: their keys were thrown away.
const TWO_CAS: &str = include_str!("testdata/two-cas.pem");

/// `[database]` with `ca_file` set to `file` (written next to the config as `ca.pem`, unless
/// `None`), loaded from a config file; the error, if any, as text.
fn load_with_ca_file(ca_file: &str, contents: Option<&[u8]>) -> Result<Config, String> {
    let dir =
        std::env::temp_dir().join(format!("keap-sync-ca-{}-{}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(contents) = contents {
        std::fs::write(dir.join("ca.pem"), contents).unwrap();
    }
    let path = dir.join("keap-sync.toml");
    std::fs::write(&path, format!("[database]\nurl = \"postgres://h/db\"\nca_file = '{ca_file}'\n")).unwrap();
    let result = Config::load(Some(&path), &|_| None).map_err(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    result
}

#[test]
fn a_ca_file_relative_to_the_config_file_is_read_with_every_certificate() {
    let config = load_with_ca_file("ca.pem", Some(TWO_CAS.as_bytes())).unwrap();
    let ca = config.database().unwrap().ca_file.as_ref().expect("ca_file is read");
    assert!(
        ca.path().is_absolute() && ca.path().ends_with("ca.pem"),
        "beside the config file: {:?}",
        ca.path()
    );
    assert_eq!(ca.certificates().len(), 2);
    // Without the key it is off, and the example file leaves it out.
    assert!(load_str("[database]\nurl = \"postgres://h/db\"\n", &[])
        .unwrap()
        .database()
        .unwrap()
        .ca_file
        .is_none());
}

#[test]
fn a_ca_file_that_is_missing_unreadable_or_not_pem_is_an_error_naming_it_and_the_fix() {
    let dir = std::env::temp_dir();
    let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    let cases: [(&str, Option<&[u8]>, &str); 6] = [
        ("missing.pem", None, "cannot be read"),
        (dir.to_str().unwrap(), None, "cannot be read"),
        ("ca.pem", Some(b"not a certificate\n"), "holds no PEM certificate"),
        ("ca.pem", Some(key.as_bytes()), "holds no PEM certificate"),
        ("ca.pem", Some(b"-----BEGIN CERTIFICATE-----\nMIIB\n"), "no END line"),
        (
            "ca.pem",
            Some(b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n"),
            "certificate 1 is not a usable CA certificate",
        ),
    ];
    for (file, contents, why) in cases {
        let err = load_with_ca_file(file, contents).unwrap_err();
        assert!(
            err.starts_with("database.ca_file ") && err.contains(file),
            "names the key and the file: {err}"
        );
        assert!(err.contains(why), "{file}: says why ({why}): {err}");
        assert!(err.contains("set database.ca_file to a PEM file"), "says how to fix it: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(
            !err.contains("MIGHAgEAMBMG") && !err.contains("aGVsbG8"),
            "quotes nothing of the file: {err}"
        );
    }
}

#[test]
fn over_opt_out_belongs_to_opt_in_reason_only() {
    let mapping = |line: &str| Config::from_toml(&format!("[contact]\n{line}\n"), &|_| None);
    let plain = mapping(r#"opt_in_reason = { sql = "case when c then 'Yes' end" }"#).unwrap();
    assert!(!plain.users.contact.consent_over_opt_out, "consent never lifts an opt-out by default");
    let asked =
        mapping(r#"opt_in_reason = { sql = "case when c then 'Yes' end", over_opt_out = true }"#).unwrap();
    assert!(asked.users.contact.consent_over_opt_out);
    let elsewhere =
        mapping(r#"job_title = { column = "job", over_opt_out = true }"#).unwrap_err().to_string();
    assert!(
        elsewhere.contains("contact.job_title: over_opt_out belongs to contact.opt_in_reason only"),
        "{elsewhere}"
    );
}

#[test]
fn inbound_is_off_unless_configured_and_a_column_has_one_owner() {
    assert!(!load_str("", &[]).unwrap().users.inbound.is_on());
    let on = load_str("[inbound]\nemail_opt_out = \"marketing_opt_out\"\n", &[]).unwrap();
    assert_eq!(on.users.inbound.email_opt_out.as_deref(), Some("marketing_opt_out"));
    assert!(!on.users.synced_columns().contains(&"marketing_opt_out".to_owned()), "never sent out");
    let err = load_str("[inbound]\nemail_opt_outt = \"x\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("email_opt_outt"), "{err}");
    let both =
        "[contact]\njob_title = \"marketing_opt_out\"\n[inbound]\nemail_opt_out = \"marketing_opt_out\"\n";
    let err = load_str(both, &[]).unwrap_err().to_string();
    assert!(
        err.contains("inbound.email_opt_out")
            && err.contains("contact.job_title")
            && err.contains("one owner"),
        "{err}"
    );
    let err = load_str("[inbound]\nemail_opt_out = \"email\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("users.email"), "{err}");
    let err = load_str("[inbound]\nemail_opt_out = \"id\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("users.key"), "{err}");
}

#[test]
fn the_stamp_of_a_contact_found_gone_is_an_inbound_column_with_one_owner() {
    let on = load_str("[inbound]\ncontact_gone_at = \"gone_at\"\n", &[]).unwrap();
    assert_eq!(on.users.inbound.contact_gone_at.as_deref(), Some("gone_at"));
    assert!(on.users.inbound.is_on());
    assert!(!on.users.synced_columns().contains(&"gone_at".to_owned()), "never sent out");
    let err = load_str("[inbound]\ncontact_gone_at = \"email\"\n", &[]).unwrap_err().to_string();
    assert!(err.contains("inbound.contact_gone_at") && err.contains("users.email"), "{err}");
    let twice = "[inbound]\nemail_opt_out = \"x\"\ncontact_gone_at = \"x\"\n";
    let err = load_str(twice, &[]).unwrap_err().to_string();
    assert!(err.contains("both name column x"), "{err}");
}

#[test]
fn inbound_tags_name_one_category_and_a_column_with_one_owner() {
    let by_name =
        load_str("[inbound]\ntags = { column = \"keap_tags\", category = \"Churn signals\" }\n", &[])
            .unwrap();
    let tags = by_name.users.inbound.tags.clone().expect("tags configured");
    assert_eq!(tags.column, "keap_tags");
    assert_eq!(tags.category, TagCategory::Name("Churn signals".into()));
    assert!(by_name.users.inbound.is_on());
    assert!(!by_name.users.synced_columns().contains(&"keap_tags".to_owned()), "never sent out");
    let inbound: Vec<(String, String)> = by_name
        .users
        .inbound_columns()
        .into_iter()
        .map(|(d, col)| (d.key().to_owned(), col.to_owned()))
        .collect();
    assert_eq!(inbound, [("inbound.tags".to_owned(), "keap_tags".to_owned())]);
    let by_id = load_str("[inbound]\ntags = { column = \"keap_tags\", category_id = 12 }\n", &[]).unwrap();
    assert_eq!(by_id.users.inbound.tags.unwrap().category, TagCategory::Id(12));
    for (text, want) in [
        ("tags = { column = \"t\", category = \"C\", category_id = 3 }", "exactly one of category"),
        ("tags = { column = \"t\" }", "exactly one of category"),
        ("tags = { column = \"t\", category = \" \" }", "category"),
        ("tags = { column = \"t\", category_id = 0 }", "category_id"),
        ("tags = { category = \"C\" }", "column"),
        ("tags = { column = \"t\", category = \"C\", colour = 1 }", "colour"),
        ("tags = { column = \"email\", category = \"C\" }", "users.email"),
        ("tags = { column = \"id\", category = \"C\" }", "users.key"),
        ("email_opt_out = \"t\"\ntags = { column = \"t\", category = \"C\" }", "both name column t"),
    ] {
        let err = load_str(&format!("[inbound]\n{text}\n"), &[]).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
    let both = "[contact]\njob_title = \"keap_tags\"\n[inbound]\ntags = { column = \"keap_tags\", category = \"C\" }\n";
    let err = load_str(both, &[]).unwrap_err().to_string();
    assert!(
        err.contains("inbound.tags") && err.contains("contact.job_title") && err.contains("one owner"),
        "{err}"
    );
    let rule = "[[tags.from]]\ncolumn = \"keap_tags\"\ntag = \"VIP\"\n\
                [inbound]\ntags = { column = \"keap_tags\", category = \"C\" }\n";
    let err = load_str(rule, &[]).unwrap_err().to_string();
    assert!(err.contains("inbound.tags") && err.contains("one owner"), "{err}");
}

#[test]
fn a_property_owned_by_keap_is_never_sent_and_needs_a_column() {
    let mapping = |text: &str| load_str(&format!("[contact]\n{text}\n"), &[]);
    let c = mapping(
        "job_title = { column = \"job\", owner = \"keap\" }\nspouse_name = { column = \"spouse\", owner = \"app\" }\n\
         [contact.phone_numbers.PHONE1]\nnumber = { column = \"phone\", owner = \"keap\" }\ntype = { sql = \"'Mobile'\" }",
    )
    .unwrap();
    let sent: Vec<String> = c.users.fields().into_iter().map(|f| f.key).collect();
    assert!(
        sent.contains(&"contact.spouse_name".into())
            && sent.contains(&"contact.phone_numbers.PHONE1.type".into())
    );
    assert!(
        !sent.iter().any(|k| k == "contact.job_title" || k == "contact.phone_numbers.PHONE1.number"),
        "{sent:?}"
    );
    let synced = c.users.synced_columns();
    assert!(!synced.contains(&"job".into()) && !synced.contains(&"phone".into()), "not watched: {synced:?}");
    let inbound: Vec<(String, String)> =
        c.users.inbound_columns().into_iter().map(|(d, col)| (d.key().to_owned(), col.to_owned())).collect();
    assert_eq!(
        inbound,
        [
            ("contact.job_title".into(), "job".into()),
            ("contact.phone_numbers.PHONE1.number".into(), "phone".into())
        ]
    );
    for (text, want) in [
        ("job_title = { sql = \"upper(job)\", owner = \"keap\" }", "owner = \"keap\" needs a column"),
        ("job_title = { column = \"job\", owner = \"crm\" }", "use \"app\" (the default"),
        ("job_title = { column = \"job\", owner = \"keap\", empty = \"clear\" }", "remove empty"),
        ("opt_in_reason = { column = \"c\", owner = \"keap\" }", "not supported for consent"),
        ("job_title = { column = \"job\", owner = \"keap\" }\nspouse_name = \"job\"", "one owner"),
        ("job_title = { column = \"email\", owner = \"keap\" }", "users.email"),
        (
            "job_title = { column = \"x\", owner = \"keap\" }\nspouse_name = { column = \"x\", owner = \"keap\" }",
            "both name column x",
        ),
    ] {
        let err = mapping(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.starts_with("contact.") || err.contains("contact."), "names the key: {err}");
    }
    let consent = mapping(
        "opt_in_reason = { sql = \"case when c then 'Yes' end\", over_opt_out = true, owner = \"app\" }",
    );
    assert!(consent.unwrap().users.contact.consent_over_opt_out, "over_opt_out still works beside owner");
}

#[test]
fn a_shared_property_is_sent_and_written_from_keap_with_a_preference() {
    let mapping = |text: &str| load_str(&format!("[contact]\n{text}\n"), &[]);
    let c = mapping("job_title = { column = \"job\", owner = \"shared\", prefer = \"keap\" }").unwrap();
    let sent: Vec<String> = c.users.fields().into_iter().map(|f| f.key).collect();
    assert!(sent.contains(&"contact.job_title".into()), "sent like the app's: {sent:?}");
    assert!(c.users.synced_columns().contains(&"job".into()), "and watched by capture");
    let shared: Vec<(String, Prefer)> =
        c.users.contact.shared.iter().map(|(f, p)| (f.key.clone(), *p)).collect();
    assert_eq!(shared, [("contact.job_title".to_owned(), Prefer::Keap)]);
    let inbound: Vec<(String, String)> =
        c.users.inbound_columns().into_iter().map(|(d, col)| (d.key().to_owned(), col.to_owned())).collect();
    assert_eq!(inbound, [("contact.job_title".to_owned(), "job".to_owned())], "one owner check passes");
    for (text, want) in [
        ("job_title = { column = \"job\", owner = \"shared\" }", "needs prefer = \"app\" or \"keap\""),
        ("job_title = { column = \"job\", owner = \"shared\", prefer = \"later\" }", "needs prefer"),
        ("job_title = { column = \"job\", prefer = \"app\" }", "prefer goes with owner = \"shared\" only"),
        ("job_title = { column = \"job\", owner = \"keap\", prefer = \"app\" }", "prefer goes with"),
        (
            "job_title = { sql = \"upper(job)\", owner = \"shared\", prefer = \"app\" }",
            "owner = \"shared\" needs a column",
        ),
        (
            "job_title = { column = \"job\", owner = \"shared\", prefer = \"app\" }\nspouse_name = \"job\"",
            "one owner",
        ),
    ] {
        let err = mapping(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains("contact."), "names the key: {err}");
    }
}

#[test]
fn email2_email3_and_custom_fields_may_be_keaps_or_shared_but_consent_stays_the_apps() {
    let c = load_str(
        "[contact.email_addresses]\nEMAIL2 = { column = \"e2\", owner = \"keap\" }\n\
         EMAIL3 = { column = \"e3\", owner = \"shared\", prefer = \"app\" }\n\
         [[contact.custom_fields]]\nname = \"Plan\"\nvalue = { column = \"plan\", owner = \"keap\" }\n\
         [[contact.custom_fields]]\nid = 12\nvalue = { column = \"seats\", owner = \"shared\", prefer = \"keap\" }\n",
        &[],
    )
    .unwrap();
    let sent: Vec<String> = c.users.fields().into_iter().map(|f| f.key).collect();
    assert!(
        sent.contains(&"contact.email_addresses.EMAIL3".into())
            && sent.contains(&"contact.custom_fields[1]".into()),
        "the shared ones are sent: {sent:?}"
    );
    assert!(
        !sent.contains(&"contact.email_addresses.EMAIL2".into())
            && !sent.contains(&"contact.custom_fields[0]".into()),
        "the Keap-owned ones are not: {sent:?}"
    );
    let synced = c.users.synced_columns();
    assert!(!synced.contains(&"e2".into()) && !synced.contains(&"plan".into()), "not watched: {synced:?}");
    assert!(synced.contains(&"e3".into()) && synced.contains(&"seats".into()), "watched: {synced:?}");
    let inbound: Vec<(String, String)> =
        c.users.inbound_columns().into_iter().map(|(d, col)| (d.key().to_owned(), col.to_owned())).collect();
    assert_eq!(
        inbound,
        [
            ("contact.email_addresses.EMAIL2".to_owned(), "e2".to_owned()),
            ("contact.custom_fields[0]".to_owned(), "plan".to_owned()),
            ("contact.email_addresses.EMAIL3".to_owned(), "e3".to_owned()),
            ("contact.custom_fields[1]".to_owned(), "seats".to_owned()),
        ]
    );
    let mapping = |text: &str| load_str(&format!("[contact]\n{text}\n"), &[]);
    for (text, want) in [
        ("opt_in_reason = { column = \"c\", owner = \"keap\" }", "not supported for consent"),
        ("opt_in_reason = { column = \"c\", owner = \"shared\", prefer = \"app\" }", "not supported for consent"),
        ("[contact.email_addresses]\nEMAIL2 = { sql = \"lower(e)\", owner = \"keap\" }", "needs a column"),
        ("[contact.email_addresses]\nEMAIL2 = { column = \"e\", owner = \"keap\", empty = \"clear\" }", "remove empty"),
        ("[contact.email_addresses]\nEMAIL3 = { column = \"e\", owner = \"shared\" }", "needs prefer"),
        (
            "[[contact.custom_fields]]\nname = \"Plan\"\nvalue = { sql = \"upper(p)\", owner = \"shared\", prefer = \"app\" }",
            "needs a column",
        ),
        ("[[contact.custom_fields]]\nname = \"Plan\"\nvalue = { column = \"p\", owner = \"keap\", empty = \"keep\" }", "remove empty"),
        (
            "[contact.email_addresses]\nEMAIL2 = { column = \"x\", owner = \"keap\" }\n\
             [[contact.custom_fields]]\nid = 3\nvalue = { column = \"x\", owner = \"keap\" }",
            "both name column x",
        ),
        (
            "job_title = \"x\"\n[[contact.custom_fields]]\nid = 3\nvalue = { column = \"x\", owner = \"keap\" }",
            "one owner",
        ),
    ] {
        let err = mapping(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains("contact."), "names the key: {err}");
    }
}

#[test]
fn a_name_of_users_may_be_keaps_or_shared() {
    let c = load_str(
        "[users]\ngiven_name = { column = \"first_name\", owner = \"shared\", prefer = \"app\" }\n\
         family_name = { column = \"last_name\", owner = \"keap\" }\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.users.given_name.as_deref(), Some("first_name"), "a shared name is sent");
    assert_eq!(c.users.family_name, None, "a Keap-owned name is not");
    let sent: Vec<String> = c.users.fields().into_iter().map(|f| f.key).collect();
    assert!(sent.contains(&"users.given_name".into()) && !sent.contains(&"users.family_name".into()));
    let inbound: Vec<(String, String)> =
        c.users.inbound_columns().into_iter().map(|(d, col)| (d.key().to_owned(), col.to_owned())).collect();
    assert_eq!(
        inbound,
        [
            ("users.family_name".to_owned(), "last_name".to_owned()),
            ("users.given_name".to_owned(), "first_name".to_owned())
        ]
    );
    for (text, want) in [
        ("given_name = { column = \"first_name\", owner = \"shared\" }", "needs prefer"),
        ("given_name = { column = \"\", owner = \"keap\" }", "an owner needs a column"),
        (
            "given_name = { column = \"first_name\", owner = \"keap\" }\nfamily_name = \"first_name\"",
            "one owner",
        ),
    ] {
        let err = load_str(&format!("[users]\n{text}\n"), &[]).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("users."), "{text}: {err}");
    }
}
