//! `keap-sync reconcile`: the report written as it arrives. The mirror's listing is one line
//! (text) or the document's head (JSON); each user not in sync is written as it is found; the
//! counts come last. `--json` is still one JSON document (`listing`, `drift`, `users`,
//! `in_sync`, `queued`, `counts`), written piece by piece: nothing the report finds is held
//! until the end, so a reconcile of a million unlinked users needs no more memory than one of
//! a million users in sync. A run that fails half-way leaves a document cut short, and exits
//! with an error on standard error.

use std::io::{self, BufWriter, Write};

use serde::Serialize;

use super::{render, CliError};
use crate::config::Config;
use crate::reconcile::{self, Drift, Listing, ReconcileError, ReconcileOptions, Report, ReportSink};

/// Runs the report over `keys` (every user when empty), printing it to standard output.
pub(super) async fn run(
    config: Config,
    keys: &[String],
    options: ReconcileOptions,
    json: bool,
) -> Result<(), CliError> {
    let mut printer = Printer::new(BufWriter::with_capacity(64 * 1024, io::stdout()), json);
    let report = reconcile::reconcile(&config, keys, options, &mut printer).await.map_err(|e| match e {
        ReconcileError::Config(e) => CliError::Config(e),
        ReconcileError::Schema(e) => CliError::Schema(e),
        ReconcileError::Db(e) => CliError::Db(e),
        other => CliError::Other(other.to_string()),
    })?;
    printer
        .finish(&report, options.apply)
        .map_err(|e| CliError::Other(format!("cannot write the report to standard output: {e}")))
}

/// The report as text or as one JSON document, written to `out` as it arrives.
pub(super) struct Printer<W: Write> {
    out: W,
    json: bool,
    /// Drifts written so far (in JSON, every one after the first follows a comma).
    written: u64,
    /// The first write that failed: later ones are skipped, and [`Printer::finish`] returns it
    /// (the report itself runs to its end, so `--apply` queues every repairable user).
    failed: Option<io::Error>,
}

impl<W: Write> Printer<W> {
    pub(super) fn new(out: W, json: bool) -> Self {
        Printer { out, json, written: 0, failed: None }
    }

    /// Writes the counts (and with `apply` what was queued) and flushes.
    pub(super) fn finish(mut self, report: &Report, apply: bool) -> io::Result<()> {
        let tail = match self.json {
            true => self.json_of(&report.counts).map(|counts| {
                format!(
                    "\n],\n\"users\": {}, \"in_sync\": {}, \"queued\": {}, \"counts\": {counts}}}\n",
                    report.users, report.in_sync, report.queued
                )
            }),
            false => Some(render::reconcile_summary(report, apply)),
        };
        if let Some(tail) = tail {
            self.write(&tail);
        }
        match self.failed.take() {
            Some(e) => Err(e),
            None => self.out.flush(),
        }
    }

    fn write(&mut self, text: &str) {
        if self.failed.is_none() {
            if let Err(e) = self.out.write_all(text.as_bytes()) {
                self.failed = Some(e);
            }
        }
    }

    /// `value` as compact JSON; `None`, the failure kept, if it cannot be (it always can: keys
    /// are strings).
    fn json_of(&mut self, value: &impl Serialize) -> Option<String> {
        match serde_json::to_string(value) {
            Ok(text) => Some(text),
            Err(e) => {
                self.failed.get_or_insert(io::Error::other(e));
                None
            }
        }
    }
}

impl<W: Write> ReportSink for Printer<W> {
    fn listed(&mut self, listing: &Listing) {
        let head = match self.json {
            true => self.json_of(listing).map(|l| format!("{{\"listing\": {l},\n\"drift\": [")),
            false => Some(render::reconcile_listing(listing)),
        };
        if let Some(head) = head {
            self.write(&head);
        }
        // The listing can take minutes: say at once that it is done.
        if let Err(e) = self.out.flush() {
            self.failed.get_or_insert(e);
        }
    }

    fn drift(&mut self, drift: Drift) {
        let text = match self.json {
            true => {
                self.json_of(&drift).map(|d| format!("{}\n  {d}", if self.written == 0 { "" } else { "," }))
            }
            false => Some(render::drift(&drift)),
        };
        self.written += 1;
        if let Some(text) = text {
            self.write(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Class, Difference};

    fn drifts() -> Vec<Drift> {
        vec![
            Drift {
                user: "1".into(),
                class: Class::Differs,
                contact_id: Some(11),
                differs: vec!["given_name".into()],
                values: vec![Difference {
                    path: "given_name".into(),
                    table: "Ann".into(),
                    keap: "Anne \"A\"\nB".into(),
                }],
            },
            Drift {
                user: "2".into(),
                class: Class::NoContact,
                contact_id: None,
                differs: vec![],
                values: vec![],
            },
            Drift {
                user: "3".into(),
                class: Class::NoContact,
                contact_id: None,
                differs: vec![],
                values: vec![],
            },
        ]
    }

    /// Prints a report of `found` (every one of 10 users not in `found` in sync) as the CLI does.
    fn printed(found: &[Drift], json: bool, apply: bool) -> String {
        let mut out = Vec::new();
        let mut printer = Printer::new(&mut out, json);
        let listing = Listing { pages: 2, contacts: 1_500, removed: 1 };
        let mut report = Report { listing, users: 10, in_sync: 10 - found.len() as u64, ..Report::default() };
        printer.listed(&listing);
        for d in found {
            *report.counts.entry(d.class).or_default() += 1;
            printer.drift(d.clone());
        }
        report.queued = if apply { found.len() as u64 } else { 0 };
        printer.finish(&report, apply).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_json_report_is_one_document_with_every_drift_in_order() {
        for found in [drifts(), Vec::new(), drifts()[..1].to_vec()] {
            let text = printed(&found, true, false);
            let doc: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{text}"));
            assert_eq!(doc["listing"], serde_json::json!({"pages": 2, "contacts": 1500, "removed": 1}));
            assert_eq!(doc["drift"], serde_json::to_value(&found).unwrap(), "{text}");
            assert_eq!(
                (doc["users"].as_u64(), doc["in_sync"].as_u64()),
                (Some(10), Some(10 - found.len() as u64))
            );
            assert_eq!(doc["queued"], 0);
            let no_contact = found.iter().filter(|d| d.class == Class::NoContact).count();
            assert_eq!(doc["counts"]["no_contact"].as_u64().unwrap_or(0), no_contact as u64, "{text}");
            assert_eq!(doc["counts"].get("in_sync"), None);
        }
    }

    #[test]
    fn the_text_report_prints_the_listing_then_each_drift_then_the_counts() {
        let text = printed(&drifts(), false, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "reconcile: mirror refreshed: 1500 contacts in 2 list calls, 1 gone from Keap",
                "user 1 (contact 11): differs in Keap: given_name",
                "    given_name: table \"Ann\", Keap \"Anne \\\"A\\\"\\nB\"",
                "user 2: no contact yet",
                "user 3: no contact yet",
                "reconcile: 10 users, 7 in sync, 3 not: 1 differs, 2 no contact",
                "queued 3 users for delivery (the daemon sends the repairs); 0 need a person",
            ]
        );
    }

    /// A write that fails (a closed pipe) is reported once the report has run to its end.
    #[test]
    fn a_failed_write_is_returned_by_finish() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut printer = Printer::new(Closed, false);
        printer.listed(&Listing::default());
        printer.drift(drifts().remove(0));
        let err = printer.finish(&Report::default(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
