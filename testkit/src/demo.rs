//! The demo behind `cargo run --release --example demo`: the whole pipeline on a throwaway
//! Postgres cluster and the fake Keap, so a newcomer can watch it work on a fresh machine
//! without any account or setup. Everything it starts is removed when it ends.
//!
//! It drives keap-sync through its public API: `migrate`, `preview` before the first sync,
//! the daemon (`Daemon::build`, `run`) exactly as `keap-sync run --backfill` would, and
//! `reconcile` after a person edits a contact by hand in the fake. Every call count it prints
//! is counted from the fake's request log. It lives here, not in the example, so a test can
//! run it in-process and read its narration.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::fake::{ContactWrite, EmailAddress, EmailField, FakeKeap, FakeOptions, RecordedRequest};
use crate::pg::Cluster;
use keap_sync::config::Config;
use keap_sync::{BackfillMode, Daemon, Drift, ReconcileOptions, RunOptions, Selection};
use tokio_postgres::{Client, NoTls};

const API_KEY: &str = "demo-api-key";

/// The demo's configuration, beyond the defaults (email, first and last name): a phone, and a
/// tag that follows the user's plan. The database and Keap come from the environment.
const CONFIG: &str = r#"
[contact.phone_numbers.PHONE1]
number = "phone"

[tags]
create_missing = true

[[tags.from]]
column = "plan"
tag = "Plan: {value}"
"#;

