//! The registry of live pinholes: the data-port range, and for every pinhole
//! waiting for its peer the port it holds, its key and its owner.
//!
//! It is the only table shared between sessions. It holds no pinhole state
//! (waiting, connected, expired: the owning core decides those); only the
//! facts fixed at open time that a plane or another session needs to find a
//! pinhole by port: who may connect, where it leads, who may name it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use super::{OpenError, Owner};
use crate::clients::{Claim, Counter};
use crate::metrics as m;
use crate::proto::policy::canonical_ip;
use crate::proto::{DataMode, PinholeId, PinholeRequest, Resolved, SessionId, Shape};

/// One live pinhole.
pub struct Entry {
    pub id: PinholeId,
    pub owner: Owner,
    pub request: PinholeRequest,
    /// Addresses the expected peer may connect to (see
    /// [`super::apparent_addresses`]).
    pub apparent: Vec<IpAddr>,
    /// The client of the session that opened it: the only client that may
    /// name it in a PORT (FXP).
    pub opener: IpAddr,
    /// When it was opened (for the wait histogram).
    pub opened: Instant,
    /// Proxy plane: stops the pinhole's listener.
    pub cancel: Option<oneshot::Sender<()>>,
    /// Kernel plane, a two-leg pinhole (`server_data = "active"`): where
    /// the fall-through listener hands each accepted leg.
    pub handoff: Option<Handoff>,
    /// Its counted slots; released when the entry is dropped, except the
    /// data connection's, which the connection takes at accept.
    pub reservation: Option<Reservation>,
}

/// A pinhole's counted slots: itself, and the data connection it will
/// carry.
#[derive(Debug)]
pub struct Reservation {
    _pinhole: Claim,
    connection: Claim,
}

impl Reservation {
    /// The pinhole is used: its own slot is free again, the data
    /// connection's slot goes with the connection.
    pub fn into_connection(self) -> Claim {
        self.connection
    }
}

impl Entry {
    /// The entry for `request`, opened now by `owner`'s session.
    pub fn new(
        request: &PinholeRequest,
        apparent: Vec<IpAddr>,
        owner: &Owner,
        cancel: Option<oneshot::Sender<()>>,
        reservation: Option<Reservation>,
    ) -> Entry {
        Entry {
            id: request.id,
            owner: owner.clone(),
            request: request.clone(),
            apparent,
            opener: owner.info.client.ip(),
            opened: Instant::now(),
            cancel,
            handoff: None,
            reservation,
        }
    }
}

/// Takes the accepted legs of a two-leg pinhole to the task that pairs
/// them.
pub type Handoff = tokio::sync::mpsc::Sender<(tokio::net::TcpStream, SocketAddr)>;

/// A copy of what a plane needs to act on a connection to a port.
#[derive(Clone)]
pub struct Found {
    pub id: PinholeId,
    pub owner: Owner,
    pub request: PinholeRequest,
    pub opened: Instant,
    pub handoff: Option<Handoff>,
}

#[derive(Default)]
struct Inner {
    by_port: HashMap<u16, Entry>,
    by_id: HashMap<PinholeId, u16>,
    /// Ports whose pinhole is gone but that are not handed out again yet.
    quarantined: HashMap<u16, Hold>,
}

/// Why a port whose pinhole is gone stays out of use (kernel plane).
#[derive(Debug, Clone, Copy, Default)]
struct Hold {
    /// Its kernel elements are still being deleted.
    elements: bool,
    /// It was withdrawn before its flow was seen: a conntrack event for a
    /// connection that matched it just before may still be on its way, and
    /// must not find another pinhole at this port (the mark names the
    /// port). Until this instant, or until that event comes.
    flow_until: Option<Instant>,
}

impl Hold {
    fn holds(&self, now: Instant) -> bool {
        self.elements || self.flow_until.is_some_and(|until| now < until)
    }
}

impl Inner {
    /// Ports held no longer go back to the pool.
    fn sweep(&mut self, now: Instant) {
        self.quarantined.retain(|_, hold| hold.holds(now));
    }

