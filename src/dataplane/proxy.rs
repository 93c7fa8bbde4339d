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
use tokio::sync::{mpsc, oneshot};

use super::registry::{Entry, Registry, Reservation};
use super::{OpenError, Owner, PlaneEvent, directions, mode_label};
use crate::clients::Claim;
use crate::metrics as m;
use crate::proto::policy::canonical_ip;
use crate::proto::{
    DataMode, DataVerdict, Denial, DenyReason, PinholeId, PinholeRequest, Shape, Side,
};
use crate::proxy_protocol::{self, HEADER_TIMEOUT, HeaderError};
use crate::relay;
use crate::tasks::Tasks;
use crate::tls::DataLeg;

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
        match request.shape {
            Shape::Relay => {}
            Shape::DialBoth { .. } => {
                return open_dial(&self.registry, &self.tasks, request, apparent, owner);
            }
            Shape::AcceptBoth { server_listen, .. } => {
                return self.open_pair(request, server_listen, apparent, owner);
            }
        }
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

    /// `server_data = "active"`: listens on the client's side and on the
    /// server's side, on the same port.
    fn open_pair(
        &self,
        request: &PinholeRequest,
        server_listen: IpAddr,
        apparent: Vec<IpAddr>,
        owner: &Owner,
    ) -> Result<SocketAddr, OpenError> {
        let reservation = self.registry.reserve(owner)?;
        let (tx, rx) = oneshot::channel();
        let client_side = request.listen_ip;
        let (port, listeners) = self.registry.claim(
            |port| {
                let bind = |ip| match bind_listener(SocketAddr::new(ip, port)) {
                    Ok(l) => Ok(Some(l)),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
                    Err(e) => Err(e),
                };
                let Some(client) = bind(client_side)? else {
                    return Ok(None);
                };
                if server_listen == client_side {
                    return Ok(Some((client, None)));
                }
                Ok(bind(server_listen)?.map(|server| (client, Some(server))))
            },
            |_| Entry::new(request, apparent, owner, Some(tx), Some(reservation)),
        )?;
        let task = Pinhole {
            registry: Arc::clone(&self.registry),
            port,
            request: request.clone(),
            owner: owner.clone(),
        };
        self.tasks.spawn(task.run_pair(listeners, rx));
        Ok(SocketAddr::new(client_side, port))
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

    /// Accepts the client's and the server's connections, each judged by
    /// the core, and relays them to each other. Behind a balancer, the
    /// client's leg carries a PROXY header (the server's never does).
    async fn run_pair(
        self,
        (client_side, server_side): (TcpListener, Option<TcpListener>),
        mut cancel: oneshot::Receiver<()>,
    ) {
        let started = Instant::now();
        let mut errors = crate::server::AcceptErrors::new("pinhole");
        let mut legs = Legs::new(self.request.expected_peer);
        let (client, server) = loop {
            let (accepted, on_client_side) = tokio::select! {
                _ = &mut cancel => return,
                accepted = client_side.accept() => (accepted, true),
                accepted = accept_opt(server_side.as_ref()) => (accepted, false),
            };
            let (mut stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            };
            let peer = match on_client_side {
                true => match self.proxied_peer(&mut stream, peer).await {
                    Some(peer) => peer,
                    None => {
                        m::pinhole_refused();
                        continue;
                    }
                },
                false => peer,
            };
            match self.owner.ask(self.request.id, peer, VERDICT_TIMEOUT).await {
                DataVerdict::Accept => {
                    if let Some(pair) = legs.put(stream, peer) {
                        break pair;
                    }
                }
                DataVerdict::Refuse => m::pinhole_refused(),
            }
        };
        drop((client_side, server_side));
        relay_pair(
            &self.registry,
            client,
            server,
            &self.request,
            &self.owner,
            started,
        )
        .await;
    }
}

/// The two legs of a two-leg pinhole as they arrive.
struct Legs {
    client_ip: IpAddr,
    client: Option<TcpStream>,
    server: Option<TcpStream>,
}

impl Legs {
    fn new(client_ip: IpAddr) -> Legs {
        Legs {
            client_ip,
            client: None,
            server: None,
        }
    }

    /// Takes a leg the core accepted; both legs once both are there. By
    /// address; when client and server share one, the client comes first
    /// (it connects on the 227/229, the server only after the transfer
    /// command).
    fn put(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, TcpStream)> {
        if canonical_ip(peer.ip()) == self.client_ip && self.client.is_none() {
            self.client = Some(stream);
        } else {
            self.server = Some(stream);
        }
        if self.client.is_some() && self.server.is_some() {
            return self.client.take().zip(self.server.take());
        }
        None
    }
}

