//! Conntrack events and dumps over ctnetlink
//! (linux/netfilter/nfnetlink_conntrack.h), driven by tokio.
//!
//! [`Events`] joins the NFNLGRP_CONNTRACK_NEW and _DESTROY multicast groups
//! of the calling thread's network namespace. The kernel drops events when
//! the socket's receive buffer is full and reports that once as ENOBUFS;
//! that surfaces as [`CtError::Overrun`], after which the caller rebuilds
//! its view with [`dump`] (filtered by mark in the kernel) and carries on
//! with the same subscription.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use netlink_sys::Socket;
use tokio::io::unix::AsyncFd;

use super::msg::{
    self, Attr, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, Writer,
};
use super::sock;

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_CTNETLINK: u8 = 1;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
// enum cntl_msg_types
const IPCTNL_MSG_CT_NEW: u8 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
const IPCTNL_MSG_CT_DELETE: u8 = 2;
// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_MARK_MASK: u16 = 21;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RECV_CHUNK: usize = 64 * 1024;
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the kernel keeps the per-namespace switch for byte counters.
pub const ACCT_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";

/// Matches flows whose `mark & mask == mark & mask`, like `ct mark and MASK
/// == MARK` in nft and CTA_MARK/CTA_MARK_MASK in a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkFilter {
    pub mark: u32,
    pub mask: u32,
}

impl MarkFilter {
    pub fn exact(mark: u32) -> Self {
        Self {
            mark,
            mask: u32::MAX,
        }
    }

    pub fn matches(&self, mark: u32) -> bool {
        mark & self.mask == self.mark & self.mask
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    New,
    Destroy,
}

/// One direction of a flow. Ports are 0 for protocols without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// IP protocol number (6 for TCP).
    pub proto: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    /// Layer-3 bytes: IP and TCP headers included.
    pub bytes: u64,
}

/// A conntrack entry as an event or a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// CTA_ID: ties a Destroy to its New.
    pub id: Option<u32>,
    pub orig: Tuple,
    pub reply: Tuple,
    /// 0 when the kernel leaves CTA_MARK out, as it does for mark 0 in events.
    pub mark: u32,
    /// Present when net.netfilter.nf_conntrack_acct was 1 as the flow began
    /// (see [`enable_accounting`]); events carry them on Destroy.
    pub orig_counters: Option<Counters>,
    pub reply_counters: Option<Counters>,
    /// CTA_STATUS: the IPS_* bits (events carry it, Destroy included).
    pub status: u32,
}

/// IPS_ASSURED: for TCP, the handshake completed.
const IPS_ASSURED: u32 = 1 << 2;

impl Flow {
    /// Whether the connection got established (TCP: its handshake
    /// completed), as the kernel's status says.
    pub fn assured(&self) -> bool {
        self.status & IPS_ASSURED != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub flow: Flow,
}

#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Receive buffer asked for, in bytes; default 8 MiB. The kernel grants
    /// twice the request (socket(7)); without CAP_NET_ADMIN it is capped at
    /// net.core.rmem_max.
    pub receive_buffer: usize,
    /// Only events whose mark matches are yielded; default: all.
    pub mark: Option<MarkFilter>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            receive_buffer: 8 * 1024 * 1024,
            mark: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error("cannot open a conntrack netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("conntrack sockets need a tokio runtime on this thread")]
    NoRuntime,
    #[error("conntrack netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "conntrack events were lost (receive buffer overrun, ENOBUFS): resynchronise with a dump"
    )]
    Overrun,
    #[error("conntrack {op} failed: {} (errno {errno})", io::Error::from_raw_os_error(*.errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("conntrack dump did not finish within {0:?}")]
    Timeout(Duration),
    #[error(
        "cannot enable conntrack byte counters by writing 1 to {path}: {source} \
         (needs root and the nf_conntrack module loaded)"
    )]
    Accounting {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Turns on per-flow byte and packet counters (net.netfilter.nf_conntrack_acct)
/// in the calling thread's network namespace. Flows that already exist stay
/// without counters.
pub fn enable_accounting() -> Result<(), CtError> {
    let err = |source| CtError::Accounting {
        path: ACCT_SYSCTL,
        source,
    };
    std::fs::write(ACCT_SYSCTL, "1\n").map_err(err)?;
    let now = std::fs::read_to_string(ACCT_SYSCTL).map_err(err)?;
    if now.trim() != "1" {
        return Err(err(io::Error::other(format!(
            "it reads {:?} afterwards",
            now.trim()
        ))));
    }
    Ok(())
}

fn async_socket(receive_buffer: usize) -> Result<(AsyncFd<Socket>, usize), CtError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(CtError::NoRuntime);
    }
    let sock = sock::open().map_err(CtError::Open)?;
    sock.set_non_blocking(true).map_err(CtError::Open)?;
    let granted = sock::grow_receive_buffer(&sock, receive_buffer).map_err(CtError::Open)?;
    // SAFETY: the netlink Socket owns its fd and closes it only on drop,
    // after AsyncFd has deregistered it; nothing here replaces the fd.
    let fd = unsafe { AsyncFd::register(sock) }.map_err(|e| CtError::Open(e.into()))?;
    Ok((fd, granted))
}

