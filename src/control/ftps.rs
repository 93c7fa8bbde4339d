//! The control connection's TLS (RFC 4217): a stream that is plain TCP or
//! TLS over it, and the gateway's own TLS set-up toward the server before
//! a session starts.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::{self as ftls, UpstreamMode, UpstreamTls};

/// A control connection: plain TCP or TLS over it.
pub(super) enum Ctl {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// Between the plain stream and its TLS successor (never waited on).
    Gone,
}

/// What waiting on a [`Ctl`] gave.
pub(super) enum Got {
    /// A plain stream is readable: read it with `try_read`.
    Ready(io::Result<()>),
    /// A TLS stream delivered this many plaintext bytes into the buffer.
    Read(io::Result<usize>),
}

impl Ctl {
    pub(super) async fn wait(&mut self, buf: &mut [u8]) -> Got {
        match self {
            Ctl::Plain(s) => Got::Ready(s.readable().await),
            // Cancel-safe: a read that does not complete consumed nothing.
            Ctl::Tls(s) => Got::Read(s.read(buf).await),
            Ctl::Gone => std::future::pending().await,
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self, Ctl::Tls(_))
    }

    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Ctl::Plain(s) => s.write_all(bytes).await,
            Ctl::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Ctl::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    pub(super) async fn shutdown(&mut self) {
        let _ = match self {
            Ctl::Plain(s) => s.shutdown().await,
            Ctl::Tls(s) => s.shutdown().await,
            Ctl::Gone => Ok(()),
        };
    }
}

/// Why the upstream TLS leg could not be set up: the client's 421 and the
/// deny line's detail.
pub(super) struct UpstreamFailure {
    pub(super) reply: &'static str,
    pub(super) detail: String,
}

/// Sets up TLS toward the server (RFC 4217): implicit, or AUTH TLS after
/// the greeting; then PBSZ 0 and PROT P, so every upstream data
/// connection is TLS whatever the client chose. Returns the stream and
/// the server's greeting, which the core then reads as if it had just
/// arrived.
pub(super) async fn upstream_prelude(
    tcp: TcpStream,
    up: &UpstreamTls,
    connector: &tokio_rustls::TlsConnector,
) -> Result<(Ctl, Vec<u8>), UpstreamFailure> {
    const LIMIT: usize = 64 * 1024;
    let failed = |reply: &'static str| {
        move |e: io::Error| UpstreamFailure {
            reply,
            detail: e.to_string(),
        }
    };
    let handshake_failed = |e: io::Error| UpstreamFailure {
        reply: if ftls::is_verify_error(&e) {
            "421 Service not available: the server's TLS certificate did not verify."
        } else {
            "421 Service not available: TLS handshake with the server failed."
        },
        detail: e.to_string(),
    };
    let talk = "421 Service not available: the server did not set up TLS.";
    let (mut tls, greeting) = match up.mode {
        UpstreamMode::Implicit => {
            let mut tls = ftls::bounded(connector.connect(up.name.clone(), tcp))
                .await
                .map_err(handshake_failed)?;
            let (_, greeting) = ftls::bounded(ftls::read_reply(&mut tls, LIMIT))
                .await
                .map_err(failed(talk))?;
            (tls, greeting)
        }
        UpstreamMode::Explicit => {
            let mut tcp = tcp;
            let (code, greeting) = ftls::bounded(ftls::read_reply(&mut tcp, LIMIT))
                .await
                .map_err(failed(talk))?;
            if code != 220 {
                // Not ready (421 and the like): the core relays it.
                return Ok((Ctl::Plain(tcp), greeting));
            }
            let (code, _) = ftls::bounded(ftls::command(&mut tcp, "AUTH TLS"))
                .await
                .map_err(failed(talk))?;
            if code != 234 {
                return Err(UpstreamFailure {
                    reply: "421 Service not available: the server refused AUTH TLS.",
                    detail: format!("AUTH TLS answered {code}"),
                });
            }
            let tls = ftls::bounded(connector.connect(up.name.clone(), tcp))
                .await
                .map_err(handshake_failed)?;
            (tls, greeting)
        }
    };
    for cmd in ["PBSZ 0", "PROT P"] {
        let (code, _) = ftls::bounded(ftls::command(&mut tls, cmd))
            .await
            .map_err(failed(talk))?;
        if code / 100 != 2 {
            return Err(UpstreamFailure {
                reply: talk,
                detail: format!("{cmd} answered {code}"),
            });
        }
    }
    Ok((Ctl::Tls(Box::new(tls.into())), greeting))
}
