//! nfnetlink framing shared by [`super::nftables`] and [`super::conntrack`]:
//! a writer for requests and a defensive reader for what the kernel sends.
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h): every message is a
//! 16-byte `struct nlmsghdr` (host byte order), then a 4-byte
//! `struct nfgenmsg` { family: u8, version: u8, res_id: be16 }, then
//! attributes. An attribute is a 4-byte `struct nlattr` { len: u16,
//! type: u16 } and its value, padded to 4 bytes; nfnetlink attribute values
//! are big-endian. Nothing here trusts a length the kernel sent: the reader
//! stops at the first header that does not fit instead of slicing past it.

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;

// linux/netlink.h
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
/// Set on an NLMSG_ERROR when extended-ack attributes follow (linux/netlink.h).
const NLM_F_ACK_TLVS: u16 = 0x200;
/// Set on an NLMSG_ERROR when the echoed request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
/// enum nlmsgerr_attrs: NLMSGERR_ATTR_MSG carries a human-readable reason,
/// NLMSGERR_ATTR_OFFS the offset of the attribute the kernel refused.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// NFNETLINK_V0 (linux/netfilter/nfnetlink.h).
const NFNETLINK_V0: u8 = 0;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one or more netlink messages to a buffer. Lengths are patched in
/// when a message or a nest ends, so callers write attributes in order.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
    msg_start: usize,
    nests: Vec<usize>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts a message with its nfgenmsg header. `res_id` is the subsystem
    /// id on batch delimiters and 0 otherwise (nfnetlink.h).
    pub(crate) fn begin(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in end()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    /// Ends the message started by [`Writer::begin`].
    pub(crate) fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub(crate) fn attr(&mut self, ty: u16, value: &[u8]) {
        let len = (NLA_HDRLEN + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING).
    pub(crate) fn attr_str(&mut self, ty: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.attr(ty, &bytes);
    }

    pub(crate) fn attr_be32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_be_bytes());
    }

    pub(crate) fn attr_be64(&mut self, ty: u16, value: u64) {
        self.attr(ty, &value.to_be_bytes());
    }

    pub(crate) fn nest_start(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub(crate) fn nest_end(&mut self) {
        if let Some(start) = self.nests.pop() {
            // A nest longer than u16 cannot be expressed; callers keep one
            // element per message, far below that.
            let len = (self.buf.len() - start).min(usize::from(u16::MAX)) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Where the next attribute will start, counted from the start of the
    /// current message: the unit of NLMSGERR_ATTR_OFFS in extended ACKs.
    pub(crate) fn offset_in_msg(&self) -> usize {
        self.buf.len() - self.msg_start
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// One netlink message as received; `payload` follows the nlmsghdr.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl<'a> Msg<'a> {
    /// The nfnetlink subsystem (high byte of the type, NFNL_SUBSYS_ID).
    pub(crate) fn subsys(&self) -> u8 {
        (self.ty >> 8) as u8
    }

    /// The subsystem's message type (NFNL_MSG_TYPE).
    pub(crate) fn subsys_msg(&self) -> u8 {
        (self.ty & 0xff) as u8
    }

    /// nfgenmsg.nfgen_family, if the payload is long enough to carry one.
    #[cfg(test)]
    pub(crate) fn family(&self) -> Option<u8> {
        self.payload.first().copied()
    }

    /// The attributes after the nfgenmsg header.
    pub(crate) fn attrs(&self) -> Attrs<'a> {
        Attrs::new(self.payload.get(NFGENMSG_LEN..).unwrap_or(&[]))
    }
}

/// Iterates over the messages of one datagram; stops at a truncated header.
pub(crate) struct Msgs<'a> {
    rest: &'a [u8],
}

pub(crate) fn messages(buf: &[u8]) -> Msgs<'_> {
    Msgs { rest: buf }
}

impl<'a> Iterator for Msgs<'a> {
    type Item = Msg<'a>;

    fn next(&mut self) -> Option<Msg<'a>> {
        let hdr = self.rest.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([hdr[4], hdr[5]]),
            flags: u16::from_ne_bytes([hdr[6], hdr[7]]),
            seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
            payload: &self.rest[NLMSG_HDRLEN..len],
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(msg)
    }
}

/// One attribute; `ty` has the nested/byte-order flag bits cleared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attr<'a> {
    pub ty: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    pub(crate) fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.value)
    }

    pub(crate) fn be16(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.value.get(..2)?.try_into().ok()?))
    }

    pub(crate) fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.value.get(..4)?.try_into().ok()?))
    }

    pub(crate) fn be64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.value.get(..8)?.try_into().ok()?))
    }

    pub(crate) fn u8(&self) -> Option<u8> {
        self.value.first().copied()
    }

    /// A string attribute without its terminating NUL.
    pub(crate) fn str(&self) -> Option<&'a str> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        std::str::from_utf8(&self.value[..end]).ok()
    }
}

/// Iterates over a run of attributes; stops at a truncated one.
#[derive(Clone)]
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let hdr = self.rest.get(..NLA_HDRLEN)?;
        let len = usize::from(u16::from_ne_bytes([hdr[0], hdr[1]]));
        if len < NLA_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let attr = Attr {
            ty: u16::from_ne_bytes([hdr[2], hdr[3]]) & NLA_TYPE_MASK,
            value: &self.rest[NLA_HDRLEN..len],
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(attr)
    }
}

