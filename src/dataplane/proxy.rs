//! The proxy plane: a listener per pinhole and a userland relay.
//!
//! A pinhole listens on a free port of the range. Every connection it
//! accepts is reported to the owning session, whose core decides: the
//! expected peer is taken (the listener closes, its port is free again) and
//! relayed onward; anyone else is refused there and then, and the core logs
//! the theft. The listener has no clock of its own: it lives until the core
//! consumes, supersedes or expires the pinhole, or its session ends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

use super::registry::{Entry, Registry, Reservation};
use super::{OpenError, Owner, PlaneEvent, directions, mode_label};
use crate::clients::Claim;
use crate::metrics as m;
use crate::proto::{DataMode, DataVerdict, Denial, DenyReason, PinholeId, PinholeRequest, Side};
use crate::proxy_protocol::{self, HEADER_TIMEOUT, HeaderError};
use crate::relay;
use crate::tasks::Tasks;
use crate::tls::{DataLeg, DataTls};

/// Pinhole listeners accept only one connection; a small backlog still lets
/// a thief's connection be accepted, logged and closed.
const BACKLOG: i32 = 8;
/// How long a pinhole waits for its session's verdict on a connection.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ProxyPlane {
    registry: Arc<Registry>,
    tasks: Tasks,
}

impl ProxyPlane {
    pub fn new(ports: (u16, u16), tasks: Tasks) -> ProxyPlane {
        ProxyPlane {
            registry: Arc::new(Registry::new(ports.0, ports.1)),
            tasks,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    pub fn open(
        &self,
        request: &PinholeRequest,
        apparent: Vec<IpAddr>,
        owner: &Owner,
    ) -> Result<SocketAddr, OpenError> {
        let reservation = self.registry.reserve(owner)?;
        let (tx, rx) = oneshot::channel();
        let (port, listener) = self.registry.claim(
            |port| match bind_listener(SocketAddr::new(request.listen_ip, port)) {
                Ok(l) => Ok(Some(l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
                Err(e) => Err(e),
            },
            |_| Entry::new(request, apparent, owner, Some(tx), Some(reservation)),
        )?;
        let task = Pinhole {
            registry: Arc::clone(&self.registry),
            port,
            request: request.clone(),
            owner: owner.clone(),
        };
        self.tasks.spawn(task.run(listener, rx));
        Ok(SocketAddr::new(request.listen_ip, port))
    }

    pub fn cancel(&self, id: PinholeId) {
        if let Some((_, mut entry)) = self.registry.remove(id)
            && let Some(tx) = entry.cancel.take()
        {
            let _ = tx.send(());
        }
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Lets a port be reused while old data connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// One pinhole's listener task.
struct Pinhole {
    registry: Arc<Registry>,
    port: u16,
    request: PinholeRequest,
    owner: Owner,
}

impl Pinhole {
    async fn run(self, listener: TcpListener, mut cancel: oneshot::Receiver<()>) {
        let started = Instant::now();
        let mut errors = crate::server::AcceptErrors::new("pinhole");
        let inbound = loop {
            let accepted = tokio::select! {
                _ = &mut cancel => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((mut stream, peer)) => {
                    let Some(peer) = self.proxied_peer(&mut stream, peer).await else {
                        m::pinhole_refused();
                        continue;
                    };
                    let verdict = self.owner.ask(self.request.id, peer, VERDICT_TIMEOUT).await;
                    match verdict {
                        DataVerdict::Accept => break stream,
                        DataVerdict::Refuse => {
                            m::pinhole_refused();
                            drop(stream);
                        }
                    }
                }
                Err(e) => errors.failed(&e).await,
            }
        };
        // Used up: the listener closes and the port is free for the next.
        drop(listener);
        let Some((_, mut entry)) = self.registry.remove(self.request.id) else {
            // Withdrawn in the meantime: its session has ended.
            return;
        };
        m::pinhole_wait(started.elapsed());
        let slot = entry.reservation.take().map(Reservation::into_connection);
        carry(inbound, &self.request, &self.owner, slot).await;
    }

    /// The peer the core judges: the socket's, or behind a balancer the
    /// PROXY header's source (passive pinholes only: active ones are
    /// reached by the server, not through the balancer). `None`: refused
    /// here (untrusted source, no valid header) and logged as
    /// `proxy_header`.
    async fn proxied_peer(&self, stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let proxy = match &self.owner.proxied {
            Some(p) if self.request.mode == DataMode::Passive => p,
            _ => return Some(peer),
        };
        let read = proxy_protocol::accept(stream, peer, &proxy.trusted, HEADER_TIMEOUT).await;
        match read {
            Ok(proxied) => Some(proxied.client),
            Err(e) => {
                tracing::debug!(session = self.owner.info.id, %peer, "data connection refused: {e}");
                let rule = match e {
                    HeaderError::Untrusted(_) => "trusted_proxies",
                    _ => "proxy_protocol",
                };
                let denial = Denial::new(DenyReason::ProxyHeader, Side::Client)
                    .target(SocketAddr::new(self.request.listen_ip, self.port))
                    .peer(peer)
                    .rule(rule);
                proxy.deny.record(&self.owner.info, &denial);
                None
            }
        }
    }
}

/// Connects a taken data connection onward and relays it; reports the end
/// to the owner. Also used by the kernel plane for connections that reach
/// its fall-through listener from the expected peer. `slot` is the data
/// connection's counted slot, held until the relay ends; the relay ends
/// with the owning session at the latest.
pub async fn carry(
    inbound: TcpStream,
    request: &PinholeRequest,
    owner: &Owner,
    slot: Option<Claim>,
) {
    let _slot = slot;
    let timeouts = owner.timeouts;
    let _ = inbound.set_nodelay(true);
    let _active = m::DataConnectionActive::start();
    let connected = tokio::select! {
        c = connect_from(request.connect_from, request.connect_to, timeouts.connect) => c,
        () = owner.ended() => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "control session ended",
        )),
    };
    match connected {
        Ok(outbound) if owner.needs_userland(request) => {
            let began = Instant::now();
            let Some(legs) = tls_legs(inbound, outbound, request, owner).await else {
                owner.report(PlaneEvent::Closed { id: request.id }).await;
                return;
            };
            let (counts, result) =
                relay::relay_streams(legs.0, legs.1, timeouts.idle, owner.ended()).await;
            let (down, up) = directions(request.mode, counts.a_to_b, counts.b_to_a);
            m::data_connection("proxy", mode_label(request.mode), down, up, began.elapsed());
            if let Err(e) = result {
                tracing::debug!(session = owner.info.id, "TLS data relay ended: {e}");
            }
        }
        Ok(outbound) => {
            let began = Instant::now();
            let (counts, result) =
                relay::relay_until(inbound, outbound, timeouts.idle, owner.ended()).await;
            // a is the peer that connected in.
            let (down, up) = directions(request.mode, counts.a_to_b, counts.b_to_a);
            m::data_connection("proxy", mode_label(request.mode), down, up, began.elapsed());
            if let Err(e) = result {
                tracing::debug!(session = owner.info.id, "data relay ended: {e}");
            }
        }
        Err(e) => {
            tracing::warn!(
                session = owner.info.id,
                target = %request.connect_to,
                "data connection onward failed: {e}"
            );
        }
    }
    owner.report(PlaneEvent::Closed { id: request.id }).await;
}

/// Runs the TLS handshakes of a data connection's legs, both at once (a
/// server may only start its handshake once the client has sent its
/// transfer command, and the client may wait for the server). The gateway
/// is the TLS server toward the client and the TLS client toward the
/// server (RFC 4217 section 10.2: the FTP client is the TLS client,
/// whoever connects). Returns (inbound, outbound) legs.
async fn tls_legs(
    inbound: TcpStream,
    outbound: TcpStream,
    request: &PinholeRequest,
    owner: &Owner,
) -> Option<(DataLeg, DataLeg)> {
    let tls = owner.tls.clone().unwrap_or(DataTls {
        acceptor: None,
        upstream: None,
    });
    let (client, server) = match request.mode {
        DataMode::Passive => (inbound, outbound),
        DataMode::Active => (outbound, inbound),
    };
    let (client, server) = tokio::join!(
        tls.client_leg(client, request.client_tls),
        tls.server_leg(server)
    );
    let side = |r: &io::Result<DataLeg>| if r.is_ok() { "ok" } else { "failed" };
    if request.client_tls {
        m::tls_handshake("client_data", side(&client));
    }
    if tls.any() {
        m::tls_handshake("server_data", side(&server));
    }
    let (client, server) = match (client, server) {
        (Ok(c), Ok(s)) => (c, s),
        (c, s) => {
            let e = c
                .err()
                .or(s.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            tracing::info!(
                session = owner.info.id,
                "data connection TLS handshake failed: {e}"
            );
            return None;
        }
    };
    Some(match request.mode {
        DataMode::Passive => (client, server),
        DataMode::Active => (server, client),
    })
}

/// Connects to `to` from the local address `from` (servers check that data
/// connections come from the control connection's address).
pub async fn connect_from(from: IpAddr, to: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let socket = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if from.is_ipv4() == to.is_ipv4() {
        socket.bind(SocketAddr::new(from, 0))?;
    }
    let stream = tokio::time::timeout(limit, socket.connect(to))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {to} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
