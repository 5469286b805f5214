//! Tests of the throwaway cluster: start, connect, stop and restart, and clean-up after a kill.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::process::Command;

use super::*;
use super::{binaries::*, quote::*, runner::*};

async fn query_one_int(conninfo: &str, sql: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    let connection = tokio::spawn(connection);
    let value: i64 = client.query_one(sql, &[]).await.expect("query").get(0);
    drop(client);
    let _ = connection.await;
    value
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie has an empty cmdline.
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
}

fn postmaster_pid(cluster: &Cluster) -> u32 {
    let contents = fs::read_to_string(cluster.data_dir().join("postmaster.pid")).expect("postmaster.pid");
    contents
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("pid on the first line of postmaster.pid")
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_databases_stop_restart_drop() {
    let started = Instant::now();
    let cluster = Cluster::start().expect("start cluster");
    eprintln!("Cluster::start took {:?}", started.elapsed());
    assert!(cluster.is_running());
    let root = cluster.socket_dir().to_owned();
    assert!(root.join(format!(".s.PGSQL.{}", cluster.port())).exists());

    let created = Instant::now();
    let first = cluster.create_database("alpha").await.expect("create alpha");
    let second = cluster.fresh_database("beta").await.expect("create beta");
    eprintln!("two CREATE DATABASE took {:?}", created.elapsed());
    assert!(second.contains("dbname=beta_"), "{second}");
    assert_eq!(first, cluster.conninfo("alpha"));

    for (conninfo, value) in [(&first, 1_i64), (&second, 2)] {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE TABLE t (v bigint); INSERT INTO t VALUES ({value})"))
            .await
            .expect("create table");
        drop(client);
        let _ = connection.await;
    }
    assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);
    assert_eq!(query_one_int(&second, "SELECT v FROM t").await, 2);
    // The URL form reaches the same database.
    assert_eq!(query_one_int(&cluster.url("alpha"), "SELECT v FROM t").await, 1);

    let old_pid = postmaster_pid(&cluster);
    let stopped = Instant::now();
    cluster.stop().expect("stop");
    eprintln!("stop took {:?}", stopped.elapsed());
    assert!(!cluster.is_running());
    assert!(!process_alive(old_pid), "postmaster {old_pid} survived stop");
    assert!(cluster.data_dir().join("PG_VERSION").exists(), "data kept");
    assert!(tokio_postgres::connect(&first, NoTls).await.is_err());
    cluster.stop().expect("stopping twice is a no-op");

    let restarted = Instant::now();
    cluster.restart().expect("restart");
    eprintln!("restart took {:?}", restarted.elapsed());
    assert!(cluster.is_running());
    assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);
    assert_eq!(query_one_int(&second, "SELECT v FROM t").await, 2);

    // Restarting a running server stops it first.
    let pid_before = postmaster_pid(&cluster);
    cluster.restart().expect("restart while running");
    assert_ne!(postmaster_pid(&cluster), pid_before);
    assert!(!process_alive(pid_before));
    assert_eq!(query_one_int(&first, "SELECT v FROM t").await, 1);

    let pid = postmaster_pid(&cluster);
    let dropped = Instant::now();
    drop(cluster);
    eprintln!("drop took {:?}", dropped.elapsed());
    assert!(!root.exists(), "{} not removed", root.display());
    assert!(!process_alive(pid), "postmaster {pid} survived drop");
}

#[test]
fn drop_after_stop_removes_directory() {
    let cluster = Cluster::start().expect("start cluster");
    let root = cluster.socket_dir().to_owned();
    cluster.stop().expect("stop");
    drop(cluster);
    assert!(!root.exists());
}

#[test]
fn is_running_notices_a_crashed_server() {
    let cluster = Cluster::start().expect("start cluster");
    send_signal(postmaster_pid(&cluster), "KILL");
    assert!(wait_until(Duration::from_secs(10), || !cluster.is_running()));
    // The stale postmaster.pid must not be mistaken for the new server's.
    cluster.restart().expect("restart after crash");
    assert!(cluster.is_running());
}

