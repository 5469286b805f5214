//! The demo behind `cargo run --release --example demo`: the whole pipeline on a throwaway
//! Postgres cluster and the fake Keap, so a newcomer can watch it work on a fresh machine
//! without any account or setup. Everything it starts is removed when it ends.
//!
//! It drives the real daemon through keap-sync's public API (`migrate`, `Daemon::build`,
//! `run`), exactly as `keap-sync run --backfill` would. It lives here, not in the example, so
//! a test can run it in-process and read its narration.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::fake::{ContactWrite, EmailAddress, EmailField, FakeKeap, FakeOptions};
use crate::pg::Cluster;
use keap_sync::config::Config;
use keap_sync::{BackfillMode, Daemon, RunOptions};
use tokio_postgres::{Client, NoTls};

const API_KEY: &str = "demo-api-key";

/// Writes one line of narration; a closed output (a pipe to `head`) must not stop the demo.
macro_rules! say {
    ($out:expr) => {{
        let _ = writeln!($out);
    }};
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Runs the demo, narrating to `out`; with `keep_running`, leaves everything up until Ctrl-C so
/// the user can change rows with psql and watch them arrive.
pub async fn run(out: &mut (dyn Write + Send), keep_running: bool) -> Result<(), String> {
    say!(
        out,
        "keap-sync demo: a throwaway PostgreSQL and the built-in fake Keap; nothing else is touched.\n"
    );

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
    let config = Config::from_env(&|k| env.get(k).cloned()).map_err(|e| e.to_string())?;
    let (mut app, connection) = tokio_postgres::connect(&conninfo, NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    app.batch_execute(
        "create table users (id bigserial primary key, email text, first_name text, last_name text,
                             last_login timestamptz);
         insert into users (email, first_name, last_name) values
             ('linus@example.com', 'Linus', 'Pauling'), ('margaret@example.com', 'Margaret', 'Hamilton');",
    )
    .await
    .map_err(|e| e.to_string())?;
    say!(out, "   The app's users table already holds 2 users (they predate keap-sync).");
    let report = keap_sync::migrate(&mut app, &config.users).await.map_err(|e| e.to_string())?;
    say!(
        out,
        "2. keap-sync migrate: applied {}; capture trigger installed on public.users",
        report.applied.join(", ")
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = RunOptions { backfill: Some(BackfillMode::Resume), ..RunOptions::default() };
    let daemon = Daemon::build(config, options).await.map_err(|e| e.to_string())?;
    let daemon = tokio::spawn(daemon.run(async {
        let _ = stop_rx.await;
    }));
    let calls = |f: &FakeKeap| f.count(|r| r.path.starts_with("/crm/rest/v1/contacts"));
    let lists = |f: &FakeKeap| f.count(|r| r.path.ends_with("/v2/contacts"));
    say!(out, "3. keap-sync run --backfill: the daemon listens, and syncs the users that predate it");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app
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
    say!(
        out,
        "   backfill done with {} contact calls, one create per user: Keap's contacts were listed into \
         keap-sync's mirror first ({} list calls), so no user needed a lookup by email\n",
        calls(&fake),
        lists(&fake)
    );

    say!(out, "4. The app inserts three users, one of them with grace@example.com:");
    let before = calls(&fake);
    let t = Instant::now();
    sql(
        &app,
        "insert into users (email, first_name, last_name) values
                ('ada@example.com', 'Ada', 'Lovelace'),
                ('alan@example.com', 'Alan', 'Turing'),
                ('grace@example.com', 'Grace', 'Hopper')",
    )
    .await?;
    settle(&app).await?;
    say!(
        out,
        "   synced in {} ms with {} calls (two creates; Grace's contact, found in the mirror, read \
         and linked):",
        t.elapsed().as_millis(),
        calls(&fake) - before
    );
    show(out, &app, &fake).await?;

    say!(out, "5. The app updates Ada 50 times in a burst (the last name wins):");
    let before = calls(&fake);
    for i in 1..=50 {
        let name = if i == 50 { "King".to_owned() } else { format!("Lovelace-{i}") };
        app.execute("update users set last_name = $1 where email = 'ada@example.com'", &[&name])
            .await
            .map_err(|e| e.to_string())?;
    }
    settle(&app).await?;
    say!(out, "   50 changes cost {} call(s) to Keap.", calls(&fake) - before);

    say!(out, "6. Alan changes his email address:");
    let before = calls(&fake);
    sql(&app, "update users set email = 'alan.turing@example.org' where email = 'alan@example.com'").await?;
    settle(&app).await?;
    say!(
        out,
        "   {} calls (a read of the contact's other email slots, then the update): the same contact, not a new one.",
        calls(&fake) - before
    );

    say!(out, "7. An update touching no synced column (last_login), and one rewriting the same values:");
    let before = calls(&fake);
    sql(&app, "update users set last_login = now()").await?;
    sql(&app, "update users set first_name = first_name").await?;
    settle(&app).await?;
    say!(out, "   {} calls.\n", calls(&fake) - before);

    show(out, &app, &fake).await?;
    let users: i64 =
        app.query_one("select count(*) from users", &[]).await.map_err(|e| e.to_string())?.get(0);
    say!(
        out,
        "\nKeap saw {} contact calls in all, and holds {} contacts for {users} users (one linked, none duplicated).",
        calls(&fake),
        fake.contacts().len()
    );

    if keep_running {
        say!(out, "\nStill running. Change rows and watch them arrive:");
        say!(out, "  psql \"{conninfo}\"");
        say!(out, "Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    }
    drop(app);
    drop(cluster);
    say!(out, "Demo finished; the throwaway database and the fake Keap are gone.");
    Ok(())
}

async fn sql(client: &Client, statement: &str) -> Result<(), String> {
    client.batch_execute(statement).await.map_err(|e| e.to_string())
}

async fn settle(client: &Client) -> Result<(), String> {
    crate::app::wait_until_empty(client, Duration::from_secs(30))
        .await
        .then_some(())
        .ok_or_else(|| "the outbox did not drain within 30 s".to_owned())
}

async fn show(out: &mut (dyn Write + Send), app: &Client, fake: &FakeKeap) -> Result<(), String> {
    let rows = app
        .query(
            "select u.id, m.contact_id from users u left join keap_sync.contact_map m on m.user_key = u.id::text order by u.id",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    for row in rows {
        let id: i64 = row.get(0);
        let contact: Option<i64> = row.get(1);
        let shown = contact.and_then(|c| fake.contact(c)).map_or("(not synced)".to_owned(), |c| {
            format!(
                "contact {:>4}  {} {} <{}>",
                c.id,
                c.given_name.as_deref().unwrap_or_default(),
                c.family_name.as_deref().unwrap_or_default(),
                c.email1().unwrap_or("")
            )
        });
        say!(out, "   user {id} → {shown}");
    }
    Ok(())
}
