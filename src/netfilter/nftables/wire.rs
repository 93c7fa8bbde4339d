//! The nf_tables messages of [`super::Nftables`]: constants from
//! linux/netfilter/nf_tables.h and nfnetlink.h, request encoding and reply
//! parsing. Parsing skips what it does not know and never panics.

use std::time::Duration;

use super::{ElemInfo, ElemOp, SetInfo};
use crate::netfilter::msg::{
    self, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, Writer,
};

// linux/netfilter/nfnetlink.h
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 16; // NLMSG_MIN_TYPE
pub(super) const NFNL_MSG_BATCH_END: u16 = 17;
// linux/netfilter.h
pub(super) const NFPROTO_INET: u8 = 1;
pub(super) const AF_UNSPEC: u8 = 0;

// enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
pub(super) const NFT_MSG_NEWSET: u8 = 9;
pub(super) const NFT_MSG_GETSET: u8 = 10;
pub(super) const NFT_MSG_NEWSETELEM: u8 = 12;
pub(super) const NFT_MSG_GETSETELEM: u8 = 13;
pub(super) const NFT_MSG_DELSETELEM: u8 = 14;
/// Like DELSETELEM, but an absent element is no error (Linux 6.3).
pub(super) const NFT_MSG_DESTROYSETELEM: u8 = 30;

// enum nft_set_attributes
pub(super) const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
pub(super) const NFTA_SET_KEY_LEN: u16 = 5;
pub(super) const NFTA_SET_DATA_LEN: u16 = 7;
// enum nft_set_elem_list_attributes
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
pub(super) const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
pub(super) const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
// enum nft_data_attributes
pub(super) const NFTA_DATA_VALUE: u16 = 1;
// enum nft_set_flags
pub(super) const NFT_SET_MAP: u32 = 0x8;
pub(super) const NFT_SET_TIMEOUT: u32 = 0x10;
pub(super) const NFT_SET_EVAL: u32 = 0x20;

pub(super) fn nft_type(msg: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg)
}

/// Writes one NEWSETELEM/DELSETELEM message carrying at most one element,
/// so an error's sequence number names the element. Returns the offset of
/// the element list within the message.
pub(super) fn encode_op(
    w: &mut Writer,
    table: &str,
    op: &ElemOp,
    seq: u32,
    destroy: bool,
    ack: bool,
) -> usize {
    let (ty, flags) = match op {
        ElemOp::Add { .. } => (
            NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        ),
        // An absent element makes DELSETELEM fail, and a failed element
        // rolls the whole transaction back; an abort waits out an RCU grace
        // period in the kernel. DESTROYSETELEM deletes what is there.
        ElemOp::Delete { .. } if destroy => (NFT_MSG_DESTROYSETELEM, NLM_F_REQUEST),
        // DELSETELEM without NFTA_SET_ELEM_LIST_ELEMENTS flushes the set.
        ElemOp::Delete { .. } | ElemOp::Flush { .. } => (NFT_MSG_DELSETELEM, NLM_F_REQUEST),
    };
    // An error is reported whether or not an ACK was asked for.
    let flags = if ack { flags | NLM_F_ACK } else { flags };
    w.begin(nft_type(ty), flags, seq, NFPROTO_INET, 0);
    w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
    w.attr_str(NFTA_SET_ELEM_LIST_SET, op.set());
    let elements_at = w.offset_in_msg();
    let (key, data, timeout) = match op {
        ElemOp::Add { elem, .. } => (Some(&elem.key), elem.data.as_ref(), elem.timeout),
        ElemOp::Delete { key, .. } => (Some(key), None, None),
        ElemOp::Flush { .. } => (None, None, None),
    };
    if let Some(key) = key {
        w.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        w.nest_start(NFTA_LIST_ELEM);
        w.nest_start(NFTA_SET_ELEM_KEY);
        w.attr(NFTA_DATA_VALUE, key);
        w.nest_end();
        if let Some(data) = data {
            w.nest_start(NFTA_SET_ELEM_DATA);
            w.attr(NFTA_DATA_VALUE, data);
            w.nest_end();
        }
        if let Some(t) = timeout {
            // Milliseconds since Linux 4.x (nf_msecs_to_jiffies64); 0 would
            // mean "the set's default", so a tiny timeout rounds up to 1 ms.
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
            w.attr_be64(NFTA_SET_ELEM_TIMEOUT, ms);
        }
        w.nest_end();
        w.nest_end();
    }
    w.end();
    elements_at
}