#[test]
fn failed_start_reports_the_server_log() {
    let cluster = Cluster::start().expect("start cluster");
    cluster.stop().expect("stop");
    let mut conf = OpenOptions::new()
        .append(true)
        .open(cluster.data_dir().join("postgresql.conf"))
        .expect("open postgresql.conf");
    writeln!(conf, "no_such_setting = 1").expect("write postgresql.conf");
    let started = Instant::now();
    let error = cluster.restart().unwrap_err();
    assert!(started.elapsed() < READY_TIMEOUT, "did not fail fast");
    let message = error.to_string();
    assert!(matches!(error, ClusterError::StartFailed { .. }), "{message}");
    assert!(message.contains("no_such_setting"), "{message}");
    assert!(!cluster.is_running());
}

#[test]
fn failed_initdb_reports_its_output() {
    let cluster = Cluster::start().expect("start cluster");
    let initdb = find_binaries().expect("binaries").initdb;
    // The data directory is in use and not empty: initdb must refuse.
    let error = cluster.initdb(&initdb, Vec::new()).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ClusterError::CommandFailed { .. }), "{message}");
    assert!(message.contains("initdb"), "{message}");
    assert!(message.contains("not empty"), "{message}");
    assert!(cluster.is_running(), "the running server is untouched");
}

#[tokio::test]
async fn rejects_bad_database_names() {
    let cluster = Cluster::start().expect("start cluster");
    for name in ["", "Upper", "semi;colon", "quo\"te", &"x".repeat(64)] {
        let error = cluster.create_database(name).await.unwrap_err();
        assert!(matches!(error, ClusterError::InvalidDatabaseName { .. }), "{name:?}: {error}");
    }
    // Duplicate names are reported by the server, with context.
    cluster.create_database("dup").await.expect("first");
    let error = cluster.create_database("dup").await.unwrap_err();
    assert!(error.to_string().contains("\"dup\""), "{error}");
}

