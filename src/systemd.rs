//! Running under systemd: readiness and watchdog notifications, and log lines the journal
//! understands. The notify protocol is one datagram per message on a Unix socket, and journal
//! priorities are a `<N>` prefix on each line of standard error.
//!
//! Why not the `sd-notify` crate: its 0.5.0 (the newest) hands `$NOTIFY_SOCKET` to
//! `UnixDatagram::connect` as a path, so an abstract socket (`@name`, which systemd hands to
//! services in containers and under `systemd-run --user`) cannot be reached, and it re-reads the
//! environment on every ping. [`Notifier`] parses the address once, abstract or path, with std
//! alone (`SocketAddrExt::from_abstract_name`), and is tested against both kinds of socket.
//!
//! Everything here is a no-op outside systemd (no `$NOTIFY_SOCKET`), and nothing here can make
//! the daemon fail: systemd is a supervisor we report to, not a dependency we need.
//!
//! With `Type=notify` systemd considers the service started only once it receives `READY=1`
//! (so `systemctl start` returns after the schema check and the first connection, not before),
//! and with `WatchdogSec=` it restarts the service if `WATCHDOG=1` stops arriving — which is only
//! meaningful if the ping comes from the loop that does the work, not from a free-running timer.

use std::fmt::{self, Write as _};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Talks to systemd's notify socket (`$NOTIFY_SOCKET`). Abstract socket names start with `@`
/// (systemd's notation for the leading NUL byte); anything else starting with `/` is a path.
/// A no-op when not under systemd, so callers never need to check whether it is.
///
/// `Send + Sync`: one notifier can be shared (e.g. in an `Arc`) by every task that reports.
pub(crate) struct Notifier {
    /// The socket we send from (unbound; systemd identifies us by our credentials, not an
    /// address) and where to send. `None` when not under systemd or the socket could not be made.
    target: Option<(UnixDatagram, SocketAddr)>,
    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the watchdog is ours.
    watchdog: Option<Duration>,
    /// Set after the first failed send, which is logged once at debug level.
    send_failed: AtomicBool,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("target", &self.target.as_ref().map(|(_, addr)| addr))
            .field("watchdog", &self.watchdog)
            .finish()
    }
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` as systemd sets them for a
    /// `Type=notify` service with `WatchdogSec=`.
    pub(crate) fn from_env() -> Notifier {
        let var = |name: &str| std::env::var(name).ok();
        Notifier::from_parts(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
        )
    }

    /// Builds a notifier from the values of the three variables (testable without touching the
    /// process environment). The watchdog is ignored when `watchdog_pid` is set and is not this
    /// process (the variables were inherited from a parent that systemd watches), when
    /// `watchdog_usec` is missing, zero or malformed, and when there is no socket to ping.
    pub(crate) fn from_parts(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Notifier {
        let target = socket.and_then(|s| {
            let addr = match parse_address(s) {
                Ok(addr) => addr,
                Err(e) => {
                    tracing::debug!(socket = s, error = %e, "ignoring NOTIFY_SOCKET");
                    return None;
                }
            };
            match UnixDatagram::unbound() {
                Ok(sock) => Some((sock, addr)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot create a socket for systemd notifications");
                    None
                }
            }
        });
        let ours = match watchdog_pid.map(str::trim) {
            None => true,
            Some(pid) => pid.parse::<u32>().is_ok_and(|pid| pid == std::process::id()),
        };
        let watchdog = watchdog_usec
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|&usec| usec > 0 && ours && target.is_some())
            .map(|usec| Duration::from_micros(usec) / 2);
        Notifier { target, watchdog, send_failed: AtomicBool::new(false) }
    }

    /// True when running under systemd with a notify socket.
    #[cfg(test)]
    fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: start-up is complete (with `Type=notify`, `systemctl start` waits for this).
    pub(crate) fn ready(&self) {
        self.send("READY=1");
    }

    /// `STATUS=…`: a one-line state shown by `systemctl status`. Newlines are replaced by spaces:
    /// the protocol separates assignments by newlines, so text must not be able to add one.
    pub(crate) fn status(&self, text: &str) {
        let line: String = text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
        self.send(&format!("STATUS={line}"));
    }

    /// `STOPPING=1`: shutdown has begun (`systemctl status` shows "deactivating"). Send it when
    /// the stop signal arrives, before waiting for calls in flight.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `WATCHDOG=1`: the service is alive. Send it from the work loop at least every half of
    /// `$WATCHDOG_USEC`; systemd kills and restarts the service when pings stop for
    /// `WatchdogSec=`.
    pub(crate) fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// How often to call [`Notifier::watchdog`]: half of `$WATCHDOG_USEC`, as systemd
    /// recommends, so one late ping is not fatal. `None` when there is no watchdog to feed.
    #[cfg(test)]
    fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message. Failures are not errors for the daemon — systemd may be restarting,
    /// or the variable may be stale — so the first one is logged at debug level and the rest
    /// are ignored silently (a watchdog ping every few seconds must not flood the log).
    fn send(&self, message: &str) {
        let Some((sock, addr)) = &self.target else { return };
        if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
            if !self.send_failed.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, "cannot notify systemd; further failures are not logged");
            }
        }
    }
}

/// `@name` → abstract socket `name`; `/path` → path socket. Other forms (e.g. `vsock:` from
/// newer systemd versions, for virtual machines) are not supported.
fn parse_address(s: &str) -> std::io::Result<SocketAddr> {
    if let Some(name) = s.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if s.starts_with('/') {
        SocketAddr::from_pathname(s)
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "neither a path nor an abstract name"))
    }
}

/// True when standard error is connected to the journal: systemd sets `$JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected, and that must still be our fd 2 (a child whose
/// stderr was redirected inherits the variable but not the stream). When fd 2's metadata cannot
/// be read (no `/proc` mounted, say) the variable is trusted; `ProtectProc=invisible` and
/// `ProcSubset=pid` still leave a process its own `/proc/self`.
///
/// Use it to pick [`JournalFormat`] for log lines when this returns true.
pub(crate) fn stderr_is_journal() -> bool {
    let var = std::env::var("JOURNAL_STREAM").ok();
    let stderr = std::fs::metadata("/proc/self/fd/2").ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    });
    journal_stream_matches(var.as_deref(), stderr)
}

