//! The pinhole pool: short-lived listeners for negotiated data connections.
//!
//! A pinhole listens on a random free port of the configured range, accepts
//! exactly one connection and only from the expected peer (others are refused
//! and deny-logged as `pasv_theft`), then connects onward and relays. The
//! control session owns its pinholes' lifetime (it decides expiry and
//! supersession); the pool keeps the registry that maps a port back to the
//! endpoint behind it, which is how a server-to-server PORT naming the
//! gateway is recognised.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::denylog::{DenyLog, SessionInfo};
use crate::metrics as m;
use crate::proto::policy::canonical_ip;
use crate::proto::{
    DataMode, Denial, DenyReason, ForeignPinhole, PinholeId, PinholeRequest, Resolved,
};
use crate::relay;

/// Pinhole listeners accept only one connection; a small backlog still lets
/// a thief's connection be accepted, logged and closed.
const BACKLOG: i32 = 8;
/// A pinhole the session forgot about still ends this long after its
/// accept timeout.
const SAFETY_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Entry {
    key: u64,
    mode: DataMode,
    endpoint: SocketAddr,
    /// Addresses a client may use to name this pinhole: the listen address,
    /// the advertised address, and in transparent mode the server's.
    apparent: Vec<IpAddr>,
    cancel: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    by_port: HashMap<u16, Entry>,
    next_key: u64,
}

#[derive(Debug)]
pub struct PinholePool {
    low: u16,
    high: u16,
    inner: Mutex<Inner>,
}

/// A freshly bound pinhole.
#[derive(Debug)]
pub struct Opened {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub key: u64,
    cancel: oneshot::Receiver<()>,
}

/// What a pinhole task reports to its control session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholeUpdate {
    Connected(PinholeId),
    Closed(PinholeId),
}

impl PinholePool {
    pub fn new((low, high): (u16, u16)) -> Self {
        let pool = PinholePool {
            low,
            high,
            inner: Mutex::new(Inner::default()),
        };
        m::port_pool_free(pool.free());
        pool
    }

    fn size(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The registry stays consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ports of the range not held by a pinhole.
    pub fn free(&self) -> usize {
        self.size() - self.lock().by_port.len()
    }

    /// Binds a listener for `req` on a random free port of the range.
    pub fn open(&self, req: &PinholeRequest, apparent: Vec<IpAddr>) -> io::Result<Opened> {
        let size = self.size();
        let start = rand::random_range(0..size);
        let mut inner = self.lock();
        for i in 0..size {
            let port = self.low + ((start + i) % size) as u16;
            if inner.by_port.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(req.listen_ip, port);
            let listener = match bind_listener(addr) {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            };
            let (tx, rx) = oneshot::channel();
            inner.next_key += 1;
            let key = inner.next_key;
            inner.by_port.insert(
                port,
                Entry {
                    key,
                    mode: req.mode,
                    endpoint: req.connect_to,
                    apparent,
                    cancel: Some(tx),
                },
            );
            let free = size - inner.by_port.len();
            drop(inner);
            m::port_pool_free(free);
            m::pinhole_opened(mode_label(req.mode));
            return Ok(Opened {
                listener,
                addr,
                key,
                cancel: rx,
            });
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no free port in the data port range",
        ))
    }

    /// The passive pinhole a client would reach at `target`, if any.
    pub fn resolve(&self, target: SocketAddr) -> Option<Resolved> {
        let target_ip = canonical_ip(target.ip());
        let inner = self.lock();
        let entry = inner.by_port.get(&target.port())?;
        (entry.mode == DataMode::Passive
            && entry.cancel.is_some()
            && entry.apparent.contains(&target_ip))
        .then_some(Resolved {
            pinhole: ForeignPinhole(entry.key),
            endpoint: entry.endpoint,
        })
    }

    /// Closes the pinhole `key` if it is still waiting for its peer.
    pub fn cancel(&self, key: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.by_port.values_mut().find(|e| e.key == key)
            && let Some(tx) = entry.cancel.take()
        {
            let _ = tx.send(());
        }
    }

