//! The proposal written as a commented configuration file: the database (never its
//! password), `[users]`, the guessed contact properties, each under a `# guess:` line saying
//! why, then every column left out, commented, ready to be uncommented as a custom field or a
//! tag rule.

use std::fmt::Write as _;

use super::guess::{Proposal, Section, Value};

/// How the file names the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Database {
    /// The URL as given: it holds no password.
    Url(String),
    /// The URL given held a password: the file keeps the rest of it, commented out, and says
    /// to put the whole URL in `DATABASE_URL`.
    PasswordElsewhere(String),
}

/// The configuration file for `table`, from `proposal`.
pub(crate) fn render(table: &str, database: &Database, proposal: &Proposal) -> String {
    let mut out = header(table);
    out.push_str(&database_section(database));
    out.push_str(&users_section(table, proposal));
    for (section, title) in [
        (Section::Contact, "[contact]"),
        (Section::Phone1, "[contact.phone_numbers.PHONE1]"),
        (Section::Billing, "[contact.addresses.BILLING]"),
    ] {
        out.push_str(&guessed_section(proposal, section, title));
    }
    if !proposal.notes.is_empty() {
        out.push_str("\n# Not mapped, though it looks like it could be:\n");
        for note in &proposal.notes {
            let _ = writeln!(out, "# - {note}");
        }
    }
    out.push_str(&unused_section(proposal));
    out
}

/// What the file is and what to do with it.
fn header(table: &str) -> String {
    format!(
        "# keap-sync configuration for the table {table}, written by `keap-sync init` from its columns.\n\
         # The mapping is a proposal: each line under `# guess:` was matched by a column's name and type.\n\
         # Check each one (remove what should not reach Keap), then run `keap-sync migrate` as the\n\
         # table's owner, and `keap-sync doctor`.\n\
         # Every other key and its default: keap-sync.example.toml; the mapping: README.md, \"Mapping the contact\".\n\
         # Secrets never go in this file: the Keap credential comes from the environment (KEAP_API_KEY, or\n\
         # KEAP_CLIENT_ID and KEAP_CLIENT_SECRET), a *_file key under [keap], or a systemd credential.\n"
    )
}

/// `[database]`: the URL, or where its password goes instead.
fn database_section(database: &Database) -> String {
    match database {
        Database::Url(url) => {
            format!("\n[database]\nurl = {}   # DATABASE_URL wins over it\n", toml_string(url))
        }
        Database::PasswordElsewhere(url) => format!(
            "\n[database]\n\
             # The URL given holds a password, which this file must not (config files get copied): set\n\
             # DATABASE_URL to the URL with its password in the daemon's environment (root-only, e.g.\n\
             # /etc/keap-sync/env). Without its password, the URL is:\n\
             # url = {}\n",
            toml_string(url)
        ),
    }
}

/// `[users]`: the table, the key, and EMAIL1 and the names (`""` where no column was found,
/// since the defaults name columns this table may not have).
fn users_section(table: &str, p: &Proposal) -> String {
    let mut out = format!("\n[users]\ntable = {}\n", toml_string(table));
    let _ = writeln!(out, "# {}\nkey = {}", p.key.1, toml_string(&p.key.0));
    for key in ["email", "given_name", "family_name"] {
        match p.guesses.iter().find(|g| g.section == Section::Users && g.key == key) {
            Some(g) => {
                let _ = writeln!(out, "# guess: {}\n{key} = {}", g.why, value(&g.value));
            }
            None if key == "email" => {
                out.push_str("# no column looks like an email address: name the one Keap's EMAIL1 takes\nemail = \"\"\n");
            }
            None => {
                let _ = writeln!(out, "{key} = \"\"   # no column looks like it: not synced");
            }
        }
    }
    out
}

/// One table of guessed keys, or nothing when none was guessed for it.
fn guessed_section(p: &Proposal, section: Section, title: &str) -> String {
    let guesses: Vec<_> = p.guesses.iter().filter(|g| g.section == section).collect();
    if guesses.is_empty() {
        return String::new();
    }
    let mut out = format!("\n{title}\n");
    for g in guesses {
        let _ = writeln!(out, "# guess: {}\n{} = {}", g.why, g.key, value(&g.value));
    }
    out
}

/// The columns left out, each as a commented custom field (a secret's only as a warning),
/// and one tag rule as an example.
fn unused_section(p: &Proposal) -> String {
    if p.unused.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n# The other columns, not mapped. To send one as a Keap custom field, uncomment its lines and set\n\
         # `name` to the field's label in Keap (or `id = 12`); README.md, \"Mapping the contact\", says more.\n",
    );
    for (c, note) in &p.unused {
        if let Some(note) = note {
            let _ = writeln!(out, "#\n# {} ({}): {note}", c.name, c.type_name);
            continue;
        }
        let _ = writeln!(
            out,
            "#\n# [[contact.custom_fields]]   # {} ({})\n# name = {}\n# value = {}",
            c.name,
            c.type_name,
            toml_string(&label(&c.name)),
            toml_string(&c.name)
        );
    }
    if let Some((c, _)) = p.unused.iter().find(|(c, note)| note.is_none() && c.base == "text") {
        let _ = writeln!(
            out,
            "#\n# Or tag contacts by a column's value (one tag per value; the old one removed on change):\n\
             # [[tags.from]]\n# column = {}\n# tag = {}",
            toml_string(&c.name),
            toml_string(&format!("{}: {{value}}", label(&c.name)))
        );
    }
    out
}

/// A mapped value in TOML: `"column"` or `{ sql = "…" }`.
fn value(v: &Value) -> String {
    match v {
        Value::Column(c) => toml_string(c),
        Value::Sql(sql) => format!("{{ sql = {} }}", toml_string(sql)),
    }
}

/// A column's name as a label: its words, the first capitalised (`created_at`, `CreatedAt` →
/// `Created at`).
fn label(name: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut previous_lower = false;
    for ch in name.chars() {
        if !ch.is_alphanumeric() {
            words.extend((!word.is_empty()).then(|| std::mem::take(&mut word)));
            previous_lower = false;
            continue;
        }
        if ch.is_uppercase() && previous_lower {
            words.push(std::mem::take(&mut word));
        }
        previous_lower = ch.is_lowercase() || ch.is_ascii_digit();
        word.extend(ch.to_lowercase());
    }
    words.extend((!word.is_empty()).then_some(word));
    let text = words.join(" ");
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// `s` as a TOML basic string: quoted, with `"`, `\` and control characters escaped.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_toml_reads_them() {
        let nasty = "a \"quoted\" \\ name\twith\u{1}control";
        let parsed: toml::Table = toml::from_str(&format!("k = {}", toml_string(nasty))).unwrap();
        assert_eq!(parsed["k"].as_str(), Some(nasty));
    }

    #[test]
    fn labels_read_as_words() {
        assert_eq!(label("created_at"), "Created at");
        assert_eq!(label("CreatedAt"), "Created at");
        assert_eq!(label("plan"), "Plan");
        assert_eq!(label("seats2"), "Seats2");
    }
}