/// Whether `$JOURNAL_STREAM` names stderr's device and inode; trusted as is when stderr's cannot be
/// read.
fn journal_stream_matches(var: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let Some((dev, ino)) = var.and_then(|v| v.trim().split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match stderr {
        Some(actual) => actual == (dev, ino),
        None => true,
    }
}

/// A `tracing_subscriber` event formatter for the journal. Each line starts with the syslog
/// priority prefix — `<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace — which
/// systemd strips and records as the entry's priority (`SyslogLevelPrefix=yes`, the default),
/// so `journalctl -p warning` works. No timestamp (the journal adds its own) and no colours
/// (escape codes are removed even if the layer was built with ANSI on). Then the spans, if any,
/// as `name{fields}: `, the message and the fields as `key=value`.
///
/// The journal makes one entry per line, so a multi-line message (a `Display` of a nested
/// error, say) becomes several entries; each gets the prefix, so none is filed at the default
/// priority.
///
/// ```text
/// tracing_subscriber::fmt().with_ansi(false).event_format(JournalFormat).with_writer(std::io::stderr)
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let prefix = priority_prefix(event.metadata().level());
        let mut line = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                line.push_str(span.name());
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                    write!(line, "{{{fields}}}")?;
                }
                line.push_str(": ");
            }
        }
        ctx.format_fields(Writer::new(&mut line), event)?;
        let line = strip_ansi(&line);
        for part in line.trim_end_matches(['\n', '\r']).split('\n') {
            writeln!(writer, "{prefix}{}", part.trim_end_matches('\r'))?;
        }
        Ok(())
    }
}

