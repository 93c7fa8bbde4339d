//! Set elements of the `inet ftpgate` table over nfnetlink, without `nft`.
//!
//! Changes go in one nfnetlink batch (NFNL_MSG_BATCH_BEGIN ... END,
//! linux/netfilter/nfnetlink.h): nf_tables applies every message of a batch
//! in one transaction or none, so the elements of one pinhole appear
//! together. nfnetlink reports every failed message of a batch (it keeps
//! going after an error to report them all) and queues those reports in
//! message order once the whole batch has been handled; only the last
//! message asks for an ACK, so its answer, success or error, is the last of
//! the batch's, and one datagram (one receive) answers a batch that worked
//! instead of one per message. The kernel handles a batch inside `sendmsg`,
//! so the answers are queued before `send` returns; SO_RCVTIMEO still bounds
//! the wait in case one is lost.
//!
//! The API is synchronous behind a Mutex: one exchange takes microseconds,
//! far less than a tokio task switch, and startup checks can call it before
//! any runtime exists. A dump of a very large set is the slow case; call
//! [`Nftables::list`] from `spawn_blocking` there.

use std::fmt;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use netlink_sys::Socket;

use super::elements::{Family, NftValue, PinholeSet};
use super::msg::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, Writer};
use super::sock;

mod wire;
use wire::{
    AF_UNSPEC, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_INET,
    NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_SET_EVAL,
    NFT_SET_MAP, NFT_SET_TIMEOUT, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_NAME,
    NFTA_SET_TABLE, encode_op, nft_type, parse_elements, parse_set_info,
};

/// A batch larger than this is refused: it must fit the socket send buffer,
/// and its ACKs the receive buffer.
pub const MAX_BATCH_OPS: usize = 1024;
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// Room for an answer to each of MAX_BATCH_OPS messages (only the last asks
/// for an ACK, but each may fail; an answer costs about 1 KiB of buffer
/// truesize).
const RECEIVE_BUFFER: usize = 2 * 1024 * 1024;
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const RECV_CHUNK: usize = 64 * 1024;

/// One element to add: a key, for a map its data, and a timeout after which
/// the kernel drops it by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
    /// `None`: the set's default timeout (none in the ftpgate ruleset).
    /// Sent in milliseconds, rounded down, at least 1 ms.
    pub timeout: Option<Duration>,
}

impl SetElem {
    pub fn new(key: &impl NftValue) -> Self {
        Self {
            key: key.to_nft_bytes(),
            data: None,
            timeout: None,
        }
    }

    pub fn with_data(mut self, data: &impl NftValue) -> Self {
        self.data = Some(data.to_nft_bytes());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemOp {
    /// Fails with EEXIST if the key is already there (NLM_F_EXCL): a
    /// pinhole key in use means the caller must pick another port.
    Add { set: String, elem: SetElem },
    /// A key that is not there is not an error: the rule may have consumed
    /// it, or it may have expired.
    Delete { set: String, key: Vec<u8> },
    /// Removes every element of the set.
    Flush { set: String },
}

impl ElemOp {
    pub fn add(set: impl Into<String>, elem: SetElem) -> Self {
        ElemOp::Add {
            set: set.into(),
            elem,
        }
    }

    pub fn delete(set: impl Into<String>, key: &impl NftValue) -> Self {
        ElemOp::Delete {
            set: set.into(),
            key: key.to_nft_bytes(),
        }
    }

    pub fn flush(set: impl Into<String>) -> Self {
        ElemOp::Flush { set: set.into() }
    }

    fn set(&self) -> &str {
        match self {
            ElemOp::Add { set, .. } | ElemOp::Delete { set, .. } | ElemOp::Flush { set } => set,
        }
    }
}

impl fmt::Display for ElemOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemOp::Add { set, .. } => write!(f, "add element to set {set}"),
            ElemOp::Delete { set, .. } => write!(f, "delete element from set {set}"),
            ElemOp::Flush { set } => write!(f, "flush set {set}"),
        }
    }
}