pub(super) fn data_value(attr: &msg::Attr<'_>) -> Option<Vec<u8>> {
    attr.nested()
        .find(|a| a.ty == NFTA_DATA_VALUE)
        .map(|a| a.value.to_vec())
}

/// Appends the elements of one NEWSETELEM dump message; an element without
/// a key is skipped.
pub(super) fn parse_elements(m: &Msg<'_>, out: &mut Vec<ElemInfo>) {
    for list in m.attrs().filter(|a| a.ty == NFTA_SET_ELEM_LIST_ELEMENTS) {
        for elem in list.nested().filter(|a| a.ty == NFTA_LIST_ELEM) {
            let mut info = ElemInfo {
                key: Vec::new(),
                data: None,
                timeout: None,
                expiration: None,
            };
            let mut has_key = false;
            for a in elem.nested() {
                match a.ty {
                    NFTA_SET_ELEM_KEY => {
                        if let Some(k) = data_value(&a) {
                            info.key = k;
                            has_key = true;
                        }
                    }
                    NFTA_SET_ELEM_DATA => info.data = data_value(&a),
                    NFTA_SET_ELEM_TIMEOUT => info.timeout = a.be64().map(Duration::from_millis),
                    NFTA_SET_ELEM_EXPIRATION => {
                        info.expiration = a.be64().map(Duration::from_millis)
                    }
                    _ => {}
                }
            }
            if has_key {
                out.push(info);
            }
        }
    }
}

pub(super) fn parse_set_info(m: &Msg<'_>) -> SetInfo {
    let mut info = SetInfo {
        key_len: 0,
        data_len: None,
        flags: 0,
    };
    for a in m.attrs() {
        match a.ty {
            NFTA_SET_FLAGS => info.flags = a.be32().unwrap_or(0),
            NFTA_SET_KEY_LEN => info.key_len = a.be32().unwrap_or(0),
            NFTA_SET_DATA_LEN => info.data_len = a.be32(),
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::elements::{Endpoint, NftValue, PinholeKey};
    use crate::netfilter::nftables::SetElem;

    #[test]
    fn add_message_nests_key_data_and_timeout_as_the_kernel_expects() {
        let key = PinholeKey::new(
            "192.0.2.1".parse().expect("ip"),
            "198.51.100.2".parse().expect("ip"),
            50000,
        )
        .expect("key");
        let data = Endpoint("203.0.113.5:2000".parse().expect("addr"));
        let op = ElemOp::add(
            "dnat4",
            SetElem::new(&key)
                .with_data(&data)
                .with_timeout(Duration::from_millis(1500)),
        );
        let mut w = Writer::new();
        let at = encode_op(&mut w, "ftpgate", &op, 5, false, true);
        let m = msg::messages(w.as_bytes()).next().expect("one message");
        assert_eq!(m.ty, nft_type(NFT_MSG_NEWSETELEM));
        assert_eq!(m.flags & NLM_F_EXCL, NLM_F_EXCL);
        assert_eq!(m.family(), Some(NFPROTO_INET));
        // table "ftpgate\0" (12) and set "dnat4\0" (12) after 20 bytes of headers
        assert_eq!(at, 20 + 12 + 12);
        let mut out = Vec::new();
        // The dump reply uses the same layout as the request.
        parse_elements(&m, &mut out);
        assert_eq!(
            out,
            vec![ElemInfo {
                key: key.to_nft_bytes(),
                data: Some(data.to_nft_bytes()),
                timeout: Some(Duration::from_millis(1500)),
                expiration: None,
            }]
        );
    }

    #[test]
    fn flush_is_a_delete_without_elements() {
        let mut w = Writer::new();
        encode_op(&mut w, "ftpgate", &ElemOp::flush("armed4"), 1, false, true);
        let m = msg::messages(w.as_bytes()).next().expect("one message");
        assert_eq!(m.ty, nft_type(NFT_MSG_DELSETELEM));
        assert!(m.attrs().all(|a| a.ty != NFTA_SET_ELEM_LIST_ELEMENTS));
    }
}
