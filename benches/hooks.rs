//! Hook receiver benchmark: how fast the receiver answers Keap's deliveries while the daemon
//! reads the contacts they named (issue 29: every answer 200 in under a second; Keap counts a
//! try as failed after 30 s and makes a hook Inactive after four).
//!
//! A throwaway Postgres, the fake Keap and the daemon in-process, with `[hooks]` on a loopback
//! port and the sweep effectively off. `--contacts` contacts are seeded in the fake, each
//! linked to a user, and the fake fires `contact.edit` for each of them `--rounds` times, in
//! deliveries of `--batch` ids (Keap's most: 1,000), reordered, 20 % of events sent twice. The
//! figures: deliveries, ids carried, answers other than 200, answer time median, p99 and max
//! (as the fake measured them, connect to last byte), and how long until the queue was read.
//!
//! ```text
//! cargo bench --bench hooks -- [--contacts N] [--rounds N] [--batch N]
//! ```
//! Defaults: `--contacts 5000 --rounds 3 --batch 1000`. Figures only, no pass/fail. The users
//! are first synced by the daemon (about 40 s for 5,000); much larger `--contacts` take minutes.

#![allow(
    clippy::disallowed_methods,
    reason = "tests, benches and the demo own the servers and daemons they spawn, which end with them"
)]
use std::time::{Duration, Instant};

use keap_sync_testkit::app::{self, spawn_app_with, Options, HOOK_PATH};
use keap_sync_testkit::fake::HookOptions;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name);
    at.and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (contacts, rounds, batch) = (arg("--contacts", 5_000), arg("--rounds", 3), arg("--batch", 1_000));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(run(contacts, rounds, batch));
}

async fn run(contacts: usize, rounds: usize, batch: usize) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let toml =
        format!("[mirror]\nsweep_secs = 3600\n[hooks]\nlisten = \"127.0.0.1:{port}\"\nwatch_secs = 0\n");
    let toml: &'static str = Box::leak(toml.into_boxed_str());
    let app = spawn_app_with(Options { toml, ..Options::stopped() }).await;
    app.exec(&format!(
        "insert into users (email, first_name, last_name)
         select 'user' || g || '@example.com', 'First' || g, 'Last' || g from generate_series(1, {contacts}) g"
    ))
    .await;
    let mut app = app;
    app.start_daemon().await;
    app.wait_idle_for(Duration::from_secs(600)).await;
    let ids: Vec<i64> = app.fake.contacts().iter().map(|c| c.id).collect();
    app::eventually(Duration::from_secs(20), "the receiver listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/{HOOK_PATH}");
    assert_eq!(app.fake.subscribe_hook("contact.edit", &url).await.status, "Verified");
    app.fake.set_hook_options(HookOptions { batch, reorder: true, duplicate: 0.2, ..HookOptions::default() });
    let started = Instant::now();
    for _ in 0..rounds {
        app.fake.fire_hook("contact.edit", &ids);
    }
    let events = ids.len() * rounds;
    app::eventually(Duration::from_secs(600), "every event delivered", || async {
        app.fake.hook_attempts().iter().map(|a| a.ids.len()).sum::<usize>() >= events
    })
    .await;
    let delivered = started.elapsed();
    app::eventually(Duration::from_secs(600), "the queue read", || async {
        app.count("select count(*) from keap_sync.hook_queue").await == 0
    })
    .await;
    let read = started.elapsed();
    report(&app.fake.hook_attempts(), contacts, rounds, delivered, read);
}

fn report(
    attempts: &[keap_sync_testkit::fake::HookAttempt],
    contacts: usize,
    rounds: usize,
    delivered: Duration,
    read: Duration,
) {
    let mut times: Vec<Duration> = attempts.iter().map(|a| a.elapsed).collect();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let not_200 = attempts.iter().filter(|a| a.status != Some(200)).count();
    let ids: usize = attempts.iter().map(|a| a.ids.len()).sum();
    println!(
        "hook receiver: {contacts} contacts x {rounds} rounds of contact.edit, 20 % sent twice, reordered"
    );
    println!("  deliveries {}, ids carried {ids}, answers other than 200: {not_200}", attempts.len());
    println!(
        "  answer time: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
    println!(
        "  all delivered after {:.2} s; queue read into the mirror after {:.2} s",
        delivered.as_secs_f64(),
        read.as_secs_f64()
    );
}