#[test]
fn connection_strings() {
    assert_eq!(conninfo_value("/tmp/x"), "/tmp/x");
    assert_eq!(conninfo_value("/tmp/a b"), "'/tmp/a b'");
    assert_eq!(conninfo_value(r"it's\"), r"'it\'s\\'");
    assert_eq!(conninfo_value(""), "''");
    assert_eq!(percent_encode("/tmp/keap-pg-1_2.x"), "%2Ftmp%2Fkeap-pg-1_2.x");
    assert_eq!(quote_guc_list_item(r#"/a,"b""#), r#""/a,""b""""#);
    assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
    assert_eq!(pid_file_status("1\n/d\n2\n5432\n/s\n\n3 4\nready   \n"), Some("ready"));
    assert_eq!(pid_file_status("1\n/d\n2\n5432\n"), None);
}

/// Each privilege-drop tool must run the command as the server user and
/// pass our stdin through (the watchdog depends on it); then a whole
/// cluster lifecycle must work through it. Only meaningful as root.
#[tokio::test]
async fn every_privilege_drop_tool_works() {
    if effective_uid().expect("uid") != 0 {
        eprintln!("not root: skipping privilege-drop tools test");
        return;
    }
    let uid = lookup_id(SERVER_OS_USER, "-u").expect("postgres uid");
    let gid = lookup_id(SERVER_OS_USER, "-g").expect("postgres gid");
    let tools = [
        find_tool("runuser").map(PrivilegeDrop::Runuser),
        find_tool("setpriv").map(PrivilegeDrop::Setpriv),
        find_tool("su").map(PrivilegeDrop::Su),
    ];
    let mut tested = 0;
    for tool in tools.into_iter().flatten() {
        let label = format!("{tool:?}");
        let runner = Runner::AsServerUser { uid, gid, tool };
        let args: Vec<OsString> =
            vec!["-c".into(), r#"read -r x; echo "$(id -un) $x $1""#.into(), "sh".into(), "it's a b".into()];
        let mut child = runner
            .command(Path::new("/bin/sh"), &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        child.stdin.take().expect("stdin").write_all(b"hello\n").expect("write");
        let output = child.wait_with_output().expect("wait");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("{SERVER_OS_USER} hello it's a b"),
            "{label}"
        );

        let cluster = Cluster::start_with(runner).expect(&label);
        let root = cluster.socket_dir().to_owned();
        let conninfo = cluster.fresh_database("tool").await.expect(&label);
        assert_eq!(query_one_int(&conninfo, "SELECT 7::int8").await, 7, "{label}");
        cluster.restart().expect(&label);
        assert_eq!(query_one_int(&conninfo, "SELECT 8::int8").await, 8, "{label}");
        let pid = postmaster_pid(&cluster);
        drop(cluster);
        assert!(!root.exists(), "{label}");
        assert!(!process_alive(pid), "{label}");
        tested += 1;
    }
    assert!(tested > 0, "no privilege-drop tool found");
}

const CHILD_ENV: &str = "PGCLUSTER_WATCHDOG_TEST_CHILD";
const CHILD_MARKER: &str = "PGCLUSTER-CHILD-READY";

/// The child half of `server_dies_with_its_owner`: with the marker variable set it starts a
/// cluster, reports it, then waits to be SIGKILLed. In a normal run it does nothing.
#[test]
fn watchdog_child_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = Cluster::start().expect("start cluster");
    println!("{CHILD_MARKER} {} {}", postmaster_pid(&cluster), cluster.socket_dir().display());
    io::stdout().flush().expect("flush stdout");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The core promise of the watchdog: SIGKILL the owning process (no
/// destructors, no atexit) and the server and its directory still go away.
#[test]
fn server_dies_with_its_owner() {
    let this_module = module_path!().split_once("::").map_or(module_path!(), |(_crate, path)| path);
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            &format!("{this_module}::watchdog_child_process"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child test process");
    let stdout = child.stdout.take().expect("child stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // libtest prints "test <name> ... " on the same line before the output.
        .find_map(|line| line.split_once(CHILD_MARKER).map(|(_, rest)| rest.to_owned()));
    let Some(ready) = ready else {
        let _ = child.kill();
        panic!("child exited without starting a cluster: {:?}", child.wait());
    };
    let (pid, dir) = ready.trim().split_once(' ').expect("pid and dir");
    let pid: u32 = pid.parse().expect("pid");
    let dir = PathBuf::from(dir);
    assert!(process_alive(pid));

    child.kill().expect("SIGKILL child");
    child.wait().expect("reap child");
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(pid)),
        "postmaster {pid} outlived its SIGKILLed owner"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !dir.exists()),
        "{} outlived its SIGKILLed owner",
        dir.display()
    );
    eprintln!("server and dir gone {:?} after SIGKILL", killed.elapsed());
}

/// The TLS cluster's TCP side as a plain client sees it: `listen_addresses`, `ssl`, and a
/// refusal for a session without TLS (the daemon's TLS sessions are `tests/it/tls.rs`'s).
async fn tls_side(cluster: &Cluster) -> (String, String, String) {
    let (client, connection) =
        tokio_postgres::connect(&cluster.conninfo("postgres"), NoTls).await.expect("socket");
    let connection = tokio::spawn(connection);
    let show = |name: &'static str| {
        let client = &client;
        async move { client.query_one(&format!("show {name}"), &[]).await.expect("show").get::<_, String>(0) }
    };
    let (listen, ssl) = (show("listen_addresses").await, show("ssl").await);
    drop(client);
    let _ = connection.await;
    let plain = format!("{} sslmode=disable", cluster.tcp_conninfo("postgres").expect("TCP"));
    let refused = match tokio_postgres::connect(&plain, NoTls).await {
        Ok(_) => "connected".to_owned(),
        Err(e) => e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()),
    };
    (listen, ssl, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_listens_on_loopback_only_and_keeps_its_rules_across_a_restart() {
    let cluster = Cluster::start_tls(TlsOptions { reject_plaintext: true }).expect("start a TLS cluster");
    let ca = cluster.ca_file().expect("a CA file").to_owned();
    assert!(fs::read_to_string(&ca).expect("read the CA").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!cluster.socket_dir().join("ca.key").exists(), "the CA's key is not kept");
    assert!(!cluster.socket_dir().join("password").exists(), "the password file is not kept");
    let port = cluster.port();
    for round in ["started", "restarted"] {
        let (listen, ssl, refused) = tls_side(&cluster).await;
        assert_eq!(listen, "127.0.0.1", "{round}");
        assert_eq!(ssl, "on", "{round}");
        assert!(refused.contains("no encryption"), "{round}: a session without TLS: {refused}");
        cluster.restart().expect("restart");
        assert_eq!(cluster.port(), port, "the same port after a restart");
    }
    assert!(Cluster::start().expect("start").ca_file().is_none(), "no TLS unless asked for");
}
