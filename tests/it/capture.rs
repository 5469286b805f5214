//! Capture you can trust: a user whose row cannot be read is parked alone, and the daemon reads
//! nothing but the columns it syncs.

use std::time::Duration;

use keap_sync_testkit::app::{self, spawn_app_with, Options};

/// A `last_name` whose conversion to text raises for one value: a composite type with a cast
/// to text that refuses `bad`, standing in for any value that fails `::text` after a column
/// type change.
const UNREADABLE_LAST_NAME: &str = "
    create type public.surname as (v text);
    create function public.surname_text(s public.surname) returns text
        language plpgsql immutable as $$
        begin
            if s.v = 'bad' then
                raise exception 'surname % cannot be shown', s.v;
            end if;
            return s.v;
        end $$;
    create cast (public.surname as text) with function public.surname_text(public.surname);
    alter table public.users alter column last_name type public.surname using row(last_name)::public.surname;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_row_cannot_be_read_is_parked_alone_and_the_others_are_delivered() {
    let mut app = spawn_app_with(Options { start_daemon: false, ..Options::default() }).await;
    app.exec(UNREADABLE_LAST_NAME).await;
    app.exec(
        "insert into users (email, first_name, last_name)
         select 'u' || g || '@example.com', 'U' || g, row(case when g = 3 then 'bad' else 'L' || g end)::surname
           from generate_series(1, 6) g",
    )
    .await;
    app.start_daemon().await;
    app::eventually(
        Duration::from_secs(20),
        "the five readable users delivered, the other parked",
        || async {
            app.fake.contacts().len() == 5
                && app.count("select count(*) from keap_sync.outbox where parked_at is not null").await == 1
                && app.count("select count(*) from keap_sync.outbox").await == 1
        },
    )
    .await;
    let row = app
        .db
        .query_one("select user_key, last_error from keap_sync.outbox where parked_at is not null", &[])
        .await
        .expect("the parked row");
    let (key, reason): (String, String) = (row.get(0), row.get(1));
    assert_eq!(key, "3");
    assert!(
        reason.contains("user 3") && reason.contains("last_name"),
        "the reason names user and column: {reason}"
    );
    assert!(reason.contains("cannot be shown"), "the reason says why: {reason}");
    assert!(app.daemons_running(), "the daemon keeps running");

    // Fixed, the user syncs on its next change.
    app.exec("update users set last_name = row('Good')::surname where id = 3").await;
    app.wait_idle().await;
    assert_eq!(app.fake.contacts().len(), 6);
}
