//! The proposed mapping: each Keap property matched to the column whose name and type most
//! likely hold it, every match a guess with its reason. Pure: the columns in, the proposal
//! out, so every rule is unit-tested without a database.
//!
//! A name matches when its words, lower-cased and run together (`EmailAddress`,
//! `email_address` and `E-Mail Address` all become `emailaddress`), equal one of the
//! property's spellings, tried in the order listed (the most telling first); the type must be
//! one the property takes. A column is used once. What is not matched is listed for the
//! operator, except columns whose name says they hold a secret, which are marked never to
//! send.

use std::collections::BTreeSet;

/// One column of the table, as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: String,
    /// As `format_type` prints it: `character varying(80)`, `boolean`.
    pub(crate) type_name: String,
    /// The base type's `typname` (a domain's base): `varchar`, `bool`, `int8`, `uuid`.
    pub(crate) base: String,
    /// The one-column primary key.
    pub(crate) primary: bool,
    /// In a one-column unique index, and not null: a key when there is no primary key.
    pub(crate) unique: bool,
}

/// What a property's value may be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// A date or timestamp column, or text.
    Date,
    Bool,
}

impl Column {
    /// Its words run together, lower case: `EmailAddress` → `emailaddress`.
    fn compact(&self) -> String {
        self.name.chars().filter(char::is_ascii_alphanumeric).collect::<String>().to_ascii_lowercase()
    }

    /// Whether the column's type can feed a property of `kind`.
    fn fits(&self, kind: Kind) -> bool {
        let text = ["text", "varchar", "bpchar", "citext", "name"].contains(&self.base.as_str());
        match kind {
            Kind::Text => text,
            Kind::Date => text || ["date", "timestamp", "timestamptz"].contains(&self.base.as_str()),
            Kind::Bool => self.base == "bool",
        }
    }

    /// The length limit of a `character(n)` or `character varying(n)` column.
    fn max_chars(&self) -> Option<u32> {
        let (_, rest) = self.type_name.split_once('(')?;
        rest.trim_end_matches(')').parse().ok()
    }
}

/// Where a proposed value goes in the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Section {
    Users,
    Contact,
    Phone1,
    Billing,
}

/// One proposed key: `key = "column"` or `key = { sql = "…" }` in `section`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Guess {
    pub(crate) section: Section,
    pub(crate) key: &'static str,
    /// The column read, or the SQL expression over the row.
    pub(crate) value: Value,
    /// Why this column: what its name and type suggest.
    pub(crate) why: String,
}

/// A mapped value: a column or an SQL expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Column(String),
    Sql(String),
}

/// The whole proposal for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Proposal {
    /// The key column, and why it was chosen.
    pub(crate) key: (String, String),
    pub(crate) guesses: Vec<Guess>,
    /// Columns left out, each with a note (its type, or why it is not proposed).
    pub(crate) unused: Vec<(Column, Option<&'static str>)>,
    /// What the operator should know about a column not mapped as it might be.
    pub(crate) notes: Vec<String>,
}

