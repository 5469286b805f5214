//! The server's sockets: the listener and its accept loop, every connection registered so that
//! `set_down` and `shutdown` can cut it at once, and the port taken again after a take-down.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::http::handle;
use super::{lock, State};

pub(super) struct Inner {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) addr: SocketAddr,
    pub(super) rt: tokio::runtime::Handle,
    /// Bumped to cut every open connection (down, shutdown); dropping it does the same.
    pub(super) cut: watch::Sender<u64>,
    pub(super) control: Arc<Mutex<Control>>,
}

#[derive(Default)]
pub(super) struct Control {
    pub(super) stopped: bool,
    pub(super) down: bool,
    /// A duplicate of the listening socket, kept to shut the socket down synchronously.
    pub(super) listener: Option<StdListener>,
    pub(super) accept: Option<JoinHandle<()>>,
    /// Duplicates of the open connections' sockets, by connection number, for the same reason.
    pub(super) conns: HashMap<u64, std::net::TcpStream>,
    pub(super) next_conn: u64,
}

/// Registers a connection's socket for `take_down` and unregisters it when the connection
/// task ends (or is dropped), so the duplicate never keeps a finished socket open.
pub(super) struct ConnGuard {
    pub(super) control: Arc<Mutex<Control>>,
    pub(super) id: u64,
}

impl ConnGuard {
    pub(super) fn new(control: &Arc<Mutex<Control>>, stream: &tokio::net::TcpStream) -> ConnGuard {
        let mut ctl = lock(control);
        let id = ctl.next_conn;
        ctl.next_conn += 1;
        if let Some(dup) = dup_stream(stream) {
            ctl.conns.insert(id, dup);
        }
        ConnGuard { control: Arc::clone(control), id }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.control).conns.remove(&self.id);
    }
}

#[cfg(unix)]
pub(super) fn dup_stream(stream: &tokio::net::TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd;
    let fd = stream.as_fd().try_clone_to_owned().ok()?;
    Some(std::net::TcpStream::from(fd))
}

#[cfg(not(unix))]
pub(super) fn dup_stream(_: &tokio::net::TcpStream) -> Option<std::net::TcpStream> {
    None
}

impl Inner {
    /// Serves `listener`, keeping a duplicate of it so `set_down` can shut it synchronously.
    pub(super) fn listen(&self, ctl: &mut Control, listener: StdListener) -> io::Result<()> {
        let (dup, listener) = {
            let _runtime = self.rt.enter();
            to_tokio(listener)?
        };
        ctl.listener = Some(dup);
        let (state, control) = (Arc::clone(&self.state), Arc::clone(&self.control));
        let task = accept_loop(listener, state, control, self.cut.subscribe());
        ctl.accept = Some(self.rt.spawn(task));
        Ok(())
    }

    pub(super) fn stop(&self) {
        let mut ctl = lock(&self.control);
        ctl.stopped = true;
        take_down(&mut ctl);
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) type Listeners = (StdListener, tokio::net::TcpListener);

pub(super) fn to_tokio(listener: StdListener) -> io::Result<Listeners> {
    listener.set_nonblocking(true)?;
    let dup = listener.try_clone()?;
    Ok((dup, tokio::net::TcpListener::from_std(listener)?))
}

/// Closes the listening socket and every open connection now, and ends the accept loop.
pub(super) fn take_down(ctl: &mut Control) {
    if let Some(listener) = ctl.listener.take() {
        shutdown_listener(listener);
    }
    for (_, conn) in ctl.conns.drain() {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
    if let Some(task) = ctl.accept.take() {
        task.abort();
    }
}

/// `shutdown(2)` on a listening socket makes Linux stop listening at once (new SYNs are
/// refused) even while the accept task still owns a descriptor; aborting that task closes it
/// only at its next poll, too late for a test that connects right after `set_down(true)`.
/// std only exposes `shutdown` on streams, hence the (safe) descriptor conversion.
pub(super) fn shutdown_listener(listener: StdListener) {
    #[cfg(unix)]
    {
        let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(listener));
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    #[cfg(not(unix))]
    drop(listener);
}

/// Retries binding the fixed port after `set_down(false)` found it busy, then serves it.
pub(super) async fn rebind(
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    control: Arc<Mutex<Control>>,
    cut: watch::Receiver<u64>,
) {
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Ok((dup, listener)) = StdListener::bind(addr).and_then(to_tokio) else {
            continue;
        };
        {
            let mut ctl = lock(&control);
            if ctl.stopped || ctl.down {
                return;
            }
            ctl.listener = Some(dup);
        }
        return accept_loop(listener, state, control, cut).await;
    }
}

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    control: Arc<Mutex<Control>>,
    mut cut: watch::Receiver<u64>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // The socket was shut down under us: we are going down.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = cut.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let mut conn_cut = cut.clone();
        let guard = ConnGuard::new(&control, &stream);
        tokio::spawn(async move {
            let _guard = guard;
            let svc = service_fn(move |req| handle(Arc::clone(&state), req));
            // No header-read timer: idle keep-alive connections stay open until the client
            // drops them, so long tests never race a server-side idle close.
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            // A cut (down, shutdown) drops the connection future, which closes the socket;
            // `take_down` has already shut it, so the peer sees the close at once.
            tokio::select! {
                _ = conn => {}
                _ = conn_cut.changed() => {}
            }
        });
    }
}

/// The service's error: hyper closes the connection without writing a response.
#[derive(Debug)]
pub(super) struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for DropConnection {}
