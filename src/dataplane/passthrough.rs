//! Passthrough grants (transparent mode, `auth_tls = "passthrough"`): after
//! a server named in a `[[policy.tls_passthrough]]` rule accepts AUTH TLS,
//! the gateway can no longer read the control channel, so it cannot see
//! the data connections being negotiated. Instead, for as long as that
//! session lives, its client, and only that client, may connect to that
//! server on the rule's `data_ports` (the server's published passive
//! range). A grant is held by its session and withdrawn when the session
//! ends, however it ends (a drop guard).
//!
//! Those connections reach the gateway through the redirect `ftpgate
//! nft-rules` prints for each rule (to the transparent listener); the
//! listener finds their original destination, looks for a grant of the
//! connecting client, and relays them (in userland, on either data plane:
//! the bytes are TLS the gateway cannot read, so there is nothing to
//! gain from a kernel element over a relay but the copy). Connections that
//! match no grant are closed and counted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::Owner;
use crate::proto::policy::canonical_ip;

struct Grant {
    client: IpAddr,
    server: IpAddr,
    ports: (u16, u16),
    owner: Owner,
    /// Its data connections being relayed now, at most `limit`.
    active: Arc<AtomicUsize>,
    limit: usize,
}

/// Every live grant, gateway-wide.
#[derive(Default)]
pub struct Grants {
    live: Mutex<HashMap<u64, Grant>>,
    next: AtomicU64,
}

/// Withdraws its grant when dropped.
pub struct GrantGuard {
    grants: Arc<Grants>,
    id: u64,
    active: Arc<AtomicUsize>,
}

impl GrantGuard {
    /// Whether a data connection under this grant is being relayed.
    pub fn carrying_data(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }
}

/// One data connection under a grant, counted while it lives.
pub struct GrantUse {
    pub owner: Owner,
    active: Arc<AtomicUsize>,
}

impl Drop for GrantUse {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        self.grants
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Grants {
    pub fn new() -> Arc<Grants> {
        Arc::new(Grants::default())
    }

    /// Lets `client` reach `server` on `ports` until the guard drops, with
    /// at most `limit` connections at once (the session's pinhole cap,
    /// `data.max_pinholes_per_session`).
    pub fn grant(
        self: &Arc<Self>,
        client: IpAddr,
        server: IpAddr,
        ports: (u16, u16),
        limit: usize,
        owner: Owner,
    ) -> GrantGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let active = Arc::new(AtomicUsize::new(0));
        let grant = Grant {
            client: canonical_ip(client),
            server: canonical_ip(server),
            ports,
            owner,
            active: Arc::clone(&active),
            limit,
        };
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, grant);
        GrantGuard {
            grants: Arc::clone(self),
            id,
            active,
        }
    }

    /// The session whose grant lets `client` connect to `to`, if any; the
    /// connection counts as that grant's data until the use drops.
    pub fn find(&self, client: IpAddr, to: SocketAddr) -> Option<GrantUse> {
        let (client, server) = (canonical_ip(client), canonical_ip(to.ip()));
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values()
            .find(|g| {
                g.client == client
                    && g.server == server
                    && (g.ports.0..=g.ports.1).contains(&to.port())
                    && g.active.load(Ordering::Relaxed) < g.limit
            })
            .map(|g| {
                g.active.fetch_add(1, Ordering::Relaxed);
                GrantUse {
                    owner: g.owner.clone(),
                    active: Arc::clone(&g.active),
                }
            })
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The time of the last byte read on an opaque control connection.
#[derive(Clone)]
pub struct LastRead {
    start: Instant,
    ms: Arc<AtomicU64>,
}

impl LastRead {
    pub fn new() -> LastRead {
        LastRead {
            start: Instant::now(),
            ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let last = self.start + Duration::from_millis(self.ms.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }
}

impl Default for LastRead {
    fn default() -> Self {
        LastRead::new()
    }
}

/// Resolves when the opaque control connection has been silent for `idle`
/// while no data connection of its grant was being relayed: a long
/// transfer keeps its control connection, as in a session the gateway
/// can read.
pub async fn idle_ended(last: &LastRead, grant: &GrantGuard, idle: Duration) {
    let step = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(step).await;
        if last.idle_for() >= idle && !grant.carrying_data() {
            return;
        }
    }
}

/// A stream whose reads move a [`LastRead`].
pub struct Watched<S> {
    pub inner: S,
    pub last: LastRead,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::{Caps, ClientKey};
    use crate::config::{DataCaps, Mode};
    use crate::dataplane::DataTimeouts;
    use crate::denylog::SessionInfo;

    fn owner() -> Owner {
        let client: SocketAddr = "192.0.2.10:40000".parse().unwrap();
        let caps = Caps {
            total: 1,
            per_client: 1,
        };
        Owner {
            events: tokio::sync::mpsc::channel(1).0,
            info: Arc::new(SessionInfo {
                id: 1,
                mode: Mode::Transparent,
                client,
                server: Some("198.51.100.20:21".parse().unwrap()),
                source: ClientKey::of(client.ip(), 64),
            }),
            timeouts: DataTimeouts {
                accept: Duration::from_secs(1),
                connect: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
            caps: DataCaps {
                pinholes: caps,
                connections: caps,
            },
            tls: None,
            proxied: None,
        }
    }

    #[test]
    fn only_the_granted_client_reaches_only_the_granted_range_while_the_session_lives() {
        let grants = Grants::new();
        let client: IpAddr = "192.0.2.10".parse().unwrap();
        let other: IpAddr = "192.0.2.11".parse().unwrap();
        let server: IpAddr = "198.51.100.20".parse().unwrap();
        let guard = grants.grant(client, server, (40000, 40100), 1, owner());
        let to = |port| SocketAddr::new(server, port);
        assert!(grants.find(other, to(40050)).is_none());
        assert!(grants.find(client, to(39999)).is_none());
        assert!(
            grants
                .find(client, "198.51.100.21:40050".parse().unwrap())
                .is_none()
        );
        let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
        let used = grants.find(mapped, to(40100)).expect("granted");
        assert!(guard.carrying_data());
        // One at a time under a limit of one.
        assert!(grants.find(client, to(40001)).is_none());
        drop(used);
        assert!(!guard.carrying_data());
        drop(guard);
        assert!(grants.find(client, to(40050)).is_none());
        assert!(grants.is_empty());
    }
}