    fn release(&self, port: u16, key: u64) {
        let mut inner = self.lock();
        if inner.by_port.get(&port).is_some_and(|e| e.key == key) {
            inner.by_port.remove(&port);
        }
        let free = self.size() - inner.by_port.len();
        drop(inner);
        m::port_pool_free(free);
        m::pinhole_closed();
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

pub fn mode_label(mode: DataMode) -> &'static str {
    match mode {
        DataMode::Active => "active",
        DataMode::Passive => "passive",
    }
}

/// Timeouts of the data path.
#[derive(Debug, Clone, Copy)]
pub struct DataTimeouts {
    pub accept: Duration,
    pub connect: Duration,
    pub idle: Duration,
}

/// Everything one pinhole task needs.
pub struct PinholeTask {
    pub pool: Arc<PinholePool>,
    pub opened: Opened,
    pub request: PinholeRequest,
    pub timeouts: DataTimeouts,
    pub updates: mpsc::Sender<PinholeUpdate>,
    pub deny: DenyLog,
    pub info: Arc<SessionInfo>,
}

/// Releases the pool's port when the task ends, however it ends.
struct Release<'a> {
    pool: &'a PinholePool,
    port: u16,
    key: u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.pool.release(self.port, self.key);
    }
}

impl PinholeTask {
    pub async fn run(self) {
        let PinholeTask {
            pool,
            opened,
            request,
            timeouts,
            updates,
            deny,
            info,
        } = self;
        let release = Release {
            pool: &pool,
            port: opened.addr.port(),
            key: opened.key,
        };
        let started = Instant::now();
        let accepted = accept_expected(
            opened.listener,
            opened.cancel,
            &request,
            opened.addr,
            timeouts.accept + SAFETY_MARGIN,
            &deny,
            &info,
        )
        .await;
        let Some(inbound) = accepted else {
            let _ = updates.send(PinholeUpdate::Closed(request.id)).await;
            return;
        };
        m::pinhole_wait(started.elapsed());
        // The pinhole is used up: its listener is closed, its port free for
        // the next one. What follows is a data connection.
        drop(release);
        let _active = m::DataConnectionActive::start();
        let _ = updates.send(PinholeUpdate::Connected(request.id)).await;
        match connect_from(request.connect_from, request.connect_to, timeouts.connect).await {
            Ok(outbound) => {
                let began = Instant::now();
                let (counts, result) = relay::relay(inbound, outbound, timeouts.idle).await;
                // a is the peer that connected in: the client in passive
                // mode, the server in active mode.
                let (down, up) = match request.mode {
                    DataMode::Passive => (counts.b_to_a, counts.a_to_b),
                    DataMode::Active => (counts.a_to_b, counts.b_to_a),
                };
                m::data_connection(mode_label(request.mode), down, up, began.elapsed());
                if let Err(e) = result {
                    tracing::debug!(session = info.id, "data relay ended: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(
                    session = info.id,
                    target = %request.connect_to,
                    "data connection onward failed: {e}"
                );
            }
        }
        let _ = updates.send(PinholeUpdate::Closed(request.id)).await;
    }
}

async fn accept_expected(
    listener: TcpListener,
    mut cancel: oneshot::Receiver<()>,
    request: &PinholeRequest,
    listen: SocketAddr,
    limit: Duration,
    deny: &DenyLog,
    info: &SessionInfo,
) -> Option<TcpStream> {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut cancel => return None,
            () = &mut deadline => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if canonical_ip(peer.ip()) == request.expected_peer => {
                    let _ = stream.set_nodelay(true);
                    return Some(stream);
                }
                Ok((stream, peer)) => {
                    // Someone else raced for the pinhole: PASV theft (or a
                    // server other than the one the PORT was sent to).
                    drop(stream);
                    m::pinhole_refused();
                    let mut denial = Denial::new(DenyReason::PasvTheft, match request.mode {
                        DataMode::Passive => crate::proto::Side::Client,
                        DataMode::Active => crate::proto::Side::Server,
                    })
                    .target(listen)
                    .expected_peer(request.expected_peer);
                    denial.rule = Some("expected_peer_only".into());
                    deny.record(info, &denial, Some(peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("pinhole accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
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
