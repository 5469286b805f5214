//! TLS for a cluster started with [`Cluster::start_tls`](super::Cluster::start_tls): a
//! throwaway CA and a server certificate it signs, made with the `openssl` command line in the
//! cluster's own directory when the cluster starts; a password for TCP connections; and the
//! `pg_hba.conf` rules (loopback only, optionally TLS only).

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::binaries::find_tool;
use super::quote::describe;
use super::runner::{chown_for_server, Runner};
use super::ClusterError;

/// How a TLS cluster treats connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsOptions {
    /// `hostnossl … reject`: a TCP connection without TLS is refused, so a client that does
    /// not negotiate TLS cannot connect at all. Otherwise both are accepted (with a password).
    pub reject_plaintext: bool,
}

/// A TLS cluster's TCP side: where it listens, its password and its files.
pub(super) struct Tcp {
    /// The loopback port (also the name of the Unix socket file).
    pub(super) port: u16,
    /// The superuser's password, for TCP connections (the Unix socket stays `trust`).
    pub(super) password: String,
    /// The throwaway CA's certificate: what a client trusts to verify the server.
    pub(super) ca_file: PathBuf,
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    pub(super) hba_file: PathBuf,
}

impl fmt::Debug for Tcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tcp")
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// The certificate's names: the host names a client may connect by.
const SERVER_NAMES: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1";

/// How long the certificates are valid: longer than any test process lives.
const DAYS: &str = "7";

impl Tcp {
    /// Makes the CA, the server's key and certificate, the password file for `initdb` and the
    /// `pg_hba.conf` in `root`, handed to the server's OS user where the server reads them.
    pub(super) fn prepare(root: &Path, runner: &Runner, options: TlsOptions) -> Result<Tcp, ClusterError> {
        let tcp = Tcp {
            port: 0,
            password: format!("{:032x}", rand::random::<u128>()),
            ca_file: root.join("ca.pem"),
            cert_file: root.join("server.crt"),
            key_file: root.join("server.key"),
            hba_file: root.join("pg_hba.conf"),
        };
        let ca_key = root.join("ca.key");
        let csr = root.join("server.csr");
        let extensions = root.join("server.ext");
        write(
            &extensions,
            &format!(
                "{SERVER_NAMES}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca = [
            "-days",
            DAYS,
            "-subj",
            "/CN=keap-sync test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ];
        openssl(
            root,
            &[&["req", "-x509"][..], &ec, &ca].concat(),
            &[("-keyout", &ca_key), ("-out", &tcp.ca_file)],
        )?;
        openssl(
            root,
            &[&["req", "-new"][..], &ec, &["-subj", "/CN=localhost"]].concat(),
            &[("-keyout", &tcp.key_file), ("-out", &csr)],
        )?;
        openssl(
            root,
            &["x509", "-req", "-CAcreateserial", "-days", DAYS],
            &[
                ("-in", &csr),
                ("-CA", &tcp.ca_file),
                ("-CAkey", &ca_key),
                ("-extfile", &extensions),
                ("-out", &tcp.cert_file),
            ],
        )?;
        // The CA's key is not needed any more; nothing else can be signed with it.
        remove(&ca_key)?;
        let reject = if options.reject_plaintext {
            "hostnossl all all 127.0.0.1/32 reject\n"
        } else {
            "hostnossl all all 127.0.0.1/32 scram-sha-256\n"
        };
        write(
            &tcp.hba_file,
            &format!(
                "# keap-sync test kit: the socket as initdb --auth=trust has it, TCP on loopback only.\n\
                 local all all trust\n{reject}hostssl all all 127.0.0.1/32 scram-sha-256\n"
            ),
        )?;
        write(&tcp.password_file(root), &format!("{}\n", tcp.password))?;
        for file in [&tcp.cert_file, &tcp.key_file, &tcp.hba_file, &tcp.password_file(root)] {
            chown_for_server(file, runner)?;
        }
        // The server refuses a key that its group or others can read.
        fs::set_permissions(&tcp.key_file, fs::Permissions::from_mode(0o600)).map_err(|source| {
            ClusterError::Io { action: "set permissions of", path: tcp.key_file.clone(), source }
        })?;
        Ok(tcp)
    }

    /// `initdb --pwfile`: sets the superuser's password; removed once `initdb` is done.
    pub(super) fn password_file(&self, root: &Path) -> PathBuf {
        root.join("password")
    }

    /// The server settings: TLS on with the certificate, listening on loopback only, and the
    /// rules above.
    pub(super) fn server_settings(&self) -> Vec<OsString> {
        let mut settings: Vec<OsString> = vec!["listen_addresses=127.0.0.1".into(), "ssl=on".into()];
        for (name, path) in [
            ("ssl_cert_file", &self.cert_file),
            ("ssl_key_file", &self.key_file),
            ("hba_file", &self.hba_file),
        ] {
            let mut setting = OsString::from(format!("{name}="));
            setting.push(path);
            settings.push(setting);
        }
        settings
    }
}

/// A free loopback port, as the kernel hands it out. Another process may take it before the
/// server binds it; the caller starts again with a new one if that happens.
pub(super) fn free_port() -> Result<u16, ClusterError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| ClusterError::Io {
            action: "find a free port on",
            path: "127.0.0.1".into(),
            source,
        })
}

/// Runs `openssl args paths…` in `root` as this process; the output goes to the error when it fails.
fn openssl(root: &Path, args: &[&str], paths: &[(&str, &PathBuf)]) -> Result<(), ClusterError> {
    let program = find_tool("openssl").ok_or_else(|| ClusterError::Spawn {
        command: "openssl".to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the openssl command line tool makes a TLS cluster's certificates: install openssl",
        ),
    })?;
    let mut command = Command::new(program);
    command.args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    command.current_dir(root).stdin(Stdio::null());
    let described = describe(&command);
    let output =
        command.output().map_err(|source| ClusterError::Spawn { command: described.clone(), source })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ClusterError::CommandFailed {
        command: described,
        outcome: output.status.to_string(),
        output: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn write(path: &Path, text: &str) -> Result<(), ClusterError> {
    fs::write(path, text).map_err(|source| ClusterError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

pub(super) fn remove(path: &Path) -> Result<(), ClusterError> {
    fs::remove_file(path).map_err(|source| ClusterError::Io {
        action: "remove",
        path: path.to_owned(),
        source,
    })
}
