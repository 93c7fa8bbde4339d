//! The kernel plane: nftables elements per pinhole, conntrack carries the
//! bytes (OpenBSD's ftp-proxy does the same with pf anchors).
//!
//! The static part, loaded by the operator from `ftpgate nft-rules` and
//! checked here at start, is a table `inet ftpgate` with, per family, an
//! `armed` set, a `dnat` map and a `snat` map, keyed by (expected peer,
//! address it connects to, pinhole port). For each pinhole the core decides,
//! ftpgate adds in one transaction: the armed key and the dnat translation
//! for every address the peer may connect to, and the snat source for the
//! onward leg. The prerouting rule deletes the armed key as the first
//! connection matches it, so one pinhole carries one connection; every
//! other connection to the data range falls through to ftpgate's own
//! listener on the first port of the range, where the owning core judges it
//! (PASV theft is logged with the thief's address). Elements carry a kernel
//! timeout a little longer than the core's, so nothing outlives a crash, and
//! the sets are flushed at start, so a restart starts clean.
//!
//! Conntrack events tell ftpgate what happened: a new flow with ftpgate's
//! mark is a pinhole used (its remaining elements are deleted and the owner
//! told), a destroyed one is a data connection ended, with the byte counts
//! of conntrack accounting. When the session that negotiated a flow ends,
//! the flow is deleted from conntrack: the next packet of either side finds
//! no translation, falls through to the gateway itself and is answered with
//! a reset (and the forward chain accepts only marked flows anyway).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::registry::{Entry, Found, Registry, Reservation};
use super::{OpenError, Owner, PlaneEvent, directions, mode_label, proxy};
use crate::clients::Claim;
use crate::config::Data;
use crate::metrics as m;
use crate::netfilter::conntrack::{
    self, CtError, Event as CtEvent, EventKind, EventsConfig, MarkFilter,
};
use crate::netfilter::{
    ElemOp, Endpoint, Family, NftError, Nftables, PinholeKey, PinholeSet, SetElem, SnatKey,
    SnatSource,
};
use crate::proto::policy::{canonical, canonical_ip};
use crate::proto::{DataVerdict, PinholeId, PinholeRequest, SessionId};
use crate::tasks::Tasks;

/// The table the rules of `ftpgate nft-rules` create.
pub const TABLE: &str = "ftpgate";
/// Kernel elements outlive the core's pinhole timer by this much: the core
/// deletes them itself; the kernel timeout only covers a crashed gateway.
const ELEMENT_MARGIN: Duration = Duration::from_secs(5);
/// IP protocol number of TCP: only TCP flows are data connections.
const TCP: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Nft(#[from] NftError),
    #[error("conntrack events: {0}")]
    Conntrack(#[from] CtError),
    #[error("cannot bind the fall-through listener on port {port}: {source}")]
    Trap { port: u16, source: io::Error },
}

/// A data connection the kernel carries, by its original tuple.
struct Flow {
    id: PinholeId,
    owner: Owner,
    request: PinholeRequest,
    began: Instant,
    _active: m::DataConnectionActive,
    /// Its counted data-connection slot.
    _slot: Option<Claim>,
}

/// The flows the kernel carries for ftpgate, by original tuple.
type Flows = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), Flow>>>;

fn lock_flows(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), Flow>> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct KernelPlane {
    registry: Arc<Registry>,
    nft: Arc<Nftables>,
    flows: Flows,
    tasks: Tasks,
}