    /// Ports of a range of `size` neither held by a pinhole nor kept out.
    fn free(&self, size: usize) -> usize {
        size - self.by_port.len() - self.quarantined.len()
    }
}

pub struct Registry {
    low: u16,
    high: u16,
    inner: Mutex<Inner>,
    /// Waiting pinholes, per client and in total.
    pinholes: std::sync::Arc<Counter>,
    /// Data connections (carried, or reserved by a waiting pinhole).
    connections: std::sync::Arc<Counter>,
}

impl Registry {
    /// A registry handing out ports `low..=high`.
    pub fn new(low: u16, high: u16) -> Registry {
        let registry = Registry {
            low,
            high,
            inner: Mutex::new(Inner::default()),
            pinholes: Counter::new(),
            connections: Counter::new(),
        };
        m::port_pool_free(registry.size());
        registry
    }

    fn size(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The tables stay consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims a pinhole slot and a data-connection slot for `owner`'s
    /// client, under the caps of its session.
    pub fn reserve(&self, owner: &Owner) -> Result<Reservation, OpenError> {
        let client = owner.info.source;
        let pinhole = self
            .pinholes
            .claim(client, owner.caps.pinholes)
            .map_err(OpenError::Pinholes)?;
        let connection = self
            .connections
            .claim(client, owner.caps.connections)
            .map_err(OpenError::Connections)?;
        Ok(Reservation {
            _pinhole: pinhole,
            connection,
        })
    }

    /// Ports of the range not held by a pinhole.
    pub fn free(&self) -> usize {
        let mut inner = self.lock();
        inner.sweep(Instant::now());
        inner.free(self.size())
    }

    /// Sets the free-port gauge from `inner`, once its lock is released.
    fn report_free(&self, inner: MutexGuard<'_, Inner>) {
        let free = inner.free(self.size());
        drop(inner);
        m::port_pool_free(free);
    }

    /// Ports whose holds have run out go back to the pool.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        inner.sweep(Instant::now());
        self.report_free(inner);
    }

    /// The flow `port` was held for has been seen.
    pub fn flow_seen(&self, port: u16) {
        let mut inner = self.lock();
        if let Some(hold) = inner.quarantined.get_mut(&port) {
            hold.flow_until = None;
        }
        inner.sweep(Instant::now());
        self.report_free(inner);
    }

