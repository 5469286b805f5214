//! How the command line shows durations, backfill progress and `status` to people. Only the
//! CLI prints for people; the layers below return data (and log structured fields), so a
//! wording change here can never change what the daemon does.

use crate::backfill::Progress;
use crate::doctor::{Outcome, Report};
use crate::preview::Plan;
use crate::status::{InstanceRole, Status};
use crate::token::GrantState;

pub(crate) use crate::status::human_secs;

/// "12,345 / 100,000 users (12%), 180/s, about 8 min left" for the terminal.
pub(crate) fn progress(p: &Progress, rate_per_sec: f64) -> String {
    let done = p.delivered();
    let pct = if p.total > 0 { done * 100 / p.total.max(1) } else { 100 };
    let left = (p.total - done).max(0);
    let eta = if rate_per_sec > 0.1 && left > 0 {
        format!(", about {} left", human_secs(left as f64 / rate_per_sec))
    } else {
        String::new()
    };
    let parked = if p.parked > 0 { format!(", {} parked", p.parked) } else { String::new() };
    format!("{done} / {} users ({pct}%), {rate_per_sec:.0}/s{eta}{parked}", p.total)
}

/// `keap-sync status` as text.
pub(crate) fn status(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    let o = &s.outbox;
    line(format!(
        "queue: {} live, {} retrying, {} backfill, {} parked{}",
        o.live,
        o.retry,
        o.backfill,
        o.parked,
        if o.parked > 0 { " (see `keap-sync failures list`)" } else { "" }
    ));
    if o.captured > 0 {
        let at_least = if o.captured >= crate::status::CAPTURED_COUNT_LIMIT { "at least " } else { "" };
        line(format!(
            "captured, not yet queued: {at_least}{} changes (a running daemon queues them)",
            o.captured
        ));
    }
    line(match s.oldest_pending_age_secs {
        Some(age) => format!("oldest pending change: {}", human_secs(age)),
        None => "oldest pending change: none (all delivered)".into(),
    });
    line(match s.last_delivery_secs_ago {
        Some(ago) => format!("last delivery: {} ago", human_secs(ago)),
        None => "last delivery: never".into(),
    });
    if let Some(b) = &s.backfill {
        line(format!("backfill: {} — {}", b.state.as_str(), progress(b, 0.0)));
    }
    line(mirror(&s.mirror));
    if let Some(h) = hooks(&s.hooks) {
        line(h);
    }
    if let Some(c) = conflicts(&s.conflicts) {
        line(c);
    }
    if let Some(t) = &s.token {
        line(format!(
            "keap app: {}",
            t.account.as_deref().unwrap_or("unknown (the grant's scope names none)")
        ));
    }
    match &s.token {
        Some(t) if t.state == GrantState::Ok => line(format!(
            "oauth: ok; access token expires in {}; refresh token {} old",
            human_secs(t.expires_in_secs.max(0.0)),
            human_secs(t.refresh_token_age_secs)
        )),
        Some(t) => line(format!(
            "oauth: RE-AUTHORISATION NEEDED: {}; run `keap-sync auth login`",
            t.detail.as_deref().unwrap_or("the grant was refused")
        )),
        None => line("oauth: no grant stored (fine with an API key)".into()),
    }
    if let (Some(m), Some(d)) = (s.quota_minute_available, s.quota_day_available) {
        line(format!("keap quota left: {m} this minute, {d} today"));
    }
    if s.instances_alive.is_empty() {
        line("instances: none running".into());
    }
    for i in &s.instances_alive {
        line(format!(
            "instance {}: {}{}, seen {} ago, {} answered 429 since start",
            i.instance,
            match i.role {
                InstanceRole::Active => "active",
                InstanceRole::Standby => "standby",
            },
            i.paused_reason.as_deref().map(|r| format!(" (PAUSED: {r})")).unwrap_or_default(),
            human_secs(i.last_seen_secs_ago),
            i.throttled
        ));
    }
    out
}