/// Receives one datagram into `buf` once the socket is readable.
async fn recv(fd: &AsyncFd<Socket>, buf: &mut Vec<u8>) -> Result<(), CtError> {
    loop {
        let mut guard = fd.readable().await.map_err(|source| CtError::Io {
            op: "wait for events",
            source,
        })?;
        let got = guard.try_io(|s| {
            buf.clear();
            s.get_ref().recv(buf, 0)
        });
        match got {
            Err(_would_block) => continue,
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if sock::errno(&e) == libc::ENOBUFS => return Err(CtError::Overrun),
            Ok(Err(e)) if sock::errno(&e) == libc::EINTR => continue,
            Ok(Err(source)) => {
                return Err(CtError::Io {
                    op: "receive",
                    source,
                });
            }
        }
    }
}

/// A subscription to conntrack New and Destroy events.
pub struct Events {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
    queue: VecDeque<Event>,
    mark: Option<MarkFilter>,
    receive_buffer: usize,
}

impl Events {
    /// Subscribes in the calling thread's network namespace; must run
    /// inside a tokio runtime. Destroy events carry counters only with
    /// [`enable_accounting`].
    pub fn subscribe(config: EventsConfig) -> Result<Self, CtError> {
        let (fd, granted) = async_socket(config.receive_buffer)?;
        for group in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            fd.get_ref().add_membership(group).map_err(CtError::Open)?;
        }
        Ok(Self {
            fd,
            buf: Vec::with_capacity(RECV_CHUNK),
            queue: VecDeque::new(),
            mark: config.mark,
            receive_buffer: granted,
        })
    }

    /// The receive buffer the kernel granted, in bytes.
    pub fn receive_buffer(&self) -> usize {
        self.receive_buffer
    }

    /// The next matching event. Cancel-safe: a datagram is parsed into the
    /// queue in the same poll that receives it. After [`CtError::Overrun`]
    /// the subscription keeps working; events were lost in between.
    pub async fn next(&mut self) -> Result<Event, CtError> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Ok(ev);
            }
            recv(&self.fd, &mut self.buf).await?;
            for m in msg::messages(&self.buf) {
                let Some(ev) = parse_event(&m) else {
                    continue;
                };
                if self.mark.is_none_or(|f| f.matches(ev.flow.mark)) {
                    self.queue.push_back(ev);
                }
            }
        }
    }
}