    /// Finds a free port, starting at a random one, for which `try_port`
    /// succeeds (`Ok(None)`: that port is taken by someone else, try the
    /// next), and registers the pinhole `make(port, value)` returns there.
    pub fn claim<T>(
        &self,
        mut try_port: impl FnMut(u16) -> io::Result<Option<T>>,
        make: impl FnOnce(u16) -> Entry,
    ) -> io::Result<(u16, T)> {
        let size = self.size();
        let start = rand::random_range(0..size);
        let mut inner = self.lock();
        inner.sweep(Instant::now());
        for i in 0..size {
            let port = self.low + ((start + i) % size) as u16;
            if inner.by_port.contains_key(&port) || inner.quarantined.contains_key(&port) {
                continue;
            }
            let Some(value) = try_port(port)? else {
                continue;
            };
            let entry = make(port);
            let mode = super::mode_label(entry.request.mode);
            inner.by_id.insert(entry.id, port);
            inner.by_port.insert(port, entry);
            self.report_free(inner);
            m::pinhole_opened(mode);
            return Ok((port, value));
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no free port in the data port range",
        ))
    }

    /// Removes pinhole `id` (used, cancelled or expired) and frees its port.
    pub fn remove(&self, id: PinholeId) -> Option<(u16, Entry)> {
        self.take(id, None)
    }

    /// Removes pinhole `id` but keeps its port out of use until
    /// [`Registry::release`]: its kernel elements are still to be deleted.
    /// With `flow_until`, also until then or [`Registry::flow_seen`]
    /// (it was withdrawn before its flow was seen).
    pub fn remove_quarantined(
        &self,
        id: PinholeId,
        flow_until: Option<Instant>,
    ) -> Option<(u16, Entry)> {
        self.take(
            id,
            Some(Hold {
                elements: true,
                flow_until,
            }),
        )
    }

    fn take(&self, id: PinholeId, hold: Option<Hold>) -> Option<(u16, Entry)> {
        let mut inner = self.lock();
        let port = inner.by_id.remove(&id)?;
        let entry = inner.by_port.remove(&port)?;
        if let Some(hold) = hold {
            inner.quarantined.insert(port, hold);
        }
        self.report_free(inner);
        m::pinhole_closed();
        Some((port, entry))
    }

    /// Ports whose elements are deleted: back in the pool unless a flow
    /// hold keeps them a little longer.
    pub fn release(&self, ports: &[u16]) {
        let mut inner = self.lock();
        for port in ports {
            if let Some(hold) = inner.quarantined.get_mut(port) {
                hold.elements = false;
            }
        }
        inner.sweep(Instant::now());
        self.report_free(inner);
    }

    /// The pinhole holding `port`, if any.
    pub fn at_port(&self, port: u16) -> Option<Found> {
        let inner = self.lock();
        inner.by_port.get(&port).map(|e| Found {
            id: e.id,
            owner: e.owner.clone(),
            request: e.request.clone(),
            opened: e.opened,
            handoff: e.handoff.clone(),
        })
    }

    /// The live passive pinhole `client` names with `target`.
    pub fn resolve(&self, target: SocketAddr, client: IpAddr) -> Option<Resolved> {
        let target_ip = canonical_ip(target.ip());
        let client = canonical_ip(client);
        let inner = self.lock();
        let entry = inner.by_port.get(&target.port())?;
        // A translated pinhole has no single endpoint behind it to hand
        // to a second server.
        (entry.request.mode == DataMode::Passive
            && entry.request.shape == Shape::Relay
            && entry.opener == client
            && entry.apparent.contains(&target_ip))
        .then_some(Resolved {
            pinhole: entry.id,
            endpoint: entry.request.connect_to,
        })
    }

    pub fn owner(&self, id: PinholeId) -> Option<Owner> {
        let inner = self.lock();
        let port = inner.by_id.get(&id)?;
        inner.by_port.get(port).map(|e| e.owner.clone())
    }

    /// The live pinholes of one session.
    pub fn ids_of_session(&self, session: SessionId) -> Vec<PinholeId> {
        let inner = self.lock();
        inner
            .by_id
            .keys()
            .filter(|id| id.session == session)
            .copied()
            .collect()
    }

    /// Runs `f` on the entry of pinhole `id`.
    pub fn with_entry<R>(&self, id: PinholeId, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let mut inner = self.lock();
        let port = *inner.by_id.get(&id)?;
        inner.by_port.get_mut(&port).map(f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::clients::{Caps, ClientKey};
    use crate::config::{DataCaps, Mode};
    use crate::dataplane::DataTimeouts;
    use crate::denylog::SessionInfo;

    const GATEWAY_INSIDE: &str = "192.0.2.1";
    const OPENER: &str = "192.0.2.10";
    const OTHER_CLIENT: &str = "192.0.2.11";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owner(session: u64, client: &str) -> Owner {
        let client: SocketAddr = SocketAddr::new(ip(client), 40000);
        let caps = Caps {
            total: 100,
            per_client: 100,
        };
        Owner {
            tls: None,
            events: mpsc::channel(1).0,
            info: Arc::new(SessionInfo {
                id: session,
                mode: Mode::Transparent,
                client,
                server: Some("198.51.100.20:21".parse().unwrap()),
                source: ClientKey::of(client.ip(), 64),
            }),
            timeouts: DataTimeouts {
                accept: Duration::from_secs(30),
                connect: Duration::from_secs(10),
                idle: Duration::from_secs(300),
            },
            caps: DataCaps {
                pinholes: caps,
                connections: caps,
            },
            proxied: None,
        }
    }

    /// Registers a pinhole of `mode` opened by `owner`'s session; returns
    /// its port.
    fn open(registry: &Registry, owner: &Owner, mode: DataMode) -> (PinholeId, u16) {
        let request = PinholeRequest {
            id: PinholeId {
                session: SessionId(owner.info.id),
                seq: 1,
            },
            mode,
            listen_ip: ip(GATEWAY_INSIDE),
            expected_peer: owner.info.client.ip(),
            connect_to: "198.51.100.20:40001".parse().unwrap(),
            client_tls: false,
            connect_from: "198.51.100.1".parse().unwrap(),
            shape: crate::proto::Shape::Relay,
        };
        let (port, ()) = registry
            .claim(
                |_| Ok(Some(())),
                |_| Entry::new(&request, vec![request.listen_ip], owner, None, None),
            )
            .unwrap();
        (request.id, port)
    }

    /// Only the client address that opened a pinhole
    /// may name it in a PORT (its other sessions are how FXP works); for any
    /// other client the pinhole does not exist, so the core's policy sees a
    /// plain third-host target (a bounce, RFC 2577).
    #[test]
    fn a_pinhole_is_resolved_only_for_the_client_address_that_opened_it() {
        let registry = Registry::new(50000, 50009);
        let (id, port) = open(&registry, &owner(1, OPENER), DataMode::Passive);
        let target = SocketAddr::new(ip(GATEWAY_INSIDE), port);
        let found = Resolved {
            pinhole: id,
            endpoint: "198.51.100.20:40001".parse().unwrap(),
        };
        assert_eq!(registry.resolve(target, ip(OPENER)), Some(found));
        // Another session of the same client (mapped form included).
        assert_eq!(
            registry.resolve(target, ip("::ffff:192.0.2.10")),
            Some(found)
        );
        // Anyone else: nothing there.
        assert_eq!(registry.resolve(target, ip(OTHER_CLIENT)), None);
        assert_eq!(registry.resolve(target, ip("::ffff:192.0.2.11")), None);
        // Only the addresses the pinhole is reachable at name it.
        let elsewhere = SocketAddr::new(ip("198.51.100.1"), port);
        assert_eq!(registry.resolve(elsewhere, ip(OPENER)), None);
    }

    /// Kernel plane: conntrack reports a flow by the port in its mark. A
    /// pinhole withdrawn before its flow was reported keeps its port out of
    /// use until that report (or a deadline), even once its elements are
    /// deleted, so a late report cannot find the next pinhole there and
    /// withdraw it (seen in the session benchmark: the next client's data
    /// connection then fell through and the session stalled).
    #[test]
    fn a_port_withdrawn_before_its_flow_was_seen_is_held_until_it_is() {
        let registry = Registry::new(50000, 50000);
        let owner = owner(1, OPENER);
        let (id, port) = open(&registry, &owner, DataMode::Passive);
        let later = Instant::now() + Duration::from_secs(60);
        registry.remove_quarantined(id, Some(later)).unwrap();
        registry.release(&[port]);
        assert_eq!(registry.free(), 0, "held for its flow");
        registry.flow_seen(port);
        assert_eq!(registry.free(), 1);

        // Without a report the hold ends at its deadline.
        let (id, port) = open(&registry, &owner, DataMode::Passive);
        registry
            .remove_quarantined(id, Some(Instant::now() + Duration::from_millis(20)))
            .unwrap();
        registry.release(&[port]);
        assert_eq!(registry.free(), 0);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(registry.free(), 1);

        // A pinhole whose flow was seen waits only for its elements.
        let (id, port) = open(&registry, &owner, DataMode::Passive);
        registry.remove_quarantined(id, None).unwrap();
        assert_eq!(registry.free(), 0, "elements still there");
        registry.release(&[port]);
        assert_eq!(registry.free(), 1);
    }

    #[test]
    fn an_active_pinhole_is_never_resolved() {
        let registry = Registry::new(50000, 50009);
        let (_, port) = open(&registry, &owner(1, OPENER), DataMode::Active);
        let target = SocketAddr::new(ip(GATEWAY_INSIDE), port);
        assert_eq!(registry.resolve(target, ip(OPENER)), None);
    }
}