/// `keap-sync preview`: per user, the action, the calls with their JSON, problems and notes;
/// then a count per action.
pub(crate) fn plans(plans: &[Plan]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in plans {
        *counts.entry(p.action).or_default() += 1;
        let contact = p.contact_id.map_or_else(String::new, |id| format!(" (contact {id})"));
        let _ = writeln!(out, "user {}{contact}: {}", p.user, p.action.replace('_', "-"));
        if let Some(problem) = &p.problem {
            let _ = writeln!(out, "  problem: {problem}");
        }
        if !p.changed.is_empty() {
            let _ = writeln!(out, "  changed: {}", p.changed.join(", "));
        }
        for c in &p.calls {
            let _ = writeln!(out, "  {} {}", c.method, c.path);
            if let Some(body) = &c.body {
                let _ = writeln!(out, "    {body}");
            }
        }
        for n in &p.notes {
            let _ = writeln!(out, "  note: {n}");
        }
    }
    let summary: Vec<String> = counts.iter().map(|(a, n)| format!("{n} {}", a.replace('_', "-"))).collect();
    let _ = writeln!(
        out,
        "{} user(s): {}",
        plans.len(),
        if summary.is_empty() { "none".into() } else { summary.join(", ") }
    );
    out
}

/// The hooks' line of `status` (`None` when none are recorded): each of ours with its state,
/// a warning when one is not Verified.
fn hooks(hooks: &[crate::status::HookHealth]) -> Option<String> {
    let oldest = hooks
        .iter()
        .map(|h| h.checked_secs_ago)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))))?;
    let each: Vec<String> = hooks.iter().map(|h| format!("{} {}", h.event_key, h.status)).collect();
    let bad = hooks.iter().any(|h| h.status != crate::hooks::VERIFIED);
    let warn = if bad { " (NOT ALL VERIFIED: the sweep runs faster; `keap-sync hooks verify`)" } else { "" };
    Some(format!(
        "keap hooks: {}{warn}; at {} (checked {} ago)",
        each.join(", "),
        hooks[0].url,
        human_secs(oldest)
    ))
}

/// The conflicts' line of `status`, once there was one.
fn conflicts(c: &crate::status::Conflicts) -> Option<String> {
    let ago = c.last_secs_ago?;
    Some(format!(
        "conflicts over shared properties: {} ({} in the last day, the last {} ago): keap_sync.conflict",
        c.total,
        c.last_day,
        human_secs(ago)
    ))
}

/// The mirror's line of `status`: how many contacts, how far behind Keap, the last reconcile.
fn mirror(m: &crate::mirror::Freshness) -> String {
    let mut text = match (m.behind_secs, m.listing) {
        (None, true) => format!("mirror of Keap: first listing under way, {} contacts so far", m.contacts),
        (None, false) => "mirror of Keap: never listed (`keap-sync reconcile`, or the daemon's sweep)".into(),
        (Some(behind), _) => format!(
            "mirror of Keap: {} contacts, Keap's changes in up to {} ago",
            m.contacts,
            human_secs(behind)
        ),
    };
    if let Some(ago) = m.listed_secs_ago {
        text.push_str(&format!(" (last full listing {} ago)", human_secs(ago)));
    }
    if let (Some(ago), Some(users), Some(drift)) = (m.reconciled_secs_ago, m.reconciled_users, &m.drift) {
        let counts: Vec<String> = drift
            .as_object()
            .into_iter()
            .flatten()
            .map(|(class, n)| format!("{n} {}", class.replace('_', " ")))
            .collect();
        let found = if counts.is_empty() { "all in sync".to_owned() } else { counts.join(", ") };
        text.push_str(&format!("; last reconcile {} ago, {users} users: {found}", human_secs(ago)));
    }
    if m.gone > 0 {
        text.push_str(&format!(
            "; {} linked contact(s) found gone in Keap (deleted or merged; their users linked again by \
             email): keap_sync.contact_gone",
            m.gone
        ));
    }
    text
}

/// `keap-sync reconcile`'s first line, once the mirror is up to date.
pub(crate) fn reconcile_listing(l: &crate::reconcile::Listing) -> String {
    format!(
        "reconcile: mirror refreshed: {} contacts in {} list calls, {} gone from Keap\n",
        l.contacts, l.pages, l.removed
    )
}