impl KernelPlane {
    pub async fn start(data: &Data, tasks: Tasks) -> Result<KernelPlane, KernelError> {
        let (low, high) = data.ports;
        let nft = Arc::new(Nftables::open(TABLE)?);
        nft.check_pinhole_sets()?;
        // A restart starts clean: nothing a previous run installed stays.
        let mut flush = Vec::new();
        for family in [Family::V4, Family::V6] {
            for set in [PinholeSet::Armed, PinholeSet::Dnat, PinholeSet::Snat] {
                flush.push(ElemOp::flush(set.name(family)));
            }
        }
        nft.apply(&flush)?;
        if let Err(e) = conntrack::enable_accounting() {
            tracing::warn!(
                "kernel plane: conntrack accounting is off, data byte counts will be 0: {e}"
            );
        }
        if !ip_forwarding() {
            tracing::warn!(
                "kernel plane: IP forwarding is off (net.ipv4.ip_forward); data connections cannot pass"
            );
        }
        let events = conntrack::Events::subscribe(EventsConfig {
            mark: Some(MarkFilter::exact(data.kernel_mark)),
            ..EventsConfig::default()
        })?;
        let registry = Arc::new(Registry::new(low + 1, high));
        let trap4 = bind_trap(SocketAddr::from(([0, 0, 0, 0], low)))?;
        let trap6 = bind_trap(SocketAddr::from(([0u16; 8], low))).ok();
        let flows: Flows = Arc::new(Mutex::new(HashMap::new()));
        let watcher = Watcher {
            registry: Arc::clone(&registry),
            nft: Arc::clone(&nft),
            flows: Arc::clone(&flows),
            mark: data.kernel_mark,
        };
        let stopping = tasks.stopping();
        tasks.spawn(async move {
            tokio::select! {
                () = watcher.run(events) => {}
                () = stopping => {}
            }
        });
        for trap in std::iter::once(trap4).chain(trap6) {
            let serve = fall_through(trap, Arc::clone(&registry), Arc::clone(&nft), tasks.clone());
            let stopping = tasks.stopping();
            tasks.spawn(async move {
                tokio::select! {
                    () = serve => {}
                    () = stopping => {}
                }
            });
        }
        tracing::info!(
            table = TABLE,
            fall_through = low,
            mark = format_args!("{:#x}", data.kernel_mark),
            "kernel data plane ready"
        );
        Ok(KernelPlane {
            registry,
            nft,
            flows,
            tasks,
        })
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
        let timeout = owner.timeouts.accept + ELEMENT_MARGIN;
        let (port, ()) = self.registry.claim(
            |port| {
                let ops = elements(request, &apparent, port, Some(timeout));
                match self.nft.apply(&ops) {
                    // Another gateway process's element: try the next port.
                    Err(NftError::Kernel { errno, .. }) if errno == libc::EEXIST => Ok(None),
                    Ok(()) => Ok(Some(())),
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            },
            |_| Entry::new(request, apparent.clone(), owner, None, Some(reservation)),
        )?;
        Ok(SocketAddr::new(request.listen_ip, port))
    }

    pub fn cancel(&self, id: PinholeId) {
        if let Some((port, entry)) = self.registry.remove(id) {
            delete_elements(&self.nft, &entry.request, &entry.apparent, port);
        }
    }

    /// Deletes the conntrack flows of a session that has ended; their
    /// Destroy events then end them here as usual.
    pub fn end_flows(&self, session: SessionId) {
        let tuples: Vec<(SocketAddr, SocketAddr)> = lock_flows(&self.flows)
            .iter()
            .filter(|(_, f)| f.id.session == session)
            .map(|(t, _)| *t)
            .collect();
        if tuples.is_empty() {
            return;
        }
        self.tasks.spawn(async move {
            for (src, dst) in tuples {
                let orig = conntrack::Tuple {
                    src,
                    dst,
                    proto: TCP,
                };
                if let Err(e) = conntrack::delete(&orig).await {
                    tracing::warn!(%src, %dst, "kernel plane: cannot delete the flow of an ended session: {e}");
                }
            }
        });
    }
}

/// The elements of one pinhole: add them (with `timeout`) or, without one,
/// delete them. A pinhole whose two legs have different address families
/// gets none: its connection falls through to the listener, which relays it.
fn elements(
    request: &PinholeRequest,
    apparent: &[IpAddr],
    port: u16,
    timeout: Option<Duration>,
) -> Vec<ElemOp> {
    let peer = canonical_ip(request.expected_peer);
    let to = Endpoint(canonical(request.connect_to));
    let from = SnatSource(canonical_ip(request.connect_from));
    let family = Family::of(peer);
    if to.family() != family || from.family() != family {
        return Vec::new();
    }
    let mut ops = Vec::new();
    let mut put = |set: PinholeSet, key: &dyn NftKey, data: Option<&dyn NftKey>| {
        let name = set.name(family);
        ops.push(match timeout {
            Some(timeout) => {
                let mut elem = key.elem().with_timeout(timeout);
                if let Some(data) = data {
                    elem = data.data_of(elem);
                }
                ElemOp::add(name, elem)
            }
            None => key.delete(name),
        });
    };
    for local in apparent.iter().map(|a| canonical_ip(*a)) {
        let Ok(key) = PinholeKey::new(peer, local, port) else {
            continue;
        };
        put(PinholeSet::Armed, &key, None);
        put(PinholeSet::Dnat, &key, Some(&to));
    }
    if let Ok(key) = SnatKey::new(peer, to.0) {
        put(PinholeSet::Snat, &key, Some(&from));
    }
    ops
}

/// What `elements` needs of a key or a value, whatever its type.
trait NftKey {
    fn elem(&self) -> SetElem;
    fn data_of(&self, elem: SetElem) -> SetElem;
    fn delete(&self, set: String) -> ElemOp;
}

impl<T: crate::netfilter::NftValue> NftKey for T {
    fn elem(&self) -> SetElem {
        SetElem::new(self)
    }
    fn data_of(&self, elem: SetElem) -> SetElem {
        elem.with_data(self)
    }
    fn delete(&self, set: String) -> ElemOp {
        ElemOp::delete(set, self)
    }
}

fn delete_elements(nft: &Nftables, request: &PinholeRequest, apparent: &[IpAddr], port: u16) {
    let ops = elements(request, apparent, port, None);
    if ops.is_empty() {
        return;
    }
    if let Err(e) = nft.apply(&ops) {
        // The kernel timeout removes them anyway.
        tracing::warn!(?request.id, "kernel plane: cannot delete pinhole elements: {e}");
    }
}

fn bind_trap(addr: SocketAddr) -> Result<TcpListener, KernelError> {
    crate::server::bind(addr).map_err(|source| KernelError::Trap {
        port: addr.port(),
        source,
    })
}

fn ip_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

/// Follows conntrack: flows with ftpgate's mark are pinholes being used.
struct Watcher {
    registry: Arc<Registry>,
    nft: Arc<Nftables>,
    flows: Flows,
    mark: u32,
}

impl Watcher {
    async fn run(self, mut events: conntrack::Events) {
        loop {
            match events.next().await {
                Ok(event) => self.handle(event).await,
                Err(CtError::Overrun) => {
                    m::conntrack_overrun();
                    tracing::warn!(
                        "kernel plane: conntrack events lost (receive buffer overrun); resynchronising"
                    );
                    self.resync().await;
                }
                Err(e) => {
                    tracing::error!("kernel plane: conntrack events failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn handle(&self, event: CtEvent) {
        let flow = event.flow;
        if flow.mark != self.mark || flow.orig.proto != TCP {
            return;
        }
        let tuple = (canonical(flow.orig.src), canonical(flow.orig.dst));
        match event.kind {
            EventKind::New => self.established(tuple).await,
            EventKind::Destroy => {
                let ours = self.lock_flows().remove(&tuple);
                if let Some(ours) = ours {
                    let bytes = |c: Option<conntrack::Counters>| c.map_or(0, |c| c.bytes);
                    ended(ours, bytes(flow.orig_counters), bytes(flow.reply_counters)).await;
                }
            }
        }
    }

    fn lock_flows(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), Flow>> {
        lock_flows(&self.flows)
    }

    /// A marked flow appeared: the pinhole at its destination port is used.
    async fn established(&self, (src, dst): (SocketAddr, SocketAddr)) {
        let Some(Found {
            id,
            owner,
            request,
            opened,
        }) = self.registry.at_port(dst.port())
        else {
            return;
        };
        if src.ip() != request.expected_peer {
            // Cannot happen through the rules (the key is the peer); never
            // account somebody else's flow to this pinhole.
            return;
        }
        let mut slot = None;
        if let Some((port, mut entry)) = self.registry.remove(id) {
            delete_elements(&self.nft, &entry.request, &entry.apparent, port);
            slot = entry.reservation.take().map(Reservation::into_connection);
        }
        m::pinhole_wait(opened.elapsed());
        let flow = Flow {
            id,
            owner: owner.clone(),
            request,
            began: Instant::now(),
            _active: m::DataConnectionActive::start(),
            _slot: slot,
        };
        self.lock_flows().insert((src, dst), flow);
        if owner.events.is_closed() {
            // The session ended while the flow was being set up.
            let orig = conntrack::Tuple {
                src,
                dst,
                proto: TCP,
            };
            if let Err(e) = conntrack::delete(&orig).await {
                tracing::warn!(%src, %dst, "kernel plane: cannot delete the flow of an ended session: {e}");
            }
            return;
        }
        owner
            .report(PlaneEvent::Established { id, peer: src })
            .await;
    }

    /// After lost events: flows the kernel no longer has are over (their
    /// byte counts are lost), flows it has that we missed are taken up.
    async fn resync(&self) {
        let live = match conntrack::dump(MarkFilter::exact(self.mark)).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!("kernel plane: conntrack dump failed: {e}");
                return;
            }
        };
        let live: Vec<(SocketAddr, SocketAddr)> = live
            .iter()
            .filter(|f| f.orig.proto == TCP)
            .map(|f| (canonical(f.orig.src), canonical(f.orig.dst)))
            .collect();
        let gone: Vec<Flow> = {
            let mut flows = self.lock_flows();
            let dead: Vec<_> = flows
                .keys()
                .filter(|k| !live.contains(k))
                .copied()
                .collect();
            dead.iter().filter_map(|k| flows.remove(k)).collect()
        };
        for flow in gone {
            ended(flow, 0, 0).await;
        }
        for tuple in live {
            let known = self.lock_flows().contains_key(&tuple);
            if !known {
                self.established(tuple).await;
            }
        }
    }
}

async fn ended(flow: Flow, from_peer: u64, to_peer: u64) {
    let (down, up) = directions(flow.request.mode, from_peer, to_peer);
    m::data_connection(
        "kernel",
        mode_label(flow.request.mode),
        down,
        up,
        flow.began.elapsed(),
    );
    flow.owner.report(PlaneEvent::Closed { id: flow.id }).await;
}

/// ftpgate's listener for connections to the data range that matched no
/// element: a thief, a second connection to a used pinhole, or a pinhole
/// the kernel cannot translate (its legs differ in address family). The
/// owning core judges each; the expected peer is relayed in userland.
async fn fall_through(
    listener: TcpListener,
    registry: Arc<Registry>,
    nft: Arc<Nftables>,
    tasks: Tasks,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("fall-through accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = canonical(peer);
        let Some(port) = crate::server::original_dst(&stream).map(|a| a.port()) else {
            continue;
        };
        let Some(Found {
            id, owner, request, ..
        }) = registry.at_port(port)
        else {
            // No pinhole holds this port (used, expired, never opened):
            // nobody's session to judge it, so it is counted and closed.
            m::pinhole_refused();
            tracing::debug!(%peer, port, "connection to a data port with no pinhole refused");
            continue;
        };
        let registry = Arc::clone(&registry);
        let nft = Arc::clone(&nft);
        tasks.spawn(async move {
            match owner.ask(id, peer, proxy::VERDICT_TIMEOUT).await {
                DataVerdict::Accept => {
                    let Some((port, mut entry)) = registry.remove(id) else {
                        // Withdrawn in the meantime: its session has ended.
                        return;
                    };
                    delete_elements(&nft, &entry.request, &entry.apparent, port);
                    let slot = entry.reservation.take().map(Reservation::into_connection);
                    proxy::carry(stream, &request, &owner, slot).await;
                }
                DataVerdict::Refuse => {
                    m::pinhole_refused();
                    drop(stream);
                }
            }
        });
    }
}

/// `ftpgate pinholes`: the kernel plane's live elements, one line each,
/// read back over netlink (what the gateway installed, as the kernel holds
/// it now).
pub fn list_pinholes() -> Result<String, NftError> {
    use std::fmt::Write;
    let nft = Nftables::open(TABLE)?;
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        for set in [PinholeSet::Armed, PinholeSet::Dnat, PinholeSet::Snat] {
            let name = set.name(family);
            for elem in nft.list(&name)? {
                let key = match set {
                    PinholeSet::Snat => SnatKey::from_nft_bytes(&elem.key)
                        .map(|k| format!("peer {} to {}", k.peer(), k.endpoint())),
                    _ => PinholeKey::from_nft_bytes(&elem.key)
                        .map(|k| format!("peer {} to {}:{}", k.peer(), k.local(), k.port())),
                };
                let data = elem.data.as_deref().and_then(|d| match set {
                    PinholeSet::Dnat => Endpoint::from_nft_bytes(d).map(|e| e.0.to_string()),
                    PinholeSet::Snat => SnatSource::from_nft_bytes(d).map(|s| s.0.to_string()),
                    PinholeSet::Armed => None,
                });
                let _ = write!(out, "{name:7} {}", key.unwrap_or_else(|| "?".into()));
                if let Some(data) = data {
                    let _ = write!(out, " -> {data}");
                }
                if let Some(left) = elem.expiration {
                    let _ = write!(out, " (expires in {:.1}s)", left.as_secs_f64());
                }
                out.push('\n');
            }
        }
    }
    Ok(out)
}