/// Both legs are there: the pinhole is used up; relay them.
async fn relay_pair(
    registry: &Registry,
    client: TcpStream,
    server: TcpStream,
    request: &PinholeRequest,
    owner: &Owner,
    started: Instant,
) {
    let Some((_, mut entry)) = registry.remove(request.id) else {
        return;
    };
    m::pinhole_wait(started.elapsed());
    let _slot = entry.reservation.take().map(Reservation::into_connection);
    let _active = m::DataConnectionActive::start();
    relay_and_report(client, server, request, owner).await;
}

/// Kernel plane, `server_data = "active"`: a two-leg pinhole whose
/// connections reach ftpgate's fall-through listener, which hands each
/// leg the core accepted to the task this starts. Nothing of it is in the
/// kernel: its port is only its place in the registry.
pub fn open_pair_handoff(
    registry: &Arc<Registry>,
    tasks: &Tasks,
    request: &PinholeRequest,
    apparent: Vec<IpAddr>,
    owner: &Owner,
) -> Result<SocketAddr, OpenError> {
    let reservation = registry.reserve(owner)?;
    let (tx, rx) = oneshot::channel();
    let (legs_tx, legs_rx) = mpsc::channel(2);
    let (port, ()) = registry.claim(
        |_| Ok(Some(())),
        |_| {
            let mut entry = Entry::new(request, apparent, owner, Some(tx), Some(reservation));
            entry.handoff = Some(legs_tx);
            entry
        },
    )?;
    tasks.spawn(pair_handed_legs(
        Arc::clone(registry),
        request.clone(),
        owner.clone(),
        legs_rx,
        rx,
    ));
    Ok(SocketAddr::new(request.listen_ip, port))
}

async fn pair_handed_legs(
    registry: Arc<Registry>,
    request: PinholeRequest,
    owner: Owner,
    mut handed: mpsc::Receiver<(TcpStream, SocketAddr)>,
    mut cancel: oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let mut legs = Legs::new(request.expected_peer);
    let (client, server) = loop {
        let leg = tokio::select! {
            _ = &mut cancel => return,
            leg = handed.recv() => leg,
        };
        let Some((stream, peer)) = leg else {
            return;
        };
        if let Some(pair) = legs.put(stream, peer) {
            break pair;
        }
    };
    relay_pair(&registry, client, server, &request, &owner, started).await;
}

async fn accept_opt(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// `server_data = "passive"`: a pinhole that listens nowhere. Its port is
/// only its place in the registry (its slot and caps count as any other);
/// the gateway connects out to the server's passive port, then to the
/// client's port, and relays. Used by both planes: a translated pinhole is
/// always carried in userland.
pub fn open_dial(
    registry: &Arc<Registry>,
    tasks: &Tasks,
    request: &PinholeRequest,
    apparent: Vec<IpAddr>,
    owner: &Owner,
) -> Result<SocketAddr, OpenError> {
    let reservation = registry.reserve(owner)?;
    let (tx, rx) = oneshot::channel();
    let (port, ()) = registry.claim(
        |_| Ok(Some(())),
        |_| Entry::new(request, apparent, owner, Some(tx), Some(reservation)),
    )?;
    tasks.spawn(dial_both(
        Arc::clone(registry),
        request.clone(),
        owner.clone(),
        rx,
    ));
    Ok(SocketAddr::new(request.listen_ip, port))
}

async fn dial_both(
    registry: Arc<Registry>,
    request: PinholeRequest,
    owner: Owner,
    mut cancel: oneshot::Receiver<()>,
) {
    let Shape::DialBoth { dial, dial_from } = request.shape else {
        return;
    };
    let started = Instant::now();
    let limit = owner.timeouts.connect;
    // The client's leg first: the client listens from its PORT/EPRT on,
    // and the core lets its 200 go only once the server's leg is accepted
    // too, so both legs exist before the client's transfer command makes
    // the server send.
    let legs = tokio::select! {
        _ = &mut cancel => return,
        c = async {
            let client = connect_from(request.connect_from, request.connect_to, limit)
                .await
                .map_err(|e| (request.connect_to, "the client's PORT/EPRT target", e))?;
            let server = connect_from(dial_from, dial, limit)
                .await
                .map_err(|e| (dial, "the server's passive port", e))?;
            Ok((client, server))
        } => c,
    };
    let verdict = match &legs {
        // The core judges the server's leg as any data connection of the
        // server's (the client's is the target it accepted).
        Ok(_) => owner.ask(request.id, dial, VERDICT_TIMEOUT).await,
        Err((target, what, e)) => {
            tracing::warn!(session = owner.info.id, %target, "data connection to {what} failed: {e}");
            DataVerdict::Refuse
        }
    };
    let taken = registry.remove(request.id);
    let (Ok((client, server)), DataVerdict::Accept, Some((_, mut entry))) = (legs, verdict, taken)
    else {
        owner.report(PlaneEvent::Closed { id: request.id }).await;
        return;
    };
    m::pinhole_wait(started.elapsed());
    let slot = entry.reservation.take().map(Reservation::into_connection);
    carry_legs(server, client, &request, &owner, slot).await;
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
    let connected = tokio::select! {
        c = connect_from(request.connect_from, request.connect_to, owner.timeouts.connect) => c,
        () = owner.ended() => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "control session ended",
        )),
    };
    match connected {
        Ok(outbound) => carry_legs(inbound, outbound, request, owner, slot).await,
        Err(e) => {
            tracing::warn!(
                session = owner.info.id,
                target = %request.connect_to,
                "data connection onward failed: {e}"
            );
            owner.report(PlaneEvent::Closed { id: request.id }).await;
        }
    }
}

