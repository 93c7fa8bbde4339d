//! The PROXY protocol (v1 text and v2 binary, HAProxy's "PROXY protocol"
//! specification) in front of control connections and passive data
//! connections that reach the gateway through a load balancer.
//!
//! Behind a balancer the socket's peer is the balancer; the client is the
//! source address of the header the balancer sends first. That address is
//! the client for everything (policy: the data peer is the control peer;
//! per-client limits; the expected peer of pinholes; logs), so a header is
//! believed only from `trusted_proxies`, and a listener that takes the
//! PROXY protocol requires one on every connection.
//!
//! The header is read without consuming a byte of what follows it: the
//! bytes are peeked (MSG_PEEK) until the parser (the `proxy-header` crate)
//! says how long the header is, then exactly that many are read. A
//! passive upload's first data bytes, or a client's pipelined first
//! command, stay in the socket for whoever reads next. The wait is bounded
//! and so is the header's size.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use proxy_header::{ParseConfig, Protocol, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::proto::policy::{canonical, canonical_ip};

/// The longest header accepted: a v1 header is at most 107 bytes; a v2
/// header with the addresses of either family and the few TLVs balancers
/// add (unique id, ALPN, authority, CRC) fits easily.
pub const MAX_HEADER: usize = 536;
/// How long the balancer gets to send its header, on control and data
/// connections alike (it sends it with its first segment).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A peeked header that is still incomplete is peeked again after this
/// long (the socket stays readable while unread bytes sit in it).
const PEEK_AGAIN: Duration = Duration::from_millis(5);

/// The balancers whose PROXY headers are believed (`trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    /// Whether `ip` (an IPv4-mapped address counts as IPv4) is trusted.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

/// What a header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The client: the header's source, or the socket's peer for a LOCAL
    /// (v2) or UNKNOWN (v1) header, which the balancer sends for its own
    /// connections (health checks).
    pub client: SocketAddr,
    /// The address the client connected to on the balancer, if said.
    pub destination: Option<SocketAddr>,
}

/// Why no client address could be taken from a connection.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} is not in trusted_proxies")]
    Untrusted(IpAddr),
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Reads the PROXY header at the start of `stream` (whose peer is `peer`)
/// if `peer` is trusted, consuming exactly the header's bytes.
pub async fn accept(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
    limit: Duration,
) -> Result<Proxied, HeaderError> {
    if !trusted.contains(peer.ip()) {
        return Err(HeaderError::Untrusted(canonical(peer).ip()));
    }
    tokio::time::timeout(limit, read_header(stream, peer))
        .await
        .map_err(|_| HeaderError::Timeout(limit))?
}

async fn read_header(stream: &mut TcpStream, peer: SocketAddr) -> Result<Proxied, HeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut seen = 0;
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let (proxied, used) = match ProxyHeader::parse(&buf[..n], config) {
            Ok((header, used)) => (proxied(&header, peer)?, used),
            Err(proxy_header::Error::BufferTooShort) if n < MAX_HEADER => {
                if n == seen {
                    tokio::time::sleep(PEEK_AGAIN).await;
                }
                seen = n;
                continue;
            }
            Err(proxy_header::Error::BufferTooShort) => return Err(HeaderError::TooLong),
            Err(e) => return Err(HeaderError::Invalid(e.to_string())),
        };
        stream.read_exact(&mut buf[..used]).await?;
        return Ok(proxied);
    }
}

fn proxied(header: &ProxyHeader<'_>, peer: SocketAddr) -> Result<Proxied, HeaderError> {
    match header.proxied_address() {
        None => Ok(Proxied {
            client: canonical(peer),
            destination: None,
        }),
        Some(a) if a.protocol == Protocol::Stream => Ok(Proxied {
            client: canonical(a.source),
            destination: Some(canonical(a.destination)),
        }),
        Some(_) => Err(HeaderError::Invalid("not a TCP connection".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn lo() -> TrustedProxies {
        TrustedProxies::new(vec!["127.0.0.0/8".parse().unwrap()])
    }

    /// Sends `bytes` in pieces of `step` bytes, then returns what the
    /// gateway side read as header and what it then reads as stream.
    async fn exchange(bytes: Vec<u8>, step: usize) -> (Result<Proxied, HeaderError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for piece in bytes.chunks(step) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            s.shutdown().await.unwrap();
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        let got = accept(&mut stream, peer, &lo(), Duration::from_secs(2)).await;
        let mut rest = Vec::new();
        if got.is_ok() {
            stream.read_to_end(&mut rest).await.unwrap();
        }
        sender.await.unwrap();
        (got, rest)
    }

    fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(source, destination))
            .encode_v2(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn v1_and_v2_headers_give_the_client_and_leave_the_stream_after_them() {
        let client: SocketAddr = "192.0.2.10:40000".parse().unwrap();
        let vip: SocketAddr = "198.51.100.5:21".parse().unwrap();
        let v1 = b"PROXY TCP4 192.0.2.10 198.51.100.5 40000 21\r\n".to_vec();
        for header in [v1, v2(client, vip)] {
            for step in [1, 3, 1000] {
                let mut bytes = header.clone();
                bytes.extend_from_slice(b"USER ftptest\r\n");
                let (got, rest) = exchange(bytes, step).await;
                let got = got.unwrap();
                assert_eq!(got.client, client);
                assert_eq!(got.destination, Some(vip));
                assert_eq!(rest, b"USER ftptest\r\n", "step {step}");
            }
        }
    }

    #[tokio::test]
    async fn a_local_header_keeps_the_socket_peer() {
        let mut out = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut out).unwrap();
        let (got, rest) = exchange(out, 1000).await;
        assert!(got.unwrap().client.ip().is_loopback());
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn missing_invalid_or_truncated_headers_are_refused() {
        let (got, _) = exchange(b"USER ftptest\r\n".to_vec(), 1000).await;
        assert!(matches!(got, Err(HeaderError::Invalid(_))), "{got:?}");
        // Peeking cannot see the end of the stream behind unread bytes: a
        // truncated header ends at the time limit.
        let (got, _) = exchange(b"PROXY TCP4 192.0.2".to_vec(), 1000).await;
        assert!(matches!(got, Err(HeaderError::Timeout(_))), "{got:?}");
        let (got, _) = exchange(Vec::new(), 1000).await;
        assert!(matches!(got, Err(HeaderError::Closed)), "{got:?}");
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 600));
        let (got, _) = exchange(long, 1000).await;
        assert!(got.is_err(), "{got:?}");
    }

    #[tokio::test]
    async fn an_untrusted_peer_is_refused_before_anything_is_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut stream, peer) = listener.accept().await.unwrap();
        let only = TrustedProxies::new(vec!["192.0.2.0/24".parse().unwrap()]);
        let got = accept(&mut stream, peer, &only, Duration::from_secs(1)).await;
        assert!(matches!(got, Err(HeaderError::Untrusted(_))), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_balancer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut stream, peer) = listener.accept().await.unwrap();
        let got = accept(&mut stream, peer, &lo(), HEADER_TIMEOUT).await;
        assert!(matches!(got, Err(HeaderError::Timeout(_))), "{got:?}");
    }

    #[test]
    fn mapped_addresses_match_ipv4_networks() {
        assert!(lo().contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!lo().contains("::1".parse().unwrap()));
    }
}