/// One user not in sync, as `keap-sync reconcile` prints it as it is found: its class, what
/// differs, and (with `--show-values`) each differing value on a line of its own.
pub(crate) fn drift(d: &crate::reconcile::Drift) -> String {
    use crate::reconcile::Class;
    let contact = d.contact_id.map(|id| format!(" (contact {id})")).unwrap_or_default();
    let what = match d.class {
        Class::InSync => "in sync",
        Class::Differs => "differs in Keap",
        Class::ContactGone => "contact gone from Keap",
        Class::NoContact => "no contact yet",
        Class::Unlinked => "not linked yet; Keap has a contact with its address",
        Class::Parked => "parked (see `keap-sync failures`)",
        Class::Duplicates => "several contacts have its address as EMAIL1: merge them in Keap",
    };
    let differs = if d.differs.is_empty() { String::new() } else { format!(": {}", d.differs.join(", ")) };
    let mut out = format!("user {}{contact}: {what}{differs}\n", d.user);
    for v in &d.values {
        out.push_str(&format!("    {}: table {}, Keap {}\n", v.path, v.table, v.keap));
    }
    out
}

/// `keap-sync reconcile`'s last lines: the counts (by class), then with `--apply` what was
/// queued and what only a person can repair.
pub(crate) fn reconcile_summary(r: &crate::reconcile::Report, apply: bool) -> String {
    let by_class: Vec<String> =
        r.counts.iter().map(|(class, n)| format!("{n} {}", class.as_str().replace('_', " "))).collect();
    let mut out = format!(
        "reconcile: {} users, {} in sync, {} not{}\n",
        r.users,
        r.in_sync,
        r.drifted(),
        if by_class.is_empty() { String::new() } else { format!(": {}", by_class.join(", ")) }
    );
    if apply {
        out.push_str(&format!(
            "queued {} users for delivery (the daemon sends the repairs); {} need a person\n",
            r.queued,
            r.need_a_person()
        ));
    }
    out
}

/// `keap-sync doctor`: one line per check with its mark (✓ met, ⚠ warning, ✗ failed, - skipped),
/// the fix under a warning or a failure, then the counts.
pub(crate) fn doctor(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let mark = match c.outcome {
            Outcome::Ok => "✓",
            Outcome::Warn => "⚠",
            Outcome::Fail => "✗",
            Outcome::Skipped => "-",
        };
        out.push_str(&format!("{mark} {}: {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("    fix: {fix}\n"));
        }
    }
    out.push_str(&format!(
        "{} checks: {} ok, {} warning(s), {} failed, {} skipped\n",
        report.checks.len(),
        report.count(Outcome::Ok),
        report.count(Outcome::Warn),
        report.count(Outcome::Fail),
        report.count(Outcome::Skipped)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::BackfillState;

    #[test]
    fn doctor_marks_each_line_and_puts_the_fix_under_it() {
        use crate::doctor::Check;
        let check = |name, outcome, fix: Option<&str>| Check {
            name,
            outcome,
            detail: format!("{name} detail"),
            fix: fix.map(str::to_owned),
        };
        let report = Report {
            checks: vec![
                check("config", Outcome::Ok, None),
                check("privileges", Outcome::Warn, Some("use a least-privilege role")),
                check("schema", Outcome::Fail, Some("run `keap-sync migrate`")),
                check("queue", Outcome::Skipped, None),
            ],
        };
        assert_eq!(
            doctor(&report),
            "✓ config: config detail\n\
             ⚠ privileges: privileges detail\n    fix: use a least-privilege role\n\
             ✗ schema: schema detail\n    fix: run `keap-sync migrate`\n\
             - queue: queue detail\n\
             4 checks: 1 ok, 1 warning(s), 1 failed, 1 skipped\n"
        );
    }

    #[test]
    fn progress_text() {
        let p =
            Progress { state: BackfillState::Enqueued, enqueued: 1000, total: 1000, pending: 750, parked: 0 };
        assert_eq!(progress(&p, 50.0), "250 / 1000 users (25%), 50/s, about 15 s left");
        let p = Progress { parked: 2, pending: 0, ..p };
        assert_eq!(progress(&p, 0.0), "998 / 1000 users (99%), 0/s, 2 parked");
    }
}
