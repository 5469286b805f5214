//! Running the server's programs as the right user: as is, or dropping root to `postgres`
//! through `runuser`, `setpriv` or `su`; the private directory and log file it may use.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::binaries::find_tool;
use super::quote::shell_quote;
use super::{ClusterError, MAX_SOCKET_PATH, PORT, SERVER_OS_USER};

/// How server-side commands are run.
#[derive(Debug)]
pub(super) enum Runner {
    /// Not root: run directly.
    CurrentUser,
    /// Root: run as the server's OS user through a privilege-drop tool.
    AsServerUser { uid: u32, gid: u32, tool: PrivilegeDrop },
}

#[derive(Debug)]
pub(super) enum PrivilegeDrop {
    /// util-linux `runuser -u USER -- CMD...`: made for root dropping privileges, no PAM auth.
    Runuser(PathBuf),
    /// util-linux `setpriv --reuid --regid --init-groups -- CMD...`: no PAM at all.
    Setpriv(PathBuf),
    /// `su -s /bin/sh USER -c 'CMD'`: everywhere, but needs the command quoted for the shell.
    Su(PathBuf),
}

impl Runner {
    pub(super) fn detect() -> Result<Runner, ClusterError> {
        if effective_uid()? != 0 {
            return Ok(Runner::CurrentUser);
        }
        let uid = lookup_id(SERVER_OS_USER, "-u")?;
        let gid = lookup_id(SERVER_OS_USER, "-g")?;
        let tool = if let Some(path) = find_tool("runuser") {
            PrivilegeDrop::Runuser(path)
        } else if let Some(path) = find_tool("setpriv") {
            PrivilegeDrop::Setpriv(path)
        } else if let Some(path) = find_tool("su") {
            PrivilegeDrop::Su(path)
        } else {
            return Err(ClusterError::NoPrivilegeDropTool { user: SERVER_OS_USER });
        };
        Ok(Runner::AsServerUser { uid, gid, tool })
    }

    /// The owner files must have for the server to use them, if not ourselves.
    pub(super) fn owner(&self) -> Option<(u32, u32)> {
        match self {
            Runner::CurrentUser => None,
            Runner::AsServerUser { uid, gid, .. } => Some((*uid, *gid)),
        }
    }

    pub(super) fn command(&self, program: &Path, args: &[OsString]) -> Command {
        match self {
            Runner::CurrentUser => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Runuser(runuser), .. } => {
                let mut command = Command::new(runuser);
                command.args(["-u", SERVER_OS_USER, "--"]).arg(program).args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Setpriv(setpriv), uid, gid } => {
                let mut command = Command::new(setpriv);
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--init-groups", "--"])
                    .arg(program)
                    .args(args);
                command
            }
            Runner::AsServerUser { tool: PrivilegeDrop::Su(su), .. } => {
                let mut line = shell_quote(program.as_os_str());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(arg));
                }
                let mut command = Command::new(su);
                command.args(["-s", "/bin/sh", SERVER_OS_USER, "-c"]).arg(line);
                command
            }
        }
    }
}

/// The effective uid, from `/proc/self/status` (no `unsafe` `geteuid` call),
/// falling back to `id -u` where `/proc` is unavailable.
pub(super) fn effective_uid() -> Result<u32, ClusterError> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    run_id(&["-u"]).map_err(|detail| ClusterError::Spawn {
        command: "id -u".to_owned(),
        source: io::Error::other(detail),
    })
}

/// Look up the server user's uid (`-u`) or gid (`-g`) via `id`, which goes
/// through NSS like everything else on the system.
pub(super) fn lookup_id(user: &'static str, flag: &str) -> Result<u32, ClusterError> {
    run_id(&[flag, user]).map_err(|detail| ClusterError::NoServerUser { user, detail })
}

pub(super) fn run_id(args: &[&str]) -> Result<u32, String> {
    let output = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run `id`: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`id {}` failed: {}", args.join(" "), stderr.trim()));
    }
    stdout.trim().parse().map_err(|_| format!("`id {}` printed {:?}", args.join(" "), stdout.trim()))
}

/// Create a new, uniquely named directory under the system temp directory,
/// private to (and, as root, owned by) the server's OS user.
///
/// The name combines pid, a process-wide counter and the clock, and
/// `create_dir` fails rather than reuse an existing directory, so parallel
/// test binaries and leftovers can never collide. If the temp directory's path
/// is too long for a Unix socket path, `/tmp` is used instead.
pub(super) fn create_private_dir(runner: &Runner) -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let socket_name_len = format!("/.s.PGSQL.{PORT}").len();
    let mut base = std::env::temp_dir();
    // Allow for the longest name generated below (pid, counter, nanoseconds).
    if base.as_os_str().len() + "/keap-pg-".len() + 3 * 20 + 2 + socket_name_len > MAX_SOCKET_PATH {
        base = PathBuf::from("/tmp");
    }
    let pid = std::process::id();
    let mut attempts = 0;
    let dir = loop {
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.subsec_nanos());
        let dir = base.join(format!("keap-pg-{pid}-{count}-{nanos}"));
        match fs::create_dir(&dir) {
            Ok(()) => break dir,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                attempts += 1;
            }
            Err(source) => return Err(ClusterError::Io { action: "create directory", path: dir, source }),
        }
    };
    let prepared = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| ClusterError::Io { action: "set permissions of", path: dir.clone(), source })
        .and_then(|()| chown_for_server(&dir, runner));
    if let Err(error) = prepared {
        // Best effort: the directory is empty and of no use to anybody.
        let _ = fs::remove_dir(&dir);
        return Err(error);
    }
    Ok(dir)
}

pub(super) fn chown_for_server(path: &Path, runner: &Runner) -> Result<(), ClusterError> {
    match runner.owner() {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| {
            ClusterError::Io { action: "hand over to the postgres user", path: path.to_owned(), source }
        }),
        None => Ok(()),
    }
}

/// Open (creating if needed) the server log for appending; as root it is
/// handed to the server user, whose watchdog deletes the directory later.
pub(super) fn open_log(path: &Path, runner: &Runner) -> Result<File, ClusterError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ClusterError::Io { action: "open server log", path: path.to_owned(), source })?;
    if let Some((uid, _)) = runner.owner() {
        let owned = file.metadata().is_ok_and(|meta| meta.uid() == uid);
        if !owned {
            chown_for_server(path, runner)?;
        }
    }
    Ok(file)
}