/// Relays a data connection's two legs (`inbound`: the peer the pinhole
/// expected; `outbound`: the other), through TLS where the session's data
/// is protected; reports the end to the owner.
async fn carry_legs(
    inbound: TcpStream,
    outbound: TcpStream,
    request: &PinholeRequest,
    owner: &Owner,
    slot: Option<Claim>,
) {
    let _slot = slot;
    let _ = inbound.set_nodelay(true);
    let _active = m::DataConnectionActive::start();
    if !owner.needs_userland(request) {
        return relay_and_report(inbound, outbound, request, owner).await;
    }
    let began = Instant::now();
    let Some(legs) = tls_legs(inbound, outbound, request, owner).await else {
        owner.report(PlaneEvent::Closed { id: request.id }).await;
        return;
    };
    let (counts, result) =
        relay::relay_streams(legs.0, legs.1, owner.timeouts.idle, owner.ended()).await;
    let (down, up) = directions(request.mode, counts.a_to_b, counts.b_to_a);
    m::data_connection("proxy", mode_label(request.mode), down, up, began.elapsed());
    if let Err(e) = result {
        tracing::debug!(session = owner.info.id, "TLS data relay ended: {e}");
    }
}

/// Relays `inbound` (the leg of the peer the pinhole expected: the
/// client for passive, the server for active) and `outbound` until either
/// ends or the owning session does; counts the bytes and reports the end.
async fn relay_and_report(
    inbound: TcpStream,
    outbound: TcpStream,
    request: &PinholeRequest,
    owner: &Owner,
) {
    let began = Instant::now();
    let (counts, result) =
        relay::relay_until(inbound, outbound, owner.timeouts.idle, owner.ended()).await;
    // a is the peer that connected in.
    let (down, up) = directions(request.mode, counts.a_to_b, counts.b_to_a);
    m::data_connection("proxy", mode_label(request.mode), down, up, began.elapsed());
    if let Err(e) = result {
        tracing::debug!(session = owner.info.id, "data relay ended: {e}");
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
    let Some(tls) = owner.tls.clone() else {
        // needs_userland: PROT P exists only where the listener has TLS.
        tracing::warn!(
            session = owner.info.id,
            "TLS data connection without TLS settings"
        );
        return None;
    };
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
    // One deny line, for the leg that failed (the client's first): "the
    // transfer hangs after 150" is what an operator sees.
    let failed = |who: Side, e: io::Error| {
        tracing::info!(
            session = owner.info.id,
            "data connection TLS handshake failed ({}): {e}",
            who.as_str()
        );
        let mut denial =
            Denial::new(DenyReason::TlsHandshakeFailed, who).target(request.connect_to);
        denial.argument = Some(format!("data connection: {e}"));
        denial.rule = Some("data_tls".into());
        tls.deny.record(&owner.info, &denial);
        None
    };
    let (client, server) = match (client, server) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) => return failed(Side::Client, e),
        (_, Err(e)) => return failed(Side::Server, e),
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