/// The conntrack entries of the calling thread's namespace whose mark
/// matches `filter`, of both address families; the kernel does the
/// filtering (IPCTNL_MSG_CT_GET dump with CTA_MARK and CTA_MARK_MASK).
/// Bounded by a 5 s timeout. As a side effect the kernel reaps expired
/// entries it walks past, which sends their Destroy events.
pub async fn dump(filter: MarkFilter) -> Result<Vec<Flow>, CtError> {
    let (fd, _) = async_socket(RECV_CHUNK)?;
    let seq = 1;
    let mut w = Writer::new();
    w.begin(
        (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        AF_UNSPEC,
        0,
    );
    w.attr_be32(CTA_MARK, filter.mark);
    w.attr_be32(CTA_MARK_MASK, filter.mask);
    w.end();
    fd.get_ref()
        .send(w.as_bytes(), 0)
        .map_err(|source| CtError::Io {
            op: "send dump request",
            source,
        })?;
    let collect = async {
        let mut buf = Vec::with_capacity(RECV_CHUNK);
        let mut flows = Vec::new();
        loop {
            recv(&fd, &mut buf).await?;
            for m in msg::messages(&buf).filter(|m| m.seq == seq) {
                match m.ty {
                    NLMSG_DONE => return Ok(flows),
                    NLMSG_ERROR => {
                        if let Some(e) = msg::parse_error(&m).filter(|e| e.errno != 0) {
                            return Err(CtError::Kernel {
                                op: "dump",
                                errno: e.errno,
                            });
                        }
                    }
                    _ if m.subsys() == NFNL_SUBSYS_CTNETLINK
                        && m.subsys_msg() == IPCTNL_MSG_CT_NEW =>
                    {
                        // Kernels before 4.x ignore the mark filter of a dump.
                        if let Some(flow) = parse_flow(&m).filter(|f| filter.matches(f.mark)) {
                            flows.push(flow);
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    tokio::time::timeout(DUMP_TIMEOUT, collect)
        .await
        .map_err(|_| CtError::Timeout(DUMP_TIMEOUT))?
}

/// Deletes conntrack entries over one blocking socket that stays open.
/// Opening and closing a netlink socket per delete is not free: closing one
/// waited out an RCU grace period here (20-30 ms), which on a runtime
/// thread stalled every session; a long-lived socket on a thread of its own
/// (the kernel plane's reaper) costs a round trip per delete.
pub struct Deleter {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Deleter {
    /// A socket in the calling thread's namespace; every reply wait is
    /// bounded by [`DUMP_TIMEOUT`].
    pub fn open() -> Result<Self, CtError> {
        let sock = sock::open().map_err(CtError::Open)?;
        sock::set_recv_timeout(&sock, DUMP_TIMEOUT).map_err(CtError::Open)?;
        Ok(Deleter {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_CHUNK),
        })
    }

    /// Deletes the entry whose original tuple is `orig`; one already gone
    /// (ENOENT) is no error. The kernel sends its Destroy event as usual.
    pub fn delete(&mut self, orig: &Tuple) -> Result<(), CtError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let request = delete_request(orig, seq);
        self.sock.send(&request, 0).map_err(|source| CtError::Io {
            op: "send delete request",
            source,
        })?;
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(CtError::Timeout(DUMP_TIMEOUT));
                }
                Err(source) => {
                    return Err(CtError::Io {
                        op: "receive delete answer",
                        source,
                    });
                }
            }
            let answer = msg::messages(&self.buf).find(|m| m.seq == seq && m.ty == NLMSG_ERROR);
            let Some(answer) = answer else {
                // An answer to an earlier request that timed out: skip it.
                continue;
            };
            return match msg::parse_error(&answer).map(|e| e.errno) {
                Some(0) | Some(libc::ENOENT) => Ok(()),
                Some(errno) => Err(CtError::Kernel {
                    op: "delete",
                    errno,
                }),
                None => Err(CtError::Kernel {
                    op: "delete",
                    errno: libc::EPROTO,
                }),
            };
        }
    }
}

/// The IPCTNL_MSG_CT_DELETE request for the entry whose original tuple is
/// `orig`.
fn delete_request(orig: &Tuple, seq: u32) -> Vec<u8> {
    let family = if orig.src.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let mut w = Writer::new();
    w.begin(
        (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        0,
    );
    w.nest_start(CTA_TUPLE_ORIG);
    w.nest_start(CTA_TUPLE_IP);
    for (ip, v4, v6) in [
        (orig.src.ip(), CTA_IP_V4_SRC, CTA_IP_V6_SRC),
        (orig.dst.ip(), CTA_IP_V4_DST, CTA_IP_V6_DST),
    ] {
        match ip {
            IpAddr::V4(a) => w.attr(v4, &a.octets()),
            IpAddr::V6(a) => w.attr(v6, &a.octets()),
        }
    }
    w.nest_end();
    w.nest_start(CTA_TUPLE_PROTO);
    w.attr(CTA_PROTO_NUM, &[orig.proto]);
    w.attr(CTA_PROTO_SRC_PORT, &orig.src.port().to_be_bytes());
    w.attr(CTA_PROTO_DST_PORT, &orig.dst.port().to_be_bytes());
    w.nest_end();
    w.nest_end();
    w.end();
    w.as_bytes().to_vec()
}

/// An event message: IPCTNL_MSG_CT_NEW with NLM_F_CREATE|NLM_F_EXCL for a
/// new flow (ctnetlink_conntrack_event), IPCTNL_MSG_CT_DELETE for a
/// destroyed one. Anything else is skipped.
fn parse_event(m: &Msg<'_>) -> Option<Event> {
    if m.subsys() != NFNL_SUBSYS_CTNETLINK {
        return None;
    }
    let kind = match m.subsys_msg() {
        IPCTNL_MSG_CT_NEW if m.flags & (NLM_F_CREATE | NLM_F_EXCL) != 0 => EventKind::New,
        IPCTNL_MSG_CT_DELETE => EventKind::Destroy,
        _ => return None,
    };
    Some(Event {
        kind,
        flow: parse_flow(m)?,
    })
}

/// A flow needs both tuples; other attributes are optional and unknown
/// ones are skipped.
fn parse_flow(m: &Msg<'_>) -> Option<Flow> {
    let (mut orig, mut reply) = (None, None);
    let mut flow = Flow {
        id: None,
        orig: placeholder_tuple(),
        reply: placeholder_tuple(),
        mark: 0,
        orig_counters: None,
        reply_counters: None,
        status: 0,
    };
    for a in m.attrs() {
        match a.ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(&a),
            CTA_TUPLE_REPLY => reply = parse_tuple(&a),
            CTA_MARK => flow.mark = a.be32().unwrap_or(0),
            CTA_STATUS => flow.status = a.be32().unwrap_or(0),
            CTA_ID => flow.id = a.be32(),
            CTA_COUNTERS_ORIG => flow.orig_counters = parse_counters(&a),
            CTA_COUNTERS_REPLY => flow.reply_counters = parse_counters(&a),
            _ => {}
        }
    }
    flow.orig = orig?;
    flow.reply = reply?;
    Some(flow)
}

fn placeholder_tuple() -> Tuple {
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    Tuple {
        src: any,
        dst: any,
        proto: 0,
    }
}

fn ip_of(a: &Attr<'_>) -> Option<IpAddr> {
    match a.ty {
        CTA_IP_V4_SRC | CTA_IP_V4_DST => {
            let b: [u8; 4] = a.value.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        CTA_IP_V6_SRC | CTA_IP_V6_DST => {
            let b: [u8; 16] = a.value.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn parse_tuple(a: &Attr<'_>) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0, 0);
    for part in a.nested() {
        match part.ty {
            CTA_TUPLE_IP => {
                for ip in part.nested() {
                    match ip.ty {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip_of(&ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip_of(&ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in part.nested() {
                    match p.ty {
                        CTA_PROTO_NUM => proto = p.u8(),
                        CTA_PROTO_SRC_PORT => sport = p.be16().unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = p.be16().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: SocketAddr::new(src?, sport),
        dst: SocketAddr::new(dst?, dport),
        proto: proto?,
    })
}

/// CTA_COUNTERS_* carry 64-bit values; very old kernels sent 32-bit ones.
fn parse_counters(a: &Attr<'_>) -> Option<Counters> {
    let mut c = Counters::default();
    let mut any = false;
    for v in a.nested() {
        let value = match v.ty {
            CTA_COUNTERS_PACKETS | CTA_COUNTERS_BYTES => v.be64(),
            CTA_COUNTERS32_PACKETS | CTA_COUNTERS32_BYTES => v.be32().map(u64::from),
            _ => None,
        };
        let Some(value) = value else { continue };
        any = true;
        match v.ty {
            CTA_COUNTERS_PACKETS | CTA_COUNTERS32_PACKETS => c.packets = value,
            _ => c.bytes = value,
        }
    }
    any.then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_request_names_the_original_tuple() {
        for (src, dst) in [
            ("192.0.2.10:40000", "198.51.100.20:50123"),
            ("[2001:db8:1::10]:40000", "[2001:db8:2::20]:50123"),
        ] {
            let orig = Tuple {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: 6,
            };
            let bytes = delete_request(&orig, 9);
            let msgs: Vec<_> = msg::messages(&bytes).collect();
            assert_eq!(msgs.len(), 1);
            let m = &msgs[0];
            assert_eq!(m.subsys(), NFNL_SUBSYS_CTNETLINK);
            assert_eq!(m.subsys_msg(), IPCTNL_MSG_CT_DELETE);
            assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(m.seq, 9);
            let want = if orig.src.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            };
            assert_eq!(m.family(), Some(want));
            let tuples: Vec<_> = m
                .attrs()
                .filter(|a| a.ty == CTA_TUPLE_ORIG)
                .filter_map(|a| parse_tuple(&a))
                .collect();
            assert_eq!(tuples, vec![orig]);
        }
    }

    /// Builds a ctnetlink message the way the kernel lays out an event.
    fn event_bytes(msg_type: u8, flags: u16, v6: bool) -> Vec<u8> {
        let mut w = Writer::new();
        w.begin(
            (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(msg_type),
            flags,
            0,
            if v6 { 10 } else { 2 },
            0,
        );
        for (ty, swap) in [(CTA_TUPLE_ORIG, false), (CTA_TUPLE_REPLY, true)] {
            w.nest_start(ty);
            w.nest_start(CTA_TUPLE_IP);
            let (a, b): (Vec<u8>, Vec<u8>) = if v6 {
                (
                    "2001:db8::1"
                        .parse::<Ipv6Addr>()
                        .expect("ip")
                        .octets()
                        .to_vec(),
                    "2001:db8::2"
                        .parse::<Ipv6Addr>()
                        .expect("ip")
                        .octets()
                        .to_vec(),
                )
            } else {
                (vec![192, 0, 2, 1], vec![198, 51, 100, 2])
            };
            let (s, d) = if swap { (b, a) } else { (a, b) };
            let (src_ty, dst_ty) = if v6 {
                (CTA_IP_V6_SRC, CTA_IP_V6_DST)
            } else {
                (CTA_IP_V4_SRC, CTA_IP_V4_DST)
            };
            w.attr(src_ty, &s);
            w.attr(dst_ty, &d);
            w.nest_end();
            w.nest_start(CTA_TUPLE_PROTO);
            w.attr(CTA_PROTO_NUM, &[6]);
            let (sp, dp) = if swap { (21u16, 40000u16) } else { (40000, 21) };
            w.attr(CTA_PROTO_SRC_PORT, &sp.to_be_bytes());
            w.attr(CTA_PROTO_DST_PORT, &dp.to_be_bytes());
            w.nest_end();
            w.nest_end();
        }
        w.attr(99, &[1, 2, 3]); // unknown: skipped
        w.attr_be32(CTA_MARK, 0xf7a0);
        w.attr_be32(CTA_ID, 77);
        w.nest_start(CTA_COUNTERS_ORIG);
        w.attr_be64(CTA_COUNTERS_PACKETS, 5);
        w.attr_be64(CTA_COUNTERS_BYTES, 1234);
        w.nest_end();
        w.end();
        w.as_bytes().to_vec()
    }

    #[test]
    fn destroy_event_yields_tuples_mark_and_counters() {
        for v6 in [false, true] {
            let bytes = event_bytes(IPCTNL_MSG_CT_DELETE, 0, v6);
            let m = msg::messages(&bytes).next().expect("message");
            let ev = parse_event(&m).expect("event");
            assert_eq!(ev.kind, EventKind::Destroy);
            assert_eq!(ev.flow.orig.dst.port(), 21);
            assert_eq!(ev.flow.reply.src, ev.flow.orig.dst);
            assert_eq!(ev.flow.orig.src.is_ipv6(), v6);
            assert_eq!(ev.flow.orig.proto, 6);
            assert_eq!(ev.flow.mark, 0xf7a0);
            assert_eq!(ev.flow.id, Some(77));
            assert_eq!(
                ev.flow.orig_counters,
                Some(Counters {
                    packets: 5,
                    bytes: 1234
                })
            );
            assert_eq!(ev.flow.reply_counters, None);
        }
    }

    #[test]
    fn new_needs_the_create_flags_and_updates_are_skipped() {
        let new = event_bytes(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, false);
        let m = msg::messages(&new).next().expect("message");
        assert_eq!(parse_event(&m).map(|e| e.kind), Some(EventKind::New));
        let update = event_bytes(IPCTNL_MSG_CT_NEW, 0, false);
        let m = msg::messages(&update).next().expect("message");
        assert_eq!(parse_event(&m), None);
    }

    #[test]
    fn every_truncation_of_an_event_parses_without_panicking() {
        let mut bytes = event_bytes(IPCTNL_MSG_CT_DELETE, 0, true);
        let total = bytes.len();
        for cut in 0..total {
            // Also lie in the header so the message claims the full length.
            let mut cut_bytes = bytes[..cut].to_vec();
            if cut >= 4 {
                cut_bytes[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            for m in msg::messages(&cut_bytes) {
                let _ = parse_event(&m);
            }
        }
        // A tuple without addresses makes the whole event unusable: skipped.
        bytes[20 + 4 + 4 + 2] ^= 0x7f; // scramble the first address attribute type
        let m = msg::messages(&bytes).next().expect("message");
        assert_eq!(parse_event(&m), None);
    }

    #[test]
    fn mark_filter_applies_the_mask() {
        let f = MarkFilter {
            mark: 0xf7a0,
            mask: 0xff00,
        };
        assert!(f.matches(0xf712));
        assert!(!f.matches(0x17a0));
        assert!(MarkFilter::exact(1).matches(1));
        assert!(!MarkFilter::exact(1).matches(3));
    }
}