/// Writes one line of narration; a closed output (a pipe to `head`) must not stop the demo.
macro_rules! say {
    ($out:expr) => {{
        let _ = writeln!($out);
    }};
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// What the demo runs on: the throwaway cluster, the fake Keap, the configuration, and the
/// application's connection. Dropping it stops the fake and removes the cluster.
struct Demo {
    app: Client,
    config: Config,
    conninfo: String,
    fake: FakeKeap,
    /// Held for its `Drop`, which stops the server and removes its directory; dropped last.
    _cluster: Cluster,
}

/// Runs the demo, narrating to `out`; with `keep_running`, leaves everything up until Ctrl-C so
/// the user can change rows with psql and watch them arrive.
pub async fn run(out: &mut (dyn Write + Send), keep_running: bool) -> Result<(), String> {
    say!(
        out,
        "keap-sync demo: a throwaway PostgreSQL and the built-in fake Keap; nothing else is touched.\n"
    );
    let demo = Demo::start(out).await?;
    demo.preview(out).await?;
    demo.quiet_second().await?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = RunOptions { backfill: Some(BackfillMode::Resume), ..RunOptions::default() };
    let daemon = Daemon::build(demo.config.clone(), options).await.map_err(|e| e.to_string())?;
    let daemon = tokio::spawn(daemon.run(async {
        let _ = stop_rx.await;
    }));
    demo.backfill(out).await?;
    demo.app_changes(out).await?;
    demo.hand_edit_and_reconcile(out).await?;
    demo.summary(out).await?;

    if keep_running {
        say!(out, "\nStill running. Change rows and watch them arrive:");
        say!(out, "  psql \"{}\"", demo.conninfo);
        say!(out, "Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    }
    drop(demo);
    say!(out, "Demo finished; the throwaway database and the fake Keap are gone.");
    Ok(())
}

impl Demo {
    /// Steps 1 and 2: the cluster, the fake with one contact already in it, the users table
    /// with two users, the configuration, and `migrate`.
    async fn start(out: &mut (dyn Write + Send)) -> Result<Demo, String> {
        let cluster = tokio::task::spawn_blocking(Cluster::start)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start a throwaway PostgreSQL: {e}"))?;
        let conninfo = cluster.create_database("demo").await.map_err(|e| e.to_string())?;
        let fake = FakeKeap::start(FakeOptions::default())
            .await
            .map_err(|e| format!("cannot start the fake Keap: {e}"))?;
        fake.add_api_key(API_KEY);
        let existing = fake.seed_contact(ContactWrite {
            given_name: Some("Grace".into()),
            family_name: Some("Hopper".into()),
            email_addresses: Some(vec![EmailAddress {
                email: Some("grace@example.com".into()),
                field: EmailField::Email1,
            }]),
            duplicate_option: None,
        });
        say!(out, "1. PostgreSQL is up (database \"demo\"); the fake Keap listens at {}", fake.api_url());
        say!(
            out,
            "   Keap already holds contact {} for grace@example.com, as a real account would.",
            existing.id
        );

        let env: HashMap<&str, String> = HashMap::from([
            ("DATABASE_URL", conninfo.clone()),
            ("KEAP_API_URL", fake.api_url()),
            ("KEAP_API_KEY", API_KEY.to_owned()),
        ]);
        let config = Config::from_toml(CONFIG, &|k| env.get(k).cloned()).map_err(|e| e.to_string())?;
        let (mut app, connection) =
            tokio_postgres::connect(&conninfo, NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sql(
            &app,
            "create table users (id bigserial primary key, email text, first_name text, last_name text,
                                 phone text, plan text, last_login timestamptz);
             insert into users (email, first_name, last_name, phone, plan) values
                 ('linus@example.com', 'Linus', 'Pauling', '+1 555 0100', 'pro'),
                 ('margaret@example.com', 'Margaret', 'Hamilton', null, 'free');",
        )
        .await?;
        say!(out, "   The app's users table already holds 2 users (they predate keap-sync).");
        say!(
            out,
            "   The config maps email, first and last name, phone → PHONE1, and plan → tag \"Plan: {{value}}\" \
             (created in Keap if missing)."
        );
        let report = keap_sync::migrate(&mut app, &config.users).await.map_err(|e| e.to_string())?;
        say!(
            out,
            "2. keap-sync migrate: applied {}; capture trigger installed on public.users",
            report.applied.join(", ")
        );
        Ok(Demo { app, config, conninfo, fake, _cluster: cluster })
    }

    /// Step 3: `keap-sync preview --all` before anything was synced: the calls each user would
    /// cost, and what preview itself asked of Keap (names only).
    async fn preview(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        say!(out, "3. keap-sync preview --all, before the first sync: what delivery would send");
        let since = self.fake.requests().len();
        let plans =
            keap_sync::preview(&self.config, &Selection::All(None)).await.map_err(|e| e.to_string())?;
        for plan in &plans {
            say!(out, "   user {}: {}", plan.user, plan.action.replace('_', "-"));
            for call in &plan.calls {
                say!(out, "     {} {}", call.method, call.path);
                if let Some(body) = &call.body {
                    say!(out, "       {body}");
                }
            }
            for note in &plan.notes {
                say!(out, "     note: {note}");
            }
        }
        say!(
            out,
            "   preview itself made {}; it writes nothing to Keap and records nothing.\n",
            self.tally(since)
        );
        Ok(())
    }

    /// Step 4: the daemon's backfill of the users that predate it.
    async fn backfill(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        say!(out, "4. keap-sync run --backfill: the daemon listens, and syncs the users that predate it");
        let since = self.fake.requests().len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .app
            .query_opt("select from keap_sync.backfill where state = 'done'", &[])
            .await
            .map_err(|e| e.to_string())?
            .is_none()
        {
            if Instant::now() > deadline {
                return Err("the backfill did not finish within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.settle().await?;
        say!(
            out,
            "   backfill done with {}. Keap's contacts were listed into keap-sync's mirror first, \
             so no user needed a lookup by email.",
            self.tally(since)
        );
        self.show(out).await
    }

    /// Steps 5 to 8: what the application does, and what each change costs in Keap calls.
    async fn app_changes(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        say!(out, "\n5. The app inserts three users, one of them with grace@example.com:");
        let since = self.fake.requests().len();
        let t = Instant::now();
        sql(
            &self.app,
            "insert into users (email, first_name, last_name, phone, plan) values
                ('ada@example.com', 'Ada', 'Lovelace', '+44 20 7946 0000', 'pro'),
                ('alan@example.com', 'Alan', 'Turing', null, 'free'),
                ('grace@example.com', 'Grace', 'Hopper', null, 'pro')",
        )
        .await?;
        self.settle().await?;
        say!(
            out,
            "   synced in {} ms with {} (Grace's contact, found in the mirror, is linked, not duplicated):",
            t.elapsed().as_millis(),
            self.tally(since)
        );
        self.show(out).await?;

        say!(out, "6. The app updates Ada 50 times in a burst (the last name wins):");
        let since = self.fake.requests().len();
        for i in 1..=50 {
            let name = if i == 50 { "King".to_owned() } else { format!("Lovelace-{i}") };
            self.app
                .execute("update users set last_name = $1 where email = 'ada@example.com'", &[&name])
                .await
                .map_err(|e| e.to_string())?;
        }
        self.settle().await?;
        say!(out, "   50 changes cost {}.", self.tally(since));

        say!(out, "7. Alan changes his email address and upgrades to plan pro:");
        let since = self.fake.requests().len();
        sql(
            &self.app,
            "update users set email = 'alan.turing@example.org', plan = 'pro' where email = 'alan@example.com'",
        )
        .await?;
        self.settle().await?;
        say!(out, "   {}: the same contact, not a new one, and its plan tag swapped.", self.tally(since));

        say!(out, "8. An update touching no synced column (last_login), and one rewriting the same values:");
        let since = self.fake.requests().len();
        sql(&self.app, "update users set last_login = now()").await?;
        sql(&self.app, "update users set first_name = first_name").await?;
        self.settle().await?;
        say!(out, "   {}.\n", self.tally(since));
        Ok(())
    }

    /// Steps 9 and 10: a person edits two contacts in Keap by hand; `reconcile` finds exactly
    /// that, and `reconcile --apply` has the daemon repair it.
    async fn hand_edit_and_reconcile(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        let linus = self.contact_of("linus@example.com").await?;
        let margaret = self.contact_of("margaret@example.com").await?;
        let free = self.fake.tag_id("Plan: free").ok_or("no tag \"Plan: free\" in the fake")?;
        say!(out, "9. Someone edits Keap by hand: Linus's given name becomes \"Lin\" (contact {linus}),");
        say!(out, "   and tag \"Plan: free\" is taken off Margaret's contact {margaret}.");
        self.fake.edit_contact(linus, |c| c.given_name = Some("Lin".into()));
        self.fake.remove_tag(margaret, free);

        say!(out, "10. keap-sync reconcile (a report; it changes nothing in Keap or the tables):");
        self.quiet_second().await?;
        let since = self.fake.requests().len();
        let report = self.reconcile(out, false).await?;
        say!(
            out,
            "    {} users: {} in sync, {} not; {}",
            report.users,
            report.in_sync,
            report.drifted(),
            self.tally(since)
        );
        say!(out, "    keap-sync reconcile --apply: queues those users; the daemon sends the repairs:");
        let since = self.fake.requests().len();
        let report = self.reconcile(&mut std::io::sink(), true).await?;
        self.settle().await?;
        say!(out, "    {} users queued; listing and repairs took {}:", report.queued, self.tally(since));
        self.show(out).await
    }

    /// Runs `reconcile` over every user, narrating each user not in sync as it is found.
    async fn reconcile(
        &self,
        out: &mut (dyn Write + Send),
        apply: bool,
    ) -> Result<keap_sync::Report, String> {
        let tags = self.fake.tags();
        let tag_name = |what: &str| match what.strip_prefix("tag ").and_then(|id| id.parse::<i64>().ok()) {
            Some(id) => {
                tags.iter().find(|(t, _)| *t == id).map_or(what.to_owned(), |(_, n)| format!("tag \"{n}\""))
            }
            None => what.to_owned(),
        };
        let mut found = |d: Drift| {
            let differs: Vec<String> = d.differs.iter().map(|w| tag_name(w)).collect();
            let contact = d.contact_id.map(|id| format!(" (contact {id})")).unwrap_or_default();
            say!(out, "    user {}{contact}: {}: {}", d.user, d.class.as_str(), differs.join(", "));
        };
        let options = ReconcileOptions { apply, ..ReconcileOptions::default() };
        keap_sync::reconcile(&self.config, &[], options, &mut found).await.map_err(|e| e.to_string())
    }

    /// The closing lines: every user's contact, and the calls Keap saw in all.
    async fn summary(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        let users: i64 =
            self.app.query_one("select count(*) from users", &[]).await.map_err(|e| e.to_string())?.get(0);
        say!(
            out,
            "\nIn all keap-sync made {}.\nKeap holds {} contacts for {users} users (one linked, none duplicated).",
            self.tally(0),
            self.fake.contacts().len()
        );
        Ok(())
    }

    /// Waits until every change is delivered: the capture log and the outbox are empty.
    async fn settle(&self) -> Result<(), String> {
        crate::app::wait_until_empty(&self.app, Duration::from_secs(30))
            .await
            .then_some(())
            .ok_or_else(|| "the outbox did not drain within 30 s".to_owned())
    }

    /// The contact the user with this email is linked to.
    async fn contact_of(&self, email: &str) -> Result<i64, String> {
        self.app
            .query_one(
                "select m.contact_id from users u join keap_sync.contact_map m on m.user_key = u.id::text
                 where u.email = $1",
                &[&email],
            )
            .await
            .map(|row| row.get(0))
            .map_err(|e| format!("{email} is not linked: {e}"))
    }

    /// The calls keap-sync made to the fake since request number `since`, by kind, in the
    /// order of [`KINDS`]: "5 calls: 3 create contact, 2 apply tag", and how many were
    /// throttled (answered 429, to be retried).
    fn tally(&self, since: usize) -> String {
        let requests = self.fake.requests();
        let made = requests.get(since..).unwrap_or_default();
        let each: Vec<String> = KINDS
            .iter()
            .filter_map(|k| {
                let n = made.iter().filter(|r| kind(r) == *k).count();
                (n > 0).then(|| format!("{n} {k}"))
            })
            .collect();
        let mut text = match made.len() {
            0 => "0 calls".to_owned(),
            1 => format!("1 call: {}", each.join(", ")),
            n => format!("{n} calls: {}", each.join(", ")),
        };
        let throttled = made.iter().filter(|r| r.status == 429).count();
        if throttled > 0 {
            text.push_str(&format!(" ({throttled} of them answered 429 Too Many Requests)"));
        }
        text
    }

    /// Waits (up to 10 s) until the fake has had no request for over a second. keap-sync paces
    /// its calls to the credential's per-second limit within one process; `preview` and
    /// `reconcile` pace themselves apart from the daemon, so the demo runs them once the
    /// daemon's last calls are out of Keap's one-second window, as a busy daemon beside them
    /// could otherwise have Keap answer 429. A listing asks a throttled page again, so this
    /// only keeps the calls the demo counts and prints exact.
    async fn quiet_second(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = self.fake.requests().last().map(|r| r.at);
            if last.is_none_or(|at| at.elapsed() > Duration::from_millis(1100)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("Keap's fake did not go quiet for a second within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each user, the contact it is linked to as the fake holds it, with its phone and tags.
    async fn show(&self, out: &mut (dyn Write + Send)) -> Result<(), String> {
        let rows = self
            .app
            .query(
                "select u.id, m.contact_id from users u left join keap_sync.contact_map m on m.user_key = u.id::text
                 order by u.id",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let tags = self.fake.tags();
        for row in rows {
            let id: i64 = row.get(0);
            let contact: Option<i64> = row.get(1);
            let shown =
                contact.and_then(|c| self.fake.contact_json(c)).map_or("(not synced)".to_owned(), |c| {
                    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                    let email1 =
                        c["email_addresses"].as_array().and_then(|a| a.first()).map(|e| text(&e["email"]));
                    let phone =
                        c["phone_numbers"].as_array().and_then(|a| a.first()).map(|p| text(&p["number"]));
                    let tagged: Vec<&str> = c["tag_ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| tags.iter().find(|(id, _)| Some(*id) == t.as_i64()))
                        .map(|(_, n)| n.as_str())
                        .collect();
                    format!(
                        "contact {:>2}  {} {} <{}>  {}  [{}]",
                        c["id"],
                        text(&c["given_name"]),
                        text(&c["family_name"]),
                        email1.unwrap_or_default(),
                        phone.unwrap_or_else(|| "no phone".into()),
                        tagged.join(", ")
                    )
                });
            say!(out, "   user {id} → {shown}");
        }
        Ok(())
    }
}

/// The kinds of call [`kind`] names, in the order the narration counts them.
const KINDS: [&str; 11] = [
    "list contacts",
    "read tags",
    "create tag",
    "lookup by email",
    "read contact",
    "create contact",
    "update contact",
    "apply tag",
    "remove tag",
    "read contact model",
    "other",
];

/// One request keap-sync made, in the narration's words (one of [`KINDS`]).
fn kind(r: &RecordedRequest) -> &'static str {
    let path = r.path.strip_prefix("/crm/rest").unwrap_or(&r.path);
    match (r.method.as_str(), path) {
        ("GET", "/v2/contacts") => "list contacts",
        ("GET", "/v1/tags") => "read tags",
        ("POST", "/v1/tags") => "create tag",
        ("GET", "/v1/contacts") => "lookup by email",
        ("GET", "/v1/contacts/model") => "read contact model",
        ("GET", p) if p.starts_with("/v1/contacts/") => "read contact",
        ("PUT", "/v1/contacts") => "create contact",
        ("PATCH", _) => "update contact",
        ("POST", p) if p.ends_with("/tags") => "apply tag",
        ("DELETE", p) if p.contains("/tags") => "remove tag",
        _ => "other",
    }
}

async fn sql(client: &Client, statement: &str) -> Result<(), String> {
    client.batch_execute(statement).await.map_err(|e| e.to_string())
}