/// The journal's syslog priority prefix for a log level (debug and trace both `<7>`).
fn priority_prefix(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// Removes CSI escape sequences (`ESC [ … final-byte`), which the journal would store verbatim.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // parameter and intermediate bytes, then one final byte in '@'..='~'
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("keap-sync-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifier_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Notifier>();
    }

    #[test]
    fn sends_ready_status_watchdog_and_stopping_to_a_path_socket() {
        let dir = TempDir::new("notify");
        let path = dir.0.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        let n = Notifier::from_parts(Some(path.to_str().unwrap()), Some("10000000"), None);
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));

        n.ready();
        assert_eq!(receive(&sock), "READY=1");
        n.status("delivering\n3 queued\r\nREADY=1");
        assert_eq!(receive(&sock), "STATUS=delivering 3 queued  READY=1");
        n.watchdog();
        assert_eq!(receive(&sock), "WATCHDOG=1");
        n.stopping();
        assert_eq!(receive(&sock), "STOPPING=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("keap-sync-test-{}-{:?}", std::process::id(), std::thread::current().id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        let n = Notifier::from_parts(Some(&format!("@{name}")), None, None);
        assert!(n.is_enabled());
        n.ready();
        assert_eq!(receive(&sock), "READY=1");
    }

    #[test]
    fn watchdog_pid_decides_whose_watchdog_it_is() {
        let dir = TempDir::new("watchdog");
        let path = dir.0.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let path = path.to_str().unwrap();

        let other_pid = (std::process::id() + 1).to_string();
        let n = Notifier::from_parts(Some(path), Some("10000000"), Some(&other_pid));
        assert!(n.is_enabled(), "notifications still go out");
        assert_eq!(n.watchdog_interval(), None);
        n.watchdog();
        assert_eq!(sock.recv(&mut [0u8; 64]).unwrap_err().kind(), io::ErrorKind::WouldBlock, "no ping sent");

        let own_pid = std::process::id().to_string();
        let n = Notifier::from_parts(Some(path), Some("10000000"), Some(&own_pid));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));

        for usec in ["0", "soon", ""] {
            let n = Notifier::from_parts(Some(path), Some(usec), None);
            assert_eq!(n.watchdog_interval(), None, "WATCHDOG_USEC={usec:?}");
        }
    }

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        for socket in [None, Some(""), Some("relative/path"), Some("vsock:2:1234")] {
            let n = Notifier::from_parts(socket, Some("10000000"), None);
            assert!(!n.is_enabled(), "{socket:?}");
            assert_eq!(n.watchdog_interval(), None, "no watchdog without a socket");
            n.ready();
            n.status("x");
            n.watchdog();
            n.stopping();
        }
    }

    #[test]
    fn a_vanished_socket_is_not_an_error() {
        let dir = TempDir::new("gone");
        let path = dir.0.join("notify.sock");
        let n = Notifier::from_parts(Some(path.to_str().unwrap()), None, None);
        assert!(n.is_enabled());
        n.ready(); // nobody listening: logged once at debug, otherwise ignored
        n.ready();
        assert!(n.send_failed.load(Ordering::Relaxed));
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(journal_stream_matches(Some("8:12345"), Some((8, 12345))));
        assert!(!journal_stream_matches(Some("8:12345"), Some((8, 999))), "stderr was redirected");
        assert!(journal_stream_matches(Some("8:12345"), None), "unreadable fd 2: trust the variable");
        assert!(!journal_stream_matches(None, Some((8, 12345))));
        assert!(!journal_stream_matches(Some("garbage"), None));
        assert!(!journal_stream_matches(Some("8:x"), None));
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn format_with_journal(ansi: bool, emit: impl FnOnce()) -> String {
        let buf = Buffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .event_format(JournalFormat)
            .with_max_level(Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn journal_format_prefixes_the_priority() {
        let out = format_with_journal(false, || {
            tracing::warn!(user = "42", attempts = 3, "Keap answered 429");
        });
        assert_eq!(out, "<4>Keap answered 429 user=\"42\" attempts=3\n");

        let out = format_with_journal(false, || {
            tracing::error!("e");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        assert_eq!(out, "<3>e\n<6>i\n<7>d\n<7>t\n");
    }

    #[test]
    fn journal_format_has_no_colours_and_prefixes_every_line() {
        let out = format_with_journal(true, || {
            let span = tracing::info_span!("session", n = 2);
            let _guard = span.enter();
            tracing::error!(error = %"line one\nline two", "lost the connection");
        });
        assert!(!out.contains('\x1b'), "{out:?}");
        assert_eq!(out, "<3>session{n=2}: lost the connection error=line one\n<3>line two\n");
    }

    #[test]
    fn strips_escape_sequences() {
        assert_eq!(strip_ansi("\x1b[3mkey\x1b[0m\x1b[2m=\x1b[0mvalue"), "key=value");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
