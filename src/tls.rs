//! TLS material and streams for FTPS (RFC 4217): the listener's server
//! configuration (certificate and key, read and checked at config load, so
//! `check-config` sees the problems and SIGHUP picks up new files), the
//! upstream client configuration (system roots or a CA file), and the
//! control-connection stream that may be plain or TLS.
//!
//! rustls with the ring provider: no C library, TLS 1.2 and 1.3.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a TLS handshake may take, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions a listener remembers for clients that resume (data
/// connections resume the control session's).
const SERVER_SESSION_CACHE: usize = 4096;

/// The TLS leg toward the upstream server (`upstream_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamMode {
    /// AUTH TLS after the greeting (RFC 4217).
    Explicit,
    /// TLS from the first byte (port 990 style).
    Implicit,
}

/// A listener's client-facing TLS.
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Connections start with TLS.
    pub implicit: bool,
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("implicit", &self.implicit)
            .finish()
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .field("name", &self.name)
            .finish()
    }
}

/// A listener's upstream TLS leg.
pub struct UpstreamTls {
    pub mode: UpstreamMode,
    pub name: ServerName<'static>,
    /// The base configuration; every session gets a copy with a session
    /// cache of its own (see [`UpstreamTls::for_session`]).
    base: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// A connector for one control session and its data connections: they
    /// share a resumption cache of their own, so each data connection
    /// resumes this session's control connection (vsftpd's
    /// `require_ssl_reuse`) and never another session's.
    pub fn for_session(&self) -> TlsConnector {
        let mut config = (*self.base).clone();
        config.resumption = Resumption::in_memory_sessions(8);
        TlsConnector::from(Arc::new(config))
    }
}

/// Reads a certificate chain and key and builds the server configuration;
/// fails when a file is unreadable, holds no PEM item, or the key does not
/// belong to the certificate.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{} does not go with {}: {e}", key.display(), cert.display()))?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SERVER_SESSION_CACHE);
    Ok(config)
}

/// The upstream client configuration: verified against `ca` (PEM), or the
/// system's roots.
pub fn client_config(ca: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("{}: {e}", ca.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{}: no usable CA certificate", ca.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found: set upstream_ca".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Builds the listener's upstream leg.
pub fn upstream_tls(
    mode: UpstreamMode,
    name: ServerName<'static>,
    ca: Option<&Path>,
) -> Result<UpstreamTls, String> {
    Ok(UpstreamTls {
        mode,
        name,
        base: Arc::new(client_config(ca)?),
    })
}

/// Runs `handshake` within [`HANDSHAKE_TIMEOUT`].
pub async fn bounded<T>(
    handshake: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Whether a handshake error is the peer's certificate failing to verify.
pub fn is_verify_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// A data-connection leg: plain, or TLS with the gateway as client or
/// server.
pub enum DataLeg {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for DataLeg {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            DataLeg::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            DataLeg::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataLeg {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            DataLeg::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            DataLeg::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            DataLeg::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            DataLeg::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            DataLeg::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            DataLeg::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS of one session's data connections.
#[derive(Clone)]
pub struct DataTls {
    /// Toward the client (PROT P): the gateway is the TLS server.
    pub acceptor: Option<TlsAcceptor>,
    /// Toward the server: the gateway is the TLS client, resuming its
    /// control connection's session.
    pub upstream: Option<(TlsConnector, ServerName<'static>)>,
    /// Where a failed data-connection handshake is logged
    /// (`tls_handshake_failed`).
    pub deny: crate::denylog::DenyLog,
}

impl DataTls {
    /// Wraps the client's leg as TLS server, when the pinhole asked for it.
    pub async fn client_leg(&self, stream: TcpStream, tls: bool) -> io::Result<DataLeg> {
        match (&self.acceptor, tls) {
            (Some(acceptor), true) => {
                let s = bounded(acceptor.accept(stream)).await?;
                Ok(DataLeg::Tls(Box::new(s.into())))
            }
            (None, true) => Err(io::Error::other("PROT P without a TLS acceptor")),
            _ => Ok(DataLeg::Plain(stream)),
        }
    }

    /// Wraps the server's leg as TLS client when the upstream speaks TLS.
    pub async fn server_leg(&self, stream: TcpStream) -> io::Result<DataLeg> {
        match &self.upstream {
            Some((connector, name)) => {
                let s = bounded(connector.connect(name.clone(), stream)).await?;
                Ok(DataLeg::Tls(Box::new(s.into())))
            }
            None => Ok(DataLeg::Plain(stream)),
        }
    }

    pub fn any(&self) -> bool {
        self.upstream.is_some()
    }
}

/// Reads one reply (RFC 959 section 4.2: up to the line "ddd ") from a
/// server during the gateway's own TLS set-up; returns its code and every
/// byte read.
pub async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> io::Result<(u16, Vec<u8>)> {
    let mut all = Vec::new();
    let mut byte = [0u8; 1];
    let mut line_start = 0;
    let mut code: Option<[u8; 3]> = None;
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        all.push(byte[0]);
        if all.len() > limit {
            return Err(io::Error::other("reply too long"));
        }
        if byte[0] != b'\n' {
            continue;
        }
        let line = &all[line_start..];
        line_start = all.len();
        if line.len() < 4 || !line[..3].iter().all(u8::is_ascii_digit) {
            continue;
        }
        let this = [line[0], line[1], line[2]];
        let first = *code.get_or_insert(this);
        if this == first && line[3] == b' ' {
            let n = u16::from(first[0] - b'0') * 100
                + u16::from(first[1] - b'0') * 10
                + u16::from(first[2] - b'0');
            return Ok((n, all));
        }
    }
}

/// Sends `command` and reads its reply.
pub async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: &str,
) -> io::Result<(u16, Vec<u8>)> {
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .await?;
    stream.flush().await?;
    read_reply(stream, 64 * 1024).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_multi_line_reply_ends_at_its_final_line() {
        let mut input: &[u8] = b"220-hello\r\n220 x\r\n230 next\r\n";
        let (code, bytes) = read_reply(&mut input, 1024).await.unwrap();
        assert_eq!(code, 220);
        assert_eq!(bytes, b"220-hello\r\n220 x\r\n");
        let (code, _) = read_reply(&mut input, 1024).await.unwrap();
        assert_eq!(code, 230);
    }
}