/// A property, its spellings (run together, most telling first) and the kind of value.
type Rule = (Section, &'static str, &'static [&'static str], Kind);

/// The properties matched by name, in the order they are tried and written.
const RULES: &[Rule] = &[
    (
        Section::Users,
        "email",
        &["email", "emailaddress", "mail", "email1", "primaryemail", "useremail"],
        Kind::Text,
    ),
    (Section::Users, "given_name", &["firstname", "givenname", "forename", "fname", "first"], Kind::Text),
    (Section::Users, "family_name", &["lastname", "familyname", "surname", "lname", "last"], Kind::Text),
    (Section::Contact, "middle_name", &["middlename", "middle"], Kind::Text),
    (Section::Contact, "preferred_name", &["preferredname", "nickname"], Kind::Text),
    (Section::Contact, "prefix", &["prefix", "salutation", "honorific"], Kind::Text),
    (Section::Contact, "suffix", &["suffix", "namesuffix"], Kind::Text),
    (Section::Contact, "job_title", &["jobtitle", "position"], Kind::Text),
    (Section::Contact, "spouse_name", &["spousename", "spouse"], Kind::Text),
    (Section::Contact, "website", &["website", "homepage", "websiteurl", "url"], Kind::Text),
    (Section::Contact, "birthday", &["birthday", "birthdate", "dateofbirth", "dob"], Kind::Date),
    (Section::Contact, "anniversary", &["anniversary"], Kind::Date),
    (Section::Contact, "time_zone", &["timezone", "tz"], Kind::Text),
    (Section::Contact, "preferred_locale", &["preferredlocale", "locale"], Kind::Text),
    (
        Section::Phone1,
        "number",
        &[
            "phone",
            "phonenumber",
            "mobile",
            "mobilephone",
            "mobilenumber",
            "cell",
            "cellphone",
            "telephone",
            "tel",
        ],
        Kind::Text,
    ),
    (Section::Phone1, "extension", &["phoneextension", "phoneext", "extension", "ext"], Kind::Text),
    (
        Section::Billing,
        "line1",
        &["addressline1", "address1", "address", "streetaddress", "street", "street1", "line1"],
        Kind::Text,
    ),
    (Section::Billing, "line2", &["addressline2", "address2", "street2", "line2"], Kind::Text),
    (Section::Billing, "locality", &["city", "town", "locality"], Kind::Text),
    (Section::Billing, "postal_code", &["postalcode", "postcode"], Kind::Text),
    (Section::Billing, "zip_code", &["zipcode", "zip"], Kind::Text),
];

/// Words in a boolean column's name that say the user agreed to marketing email.
const CONSENT: &[&str] = &["consent", "optin", "optedin", "marketing", "newsletter", "subscribed"];

/// Words in a column's name that say it holds a secret: never proposed, never to be sent.
const SECRET: &[&str] = &["password", "passwd", "hash", "token", "secret", "salt", "otp", "mfa"];

/// The proposal for `columns`; `None` when no column can be the key (no one-column primary
/// key, nor a one-column unique index on a column that is not null).
pub(crate) fn propose(columns: &[Column]) -> Option<Proposal> {
    let key = key(columns)?;
    let mut used = BTreeSet::from([key.0.clone()]);
    let mut guesses = Vec::new();
    for (section, property, names, kind) in RULES {
        if *property == "zip_code" && guesses.iter().any(|g: &Guess| g.key == "postal_code") {
            continue; // Keap takes a postal code or a zip code, not both
        }
        if let Some((column, name)) = find(columns, &used, names, *kind) {
            used.insert(column.name.clone());
            let why = format!("its name ({name}) and type ({})", column.type_name);
            guesses.push(Guess {
                section: *section,
                key: property,
                value: Value::Column(column.name.clone()),
                why,
            });
        }
    }
    let mut notes = Vec::new();
    country_and_region(columns, &mut used, &mut guesses, &mut notes);
    consent(columns, &mut used, &mut guesses);
    let unused = columns
        .iter()
        .filter(|c| !used.contains(&c.name))
        .map(|c| (c.clone(), is_secret(c).then_some("holds a secret, by its name: never send it to Keap")))
        .collect();
    Some(Proposal { key, guesses, unused, notes })
}

/// The key: the one-column primary key, else a one-column unique index on a not-null column.
fn key(columns: &[Column]) -> Option<(String, String)> {
    if let Some(c) = columns.iter().find(|c| c.primary) {
        return Some((c.name.clone(), format!("the primary key ({})", c.type_name)));
    }
    let c = columns.iter().find(|c| c.unique)?;
    Some((
        c.name.clone(),
        format!("unique and not null ({}); the table has no one-column primary key", c.type_name),
    ))
}

/// The first column, in the order of `names`, that is unused, has one of the names and fits
/// `kind`; and the spelling it matched.
fn find<'a>(
    columns: &'a [Column],
    used: &BTreeSet<String>,
    names: &[&'static str],
    kind: Kind,
) -> Option<(&'a Column, &'static str)> {
    names.iter().find_map(|name| {
        columns
            .iter()
            .find(|c| !used.contains(&c.name) && c.compact() == *name && c.fits(kind))
            .map(|c| (c, *name))
    })
}

/// `country_code` from a country column that can hold three letters (Keap takes ISO 3166-1
/// alpha-3 only), and `region` only with it (Keap refuses a region without a country).
fn country_and_region(
    columns: &[Column],
    used: &mut BTreeSet<String>,
    guesses: &mut Vec<Guess>,
    notes: &mut Vec<String>,
) {
    let names = &["countrycode", "country", "countryiso3", "countryiso"];
    let Some((country, name)) = find(columns, used, names, Kind::Text) else { return };
    if country.max_chars().is_some_and(|n| n < 3) {
        notes.push(format!(
            "column {} ({}) cannot hold the ISO 3166-1 alpha-3 code Keap takes (USA, GBR): not mapped; \
             map an SQL expression that converts it to `country_code` under [contact.addresses.BILLING] \
             (and `region` with it)",
            country.name, country.type_name
        ));
        return;
    }
    used.insert(country.name.clone());
    let why = format!(
        "its name ({name}) and type ({}); it must hold ISO 3166-1 alpha-3 codes (USA, GBR): a row with another \
         form is parked, naming the column",
        country.type_name
    );
    guesses.push(Guess {
        section: Section::Billing,
        key: "country_code",
        value: Value::Column(country.name.clone()),
        why,
    });
    let regions = &["region", "state", "province", "stateprovince", "county"];
    if let Some((region, name)) = find(columns, used, regions, Kind::Text) {
        used.insert(region.name.clone());
        let why = format!(
            "its name ({name}) and type ({}); Keap takes a region only with a country",
            region.type_name
        );
        guesses.push(Guess {
            section: Section::Billing,
            key: "region",
            value: Value::Column(region.name.clone()),
            why,
        });
    }
}

/// `opt_in_reason` from a boolean column whose name speaks of marketing consent: set only
/// while it is true, which is when Keap may mark the address marketable.
fn consent(columns: &[Column], used: &mut BTreeSet<String>, guesses: &mut Vec<Guess>) {
    let found = columns.iter().find(|c| {
        !used.contains(&c.name) && c.fits(Kind::Bool) && CONSENT.iter().any(|w| c.compact().contains(w))
    });
    let Some(c) = found else { return };
    used.insert(c.name.clone());
    let sql = format!("case when {} then 'Consented in the application' end", quote_ident(&c.name));
    let why = format!(
        "a boolean ({}) whose name speaks of consent: the reason is sent only while it is true",
        c.name
    );
    guesses.push(Guess { section: Section::Contact, key: "opt_in_reason", value: Value::Sql(sql), why });
}

/// Whether the column's name says it holds a secret.
fn is_secret(c: &Column) -> bool {
    let compact = c.compact();
    SECRET.iter().any(|w| compact.contains(w))
}

/// `name` as an SQL identifier, always quoted (a name may be a keyword, or mixed case).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, type_name: &str, base: &str) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            base: base.into(),
            primary: false,
            unique: false,
        }
    }

    fn typical() -> Vec<Column> {
        vec![
            Column { primary: true, ..col("id", "bigint", "int8") },
            col("email", "text", "text"),
            col("first_name", "text", "text"),
            col("last_name", "character varying(80)", "varchar"),
            col("phone", "text", "text"),
            col("street", "text", "text"),
            col("city", "text", "text"),
            col("state", "text", "text"),
            col("zip", "text", "text"),
            col("country", "character(3)", "bpchar"),
            col("marketing_consent", "boolean", "bool"),
            col("birth_date", "date", "date"),
            col("plan", "text", "text"),
            col("password_hash", "text", "text"),
        ]
    }

    fn guessed(p: &Proposal) -> Vec<(&'static str, String)> {
        p.guesses
            .iter()
            .map(|g| {
                let v = match &g.value {
                    Value::Column(c) => c.clone(),
                    Value::Sql(s) => s.clone(),
                };
                (g.key, v)
            })
            .collect()
    }

    #[test]
    fn a_typical_table_maps_by_name_and_type() {
        let p = propose(&typical()).unwrap();
        assert_eq!(p.key.0, "id");
        assert_eq!(
            guessed(&p),
            [
                ("email", "email".to_owned()),
                ("given_name", "first_name".to_owned()),
                ("family_name", "last_name".to_owned()),
                ("birthday", "birth_date".to_owned()),
                ("number", "phone".to_owned()),
                ("line1", "street".to_owned()),
                ("locality", "city".to_owned()),
                ("zip_code", "zip".to_owned()),
                ("country_code", "country".to_owned()),
                ("region", "state".to_owned()),
                (
                    "opt_in_reason",
                    "case when \"marketing_consent\" then 'Consented in the application' end".to_owned()
                ),
            ]
        );
        let unused: Vec<(&str, Option<&str>)> = p.unused.iter().map(|(c, n)| (c.name.as_str(), *n)).collect();
        assert_eq!(unused[0], ("plan", None));
        assert_eq!(unused[1].0, "password_hash");
        assert!(unused[1].1.unwrap().contains("never send"));
    }

    #[test]
    fn mixed_case_names_match_and_a_uuid_key_is_the_primary_key() {
        let columns = vec![
            Column { primary: true, ..col("Id", "uuid", "uuid") },
            col("EmailAddress", "citext", "citext"),
            col("FirstName", "text", "text"),
            col("Surname", "text", "text"),
            col("IsSubscribed", "boolean", "bool"),
        ];
        let p = propose(&columns).unwrap();
        assert_eq!(p.key.0, "Id");
        let g = guessed(&p);
        assert_eq!(g[0], ("email", "EmailAddress".to_owned()));
        assert_eq!(g[1], ("given_name", "FirstName".to_owned()));
        assert_eq!(g[2], ("family_name", "Surname".to_owned()));
        assert_eq!(g[3].1, "case when \"IsSubscribed\" then 'Consented in the application' end");
    }

    #[test]
    fn a_two_letter_country_and_a_region_without_one_are_not_mapped() {
        let columns = vec![
            Column { primary: true, ..col("id", "integer", "int4") },
            col("email", "text", "text"),
            col("country", "character(2)", "bpchar"),
            col("state", "text", "text"),
        ];
        let p = propose(&columns).unwrap();
        assert!(!p.guesses.iter().any(|g| g.key == "country_code" || g.key == "region"));
        assert!(p.notes[0].contains("alpha-3"), "{:?}", p.notes);
    }

    #[test]
    fn types_must_fit_and_postal_code_wins_over_zip() {
        let columns = vec![
            Column { unique: true, ..col("user_id", "bigint", "int8") },
            col("email", "integer", "int4"),
            col("mail", "text", "text"),
            col("postcode", "text", "text"),
            col("zip", "text", "text"),
            col("newsletter", "text", "text"),
        ];
        let p = propose(&columns).unwrap();
        assert!(p.key.1.contains("no one-column primary key"));
        let g = guessed(&p);
        assert_eq!(g[0], ("email", "mail".to_owned()), "an integer column is no email");
        assert!(g.contains(&("postal_code", "postcode".to_owned())));
        assert!(!g.iter().any(|(k, _)| *k == "zip_code" || *k == "opt_in_reason"));
    }

    #[test]
    fn no_key_no_proposal() {
        assert_eq!(propose(&[col("email", "text", "text")]), None);
    }
}