/// The content of an NLMSG_ERROR: `errno` is 0 for an ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorMsg {
    pub errno: i32,
    /// Sequence number of the request this answers.
    pub seq: u32,
    /// NLMSGERR_ATTR_MSG, when the kernel gave one (extended ACK).
    pub reason: Option<String>,
    /// NLMSGERR_ATTR_OFFS: offset of the refused attribute from the start
    /// of the request's nlmsghdr, when the kernel named one.
    pub bad_attr_offset: Option<u32>,
}

/// Parses an NLMSG_ERROR payload: `struct nlmsgerr` { int error; struct
/// nlmsghdr msg; } then, with NLM_F_ACK_TLVS, extended-ack attributes. The
/// echoed request is only its header when NLM_F_CAPPED is set.
pub(crate) fn parse_error(msg: &Msg<'_>) -> Option<ErrorMsg> {
    let p = msg.payload;
    let error = i32::from_ne_bytes(p.get(..4)?.try_into().ok()?);
    let orig = p.get(4..4 + NLMSG_HDRLEN)?;
    let orig_len = u32::from_ne_bytes(orig[..4].try_into().ok()?) as usize;
    let seq = u32::from_ne_bytes(orig[8..12].try_into().ok()?);
    let mut reason = None;
    let mut bad_attr_offset = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            align4(orig_len.max(NLMSG_HDRLEN))
        };
        for attr in Attrs::new(p.get(4 + echoed..).unwrap_or(&[])) {
            match attr.ty {
                NLMSGERR_ATTR_MSG => reason = attr.str().map(str::to_owned),
                // A host-order u32, unlike nfnetlink payloads.
                NLMSGERR_ATTR_OFFS => {
                    bad_attr_offset = attr
                        .value
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_ne_bytes)
                }
                _ => {}
            }
        }
    }
    Some(ErrorMsg {
        errno: error.saturating_neg(),
        seq,
        reason,
        bad_attr_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_output_reads_back_through_the_parser() {
        let mut w = Writer::new();
        w.begin(0x0a0c, NLM_F_REQUEST | NLM_F_ACK, 7, 1, 0);
        w.attr_str(1, "ftpgate");
        w.nest_start(3);
        w.attr_be32(4, 0xdead_beef);
        w.attr(5, &[1, 2, 3]);
        w.nest_end();
        w.end();
        w.begin(0x0a0d, NLM_F_REQUEST, 8, 1, 0);
        w.end();
        let msgs: Vec<_> = messages(w.as_bytes()).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].subsys(), msgs[0].subsys_msg()), (10, 12));
        assert_eq!(msgs[0].seq, 7);
        assert_eq!(msgs[0].family(), Some(1));
        let attrs: Vec<_> = msgs[0].attrs().collect();
        assert_eq!(attrs[0].str(), Some("ftpgate"));
        assert_eq!(attrs[1].ty, 3);
        let inner: Vec<_> = attrs[1].nested().collect();
        assert_eq!(inner[0].be32(), Some(0xdead_beef));
        assert_eq!(inner[1].value, &[1, 2, 3]);
        assert_eq!(msgs[1].seq, 8);
    }

    #[test]
    fn truncated_or_lying_lengths_end_iteration_without_panicking() {
        let mut w = Writer::new();
        w.begin(0x0a0c, 0, 1, 1, 0);
        w.attr_be32(4, 1);
        w.end();
        let good = w.as_bytes().to_vec();
        for cut in 0..good.len() {
            let _ = messages(&good[..cut]).flat_map(|m| m.attrs()).count();
        }
        let mut lying = good.clone();
        lying[NLMSG_HDRLEN + NFGENMSG_LEN] = 0xff; // attribute claims 255 bytes
        let m = messages(&lying).next().map(|m| m.attrs().count());
        assert_eq!(m, Some(0));
        let mut short = good;
        short[0] = 3; // nlmsg_len smaller than the header
        assert_eq!(messages(&short).count(), 0);
    }

    #[test]
    fn error_message_yields_errno_seq_and_reason() {
        // nlmsgerr with a capped echo and an NLMSGERR_ATTR_MSG.
        let mut p = Vec::new();
        p.extend_from_slice(&(-2i32).to_ne_bytes());
        p.extend_from_slice(&36u32.to_ne_bytes());
        p.extend_from_slice(&0x0a0eu16.to_ne_bytes());
        p.extend_from_slice(&0u16.to_ne_bytes());
        p.extend_from_slice(&42u32.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(b"no\0\0");
        let msg = Msg {
            ty: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS | NLM_F_CAPPED,
            seq: 42,
            payload: &p,
        };
        let e = parse_error(&msg).expect("parses");
        assert_eq!(e.errno, 2);
        assert_eq!(e.seq, 42);
        assert_eq!(e.reason.as_deref(), Some("no"));
        let short = Msg {
            payload: &p[..10],
            ..msg
        };
        assert_eq!(parse_error(&short), None);
    }
}