/// An element as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemInfo {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
    /// The timeout the element was added with.
    pub timeout: Option<Duration>,
    /// Time left before the kernel drops it.
    pub expiration: Option<Duration>,
}

/// What NFT_MSG_GETSET reports about a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetInfo {
    pub key_len: u32,
    /// `None` for a plain set, the value length for a map.
    pub data_len: Option<u32>,
    /// enum nft_set_flags bits.
    pub flags: u32,
}

impl SetInfo {
    pub fn is_map(&self) -> bool {
        self.flags & NFT_SET_MAP != 0
    }

    /// `flags timeout`: elements may carry their own timeout.
    pub fn has_timeout(&self) -> bool {
        self.flags & NFT_SET_TIMEOUT != 0
    }

    /// `flags dynamic` (NFT_SET_EVAL): rules may add to or delete from it.
    pub fn is_dynamic(&self) -> bool {
        self.flags & NFT_SET_EVAL != 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("netlink {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the kernel to {op} within {waited:?}")]
    Timeout { op: String, waited: Duration },
    #[error("the kernel answered {op} only in part, with no error: its outcome is unknown")]
    Unanswered { op: String },
    #[error(
        "{op} in table inet {table} failed: {} (errno {errno}){}",
        io::Error::from_raw_os_error(*.errno),
        .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
    )]
    Kernel {
        op: String,
        table: String,
        errno: i32,
        reason: Option<String>,
    },
    #[error(
        "set {set} missing in table inet {table}: load the rules printed by `ftpgate nft-rules`"
    )]
    SetMissing { table: String, set: String },
    #[error(
        "set {set} in table inet {table} {problem}: load the rules printed by `ftpgate nft-rules`"
    )]
    SetMismatch {
        table: String,
        set: String,
        problem: String,
    },
    #[error("a batch of {ops} operations is too large (at most {MAX_BATCH_OPS}): split it")]
    BatchTooLarge { ops: usize },
}

/// A handle on the nf_tables sets of one `inet` table.
pub struct Nftables {
    table: String,
    inner: Mutex<Inner>,
}

struct Inner {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Deletes go as DESTROYSETELEM (the kernel has it: Linux 6.3).
    destroy: bool,
}

/// How a batch ended when it did not simply commit.
enum Outcome {
    Committed,
    /// The batch was rolled back only because these deletes (indexes into
    /// the ops) named absent elements.
    AbsentDeletes(Vec<usize>),
}

impl Nftables {
    /// Opens a socket in the calling thread's network namespace. Needs
    /// CAP_NET_ADMIN for changes; the kernel says EPERM otherwise.
    pub fn open(table: impl Into<String>) -> Result<Self, NftError> {
        let sock = sock::open().map_err(NftError::Open)?;
        sock::set_recv_timeout(&sock, REPLY_TIMEOUT).map_err(NftError::Open)?;
        // Best effort: without the room, a very large batch reports ENOBUFS.
        let _ = sock::grow_receive_buffer(&sock, RECEIVE_BUFFER);
        Ok(Self {
            table: table.into(),
            inner: Mutex::new(Inner {
                sock,
                seq: 1,
                buf: Vec::with_capacity(RECV_CHUNK),
                destroy: false,
            }),
        })
    }

