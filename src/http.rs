//! The one HTTP/1 server loop behind the daemon's two listeners, `/metrics` (`metrics`) and
//! Keap's hooks (`hooks`): each accepted connection is served by its own task with a header
//! read timeout, and a failed accept (out of descriptors and the like) backs off instead of
//! spinning. Connections live in a `JoinSet`, so dropping the returned future (the daemon's
//! stop) aborts them all.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How long a client may take to send its request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `handle` on `listener` until the future is dropped; `name` names the listener in
/// the log.
pub(crate) async fn serve<H, F>(listener: TcpListener, name: &'static str, handle: H) -> io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    connections.spawn(async move {
                        let svc = service_fn(move |req| {
                            let answer = handle(req);
                            async move { Ok::<_, Infallible>(answer.await) }
                        });
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), svc);
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, listener = name, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