    /// Deletes `key` from `set` with DESTROYSETELEM, which ignores an absent
    /// element, and uses it for every later delete if the kernel has it
    /// (Linux 6.3); older kernels keep DELSETELEM with its absent-element
    /// retry. Returns whether it is in use.
    pub fn prefer_destroy(&self, set: &str, key: &impl NftValue) -> bool {
        let mut inner = self.lock();
        inner.destroy = true;
        let probe = ElemOp::delete(set, key);
        let works = matches!(inner.batch(&self.table, &[&probe]), Ok(Outcome::Committed));
        inner.destroy = works;
        works
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a socket and a counter; a panic elsewhere cannot leave
        // it inconsistent, and stale replies are skipped by sequence number.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies all `ops` in one transaction: all of them or none.
    pub fn apply(&self, ops: &[ElemOp]) -> Result<(), NftError> {
        if ops.len() > MAX_BATCH_OPS {
            return Err(NftError::BatchTooLarge { ops: ops.len() });
        }
        let mut pending: Vec<&ElemOp> = ops.iter().collect();
        let mut inner = self.lock();
        // nf_tables rolls a whole batch back when one delete names an absent
        // element (DESTROYSETELEM, which would not, needs Linux 6.3). Each
        // round drops the deletes it found absent, so this ends within
        // ops.len() rounds, in practice one.
        while !pending.is_empty() {
            match inner.batch(&self.table, &pending)? {
                Outcome::Committed => return Ok(()),
                Outcome::AbsentDeletes(absent) => {
                    let mut i = 0;
                    pending.retain(|_| {
                        i += 1;
                        !absent.contains(&(i - 1))
                    });
                }
            }
        }
        Ok(())
    }

    pub fn add(&self, set: &str, elem: SetElem) -> Result<(), NftError> {
        self.apply(&[ElemOp::add(set, elem)])
    }

    pub fn delete(&self, set: &str, key: &impl NftValue) -> Result<(), NftError> {
        self.apply(&[ElemOp::delete(set, key)])
    }

    pub fn flush(&self, set: &str) -> Result<(), NftError> {
        self.apply(&[ElemOp::flush(set)])
    }

    /// All live elements of `set` (NFT_MSG_GETSETELEM dump). Expired ones
    /// the kernel has not reaped yet are left out by the kernel.
    pub fn list(&self, set: &str) -> Result<Vec<ElemInfo>, NftError> {
        let op = format!("list set {set}");
        let mut inner = self.lock();
        let seq = inner.next_seq(1);
        let mut w = Writer::new();
        w.begin(
            nft_type(NFT_MSG_GETSETELEM),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
        );
        w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
        w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        w.end();
        inner.send(w.as_bytes(), &op)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut out = Vec::new();
        loop {
            inner.recv(&op, deadline, true)?;
            for m in msg::messages(&inner.buf).filter(|m| m.seq == seq) {
                match m.ty {
                    NLMSG_DONE => {
                        // A dump that failed midway ends with a negative errno.
                        let errno = m
                            .payload
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .unwrap_or(0);
                        if errno < 0 {
                            return Err(self.kernel_error(&op, set, -errno, None));
                        }
                        return Ok(out);
                    }
                    NLMSG_ERROR => {
                        if let Some(e) = msg::parse_error(&m).filter(|e| e.errno != 0) {
                            return Err(self.kernel_error(&op, set, e.errno, e.reason));
                        }
                    }
                    _ if m.subsys() == NFNL_SUBSYS_NFTABLES as u8
                        && m.subsys_msg() == NFT_MSG_NEWSETELEM =>
                    {
                        parse_elements(&m, &mut out);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Key length, data length and flags of `set` (NFT_MSG_GETSET).
    pub fn set_info(&self, set: &str) -> Result<SetInfo, NftError> {
        let op = format!("get set {set}");
        let mut inner = self.lock();
        let seq = inner.next_seq(1);
        let mut w = Writer::new();
        w.begin(
            nft_type(NFT_MSG_GETSET),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
        );
        w.attr_str(NFTA_SET_TABLE, &self.table);
        w.attr_str(NFTA_SET_NAME, set);
        w.end();
        inner.send(w.as_bytes(), &op)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut info = None;
        loop {
            inner.recv(&op, deadline, true)?;
            for m in msg::messages(&inner.buf).filter(|m| m.seq == seq) {
                if m.ty == NLMSG_ERROR {
                    // The ACK (errno 0) follows the NEWSET reply.
                    let e = msg::parse_error(&m);
                    return match (e, info) {
                        (Some(e), _) if e.errno != 0 => {
                            Err(self.kernel_error(&op, set, e.errno, e.reason))
                        }
                        (_, Some(info)) => Ok(info),
                        (_, None) => Err(NftError::Kernel {
                            op,
                            table: self.table.clone(),
                            errno: libc::EPROTO,
                            reason: Some("ACK without the set".into()),
                        }),
                    };
                }
                if m.subsys() == NFNL_SUBSYS_NFTABLES as u8 && m.subsys_msg() == NFT_MSG_NEWSET {
                    info = Some(parse_set_info(&m));
                }
            }
        }
    }

    /// Checks that the eight sets of the ftpgate ruleset exist with the
    /// shapes the encoders produce, so a stale or hand-edited ruleset fails
    /// at startup with a clear message instead of at the first pinhole.
    pub fn check_pinhole_sets(&self) -> Result<(), NftError> {
        for family in [Family::V4, Family::V6] {
            for kind in PinholeSet::ALL {
                let set = kind.name(family);
                let info = self.set_info(&set)?;
                let mismatch = |problem: String| NftError::SetMismatch {
                    table: self.table.clone(),
                    set: set.clone(),
                    problem,
                };
                let want_key = kind.key_len(family);
                if info.key_len != want_key {
                    return Err(mismatch(format!(
                        "has {}-byte keys, expected {want_key}",
                        info.key_len
                    )));
                }
                if info.data_len != kind.data_len(family) {
                    return Err(mismatch(format!(
                        "has data length {:?}, expected {:?}",
                        info.data_len,
                        kind.data_len(family)
                    )));
                }
                if !info.has_timeout() {
                    return Err(mismatch("lacks `flags timeout`".into()));
                }
                if kind == PinholeSet::Armed && !info.is_dynamic() {
                    return Err(mismatch(
                        "lacks `flags dynamic`, so the rule cannot consume its elements".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn kernel_error(&self, op: &str, set: &str, errno: i32, reason: Option<String>) -> NftError {
        // ENOENT names a missing table or set here: absent elements are
        // handled before this is reached.
        if errno == libc::ENOENT {
            return NftError::SetMissing {
                table: self.table.clone(),
                set: set.to_owned(),
            };
        }
        NftError::Kernel {
            op: op.to_owned(),
            table: self.table.clone(),
            errno,
            reason,
        }
    }
}

impl Inner {
    fn next_seq(&mut self, count: u32) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(count);
        seq
    }

    fn send(&mut self, bytes: &[u8], op: &str) -> Result<(), NftError> {
        self.drain_stale();
        self.sock.send(bytes, 0).map_err(|source| NftError::Io {
            op: op.to_owned(),
            source,
        })?;
        Ok(())
    }

    /// Discards replies left over from an exchange that timed out, so they
    /// cannot fill the buffer (they would be skipped by sequence anyway).
    fn drain_stale(&mut self) {
        loop {
            self.buf.clear();
            if self.sock.recv(&mut self.buf, libc::MSG_DONTWAIT).is_err() {
                return;
            }
        }
    }

    /// Receives one datagram into `buf`; SO_RCVTIMEO bounds each call and
    /// `deadline` the whole exchange. Without `wait`, an empty queue is
    /// `Ok(false)` at once.
    fn recv(&mut self, op: &str, deadline: Instant, wait: bool) -> Result<bool, NftError> {
        let timeout = || NftError::Timeout {
            op: op.to_owned(),
            waited: REPLY_TIMEOUT,
        };
        if Instant::now() > deadline {
            return Err(timeout());
        }
        self.buf.clear();
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        match self.sock.recv(&mut self.buf, flags) {
            Ok(_) => Ok(true),
            Err(e) if sock::errno(&e) == libc::EAGAIN && !wait => Ok(false),
            // SO_RCVTIMEO expired.
            Err(e) if sock::errno(&e) == libc::EAGAIN => Err(timeout()),
            // Interrupted: the caller's loop calls again; buf is empty.
            Err(e) if sock::errno(&e) == libc::EINTR => Ok(true),
            Err(source) => Err(NftError::Io {
                op: op.to_owned(),
                source,
            }),
        }
    }

    fn batch(&mut self, table: &str, ops: &[&ElemOp]) -> Result<Outcome, NftError> {
        if ops.is_empty() {
            return Ok(Outcome::Committed);
        }
        let count = ops.len() as u32;
        let begin = self.next_seq(count + 2);
        let mut w = Writer::new();
        w.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        w.end();
        let mut elements_at = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            elements_at.push(encode_op(
                &mut w,
                table,
                op,
                begin + 1 + i as u32,
                self.destroy,
                i + 1 == ops.len(),
            ));
        }
        w.begin(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            begin + count + 1,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        w.end();
        if w.len() > MAX_BATCH_BYTES {
            return Err(NftError::BatchTooLarge { ops: ops.len() });
        }
        let batch_op = describe(ops);
        self.send(w.as_bytes(), &batch_op)?;

        let deadline = Instant::now() + REPLY_TIMEOUT;
        // Errors of earlier messages, then the last message's answer. The
        // kernel queued every answer inside `send`, so once one has come,
        // an empty queue means no more will: a batch refused as a whole
        // (ENOMEM, a failed commit) sends one error, at the first
        // message's sequence number, and no ACK.
        let mut answers: Vec<Option<msg::ErrorMsg>> = vec![None; ops.len()];
        let last = ops.len() - 1;
        let mut wait = true;
        while answers[last].is_none() {
            if !self.recv(&batch_op, deadline, wait)? {
                break;
            }
            wait = false;
            for m in msg::messages(&self.buf).filter(|m| m.ty == NLMSG_ERROR) {
                let Some(e) = msg::parse_error(&m) else {
                    continue;
                };
                let idx = e.seq.wrapping_sub(begin + 1) as usize;
                if idx < ops.len() {
                    // A failed commit's error comes before the ACK of the
                    // same (one-message) batch: the ACK must not hide it.
                    if answers[idx].as_ref().is_none_or(|a| a.errno == 0) {
                        answers[idx] = Some(e);
                    }
                } else if (e.seq == begin || e.seq == begin + count + 1) && e.errno != 0 {
                    // The batch as a whole was refused (EPERM without
                    // CAP_NET_ADMIN, ENOMEM): nothing was applied.
                    return Err(NftError::Kernel {
                        op: batch_op,
                        table: table.to_owned(),
                        errno: e.errno,
                        reason: e.reason,
                    });
                }
            }
        }

        if answers[last].is_none() && answers.iter().flatten().all(|a| a.errno == 0) {
            return Err(NftError::Unanswered { op: batch_op });
        }
        let mut absent = Vec::new();
        for (i, answer) in answers.iter().enumerate() {
            let Some(e) = answer.as_ref().filter(|e| e.errno != 0) else {
                continue;
            };
            let op = ops[i];
            // ENOENT on a delete is an absent element unless the kernel
            // points at the table or set name, before the element list.
            let element_absent = matches!(op, ElemOp::Delete { .. })
                && e.errno == libc::ENOENT
                && e.bad_attr_offset
                    .is_none_or(|off| off as usize >= elements_at[i]);
            if element_absent {
                absent.push(i);
                continue;
            }
            if e.errno == libc::ENOENT {
                return Err(NftError::SetMissing {
                    table: table.to_owned(),
                    set: op.set().to_owned(),
                });
            }
            return Err(NftError::Kernel {
                op: op.to_string(),
                table: table.to_owned(),
                errno: e.errno,
                reason: e.reason.clone(),
            });
        }
        if absent.is_empty() {
            Ok(Outcome::Committed)
        } else {
            Ok(Outcome::AbsentDeletes(absent))
        }
    }
}

fn describe(ops: &[&ElemOp]) -> String {
    match ops {
        [one] => one.to_string(),
        _ => format!("batch of {} set element changes", ops.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_name_the_operation_and_errno() {
        let e = NftError::Kernel {
            op: "add element to set dnat4".into(),
            table: "ftpgate".into(),
            errno: libc::EEXIST,
            reason: None,
        };
        let text = e.to_string();
        assert!(text.starts_with("add element to set dnat4 in table inet ftpgate failed"));
        assert!(text.contains(&format!("errno {}", libc::EEXIST)));
    }
}
