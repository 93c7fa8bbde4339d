//! Line framing and Telnet decoding for the control channel.
//!
//! RFC 959 section 4.1 says a control line ends with CRLF. Real peers also send
//! a bare LF, so LF is the one line terminator and a CR directly before it is
//! dropped. Anything else that could make two parties disagree about where a
//! line ends (a bare CR inside a line, a NUL, an over-long line) makes the
//! line malformed: it is answered by the gateway and never forwarded.

use std::borrow::Cow;

/// How many bytes of an over-long line are kept, so the caller can still see
/// what it started with (a reply code, a verb).
pub const TOO_LONG_HEAD: usize = 16;

/// One framed unit of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its terminator (LF, or CRLF).
    Line(Vec<u8>),
    /// A line longer than the configured maximum; only its first
    /// [`TOO_LONG_HEAD`] bytes were kept, the rest was discarded.
    TooLong(Vec<u8>),
}

/// Splits a byte stream into lines with bounded memory.
///
/// `push` appends raw input; `next_frame` returns a complete line or `None`
/// ("need more input"). Splitting the same input at any offset yields the same
/// frames.
#[derive(Debug)]
pub struct LineFramer {
    raw: Vec<u8>,
    start: usize,
    max_line: usize,
    /// Set while discarding the rest of an over-long line, holding its head.
    discarding: Option<Vec<u8>>,
    /// How many bytes after `start` are known to hold no LF. Without it a
    /// line trickling in a byte at a time was rescanned from its start on
    /// every read: quadratic in the line length (8 KiB replies).
    scanned: usize,
}

impl LineFramer {
    /// `max_line` is the longest accepted line content, terminator excluded
    /// (at least [`TOO_LONG_HEAD`]).
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            raw: Vec::new(),
            start: 0,
            max_line: max_line.max(TOO_LONG_HEAD),
            discarding: None,
            scanned: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        // While an over-long line is being discarded, nothing before its LF
        // is kept. Once that LF is stored (the caller has not read the frame
        // yet: a held session stops reading), the bytes after it are new
        // lines and must be kept whole; filtering them too cut the start off
        // the next line, so the frames depended on how input was split.
        if self.discarding.is_some() && self.buffered() == 0 {
            if let Some(i) = data.iter().position(|&b| b == b'\n') {
                self.raw.extend_from_slice(&data[i..]);
            }
        } else {
            self.raw.extend_from_slice(data);
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.raw.len() - self.start
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        let pending = &self.raw[self.start..];
        let lf = pending[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| self.scanned + i);
        let frame = match lf {
            Some(i) => {
                let line = &pending[..i];
                let frame = if let Some(head) = self.discarding.take() {
                    Frame::TooLong(head)
                } else {
                    let content = line.strip_suffix(b"\r").unwrap_or(line);
                    if content.len() > self.max_line {
                        Frame::TooLong(content[..TOO_LONG_HEAD.min(content.len())].to_vec())
                    } else {
                        Frame::Line(content.to_vec())
                    }
                };
                self.start += i + 1;
                self.scanned = 0;
                Some(frame)
            }
            None => {
                // A CR may still precede the LF, hence the +1.
                if self.discarding.is_none() && pending.len() > self.max_line + 1 {
                    self.discarding = Some(pending[..TOO_LONG_HEAD].to_vec());
                }
                if self.discarding.is_some() {
                    self.start = self.raw.len();
                    self.scanned = 0;
                } else {
                    self.scanned = pending.len();
                }
                None
            }
        };
        self.compact();
        frame
    }

    fn compact(&mut self) {
        if self.start == self.raw.len() {
            self.raw.clear();
            self.start = 0;
        } else if self.start > 4096 && self.start * 2 > self.raw.len() {
            self.raw.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Telnet command bytes (RFC 854) that can appear on an FTP control channel.
const IAC: u8 = 255;
const SB: u8 = 250;
const SE: u8 = 240;
const WILL: u8 = 251;
const DONT: u8 = 254;
/// Interrupt Process.
const IP: u8 = 244;
/// Data Mark: where a Synch ends.
const DM: u8 = 242;

/// What the gateway sends in front of ABOR (RFC 959 section 4.1.3: "Telnet
/// IP" and "Telnet Synch", RFC 854): `IAC IP IAC DM`, with the byte at
/// [`SYNCH_URGENT`] sent as TCP urgent data.
pub const IP_SYNCH: [u8; 4] = [IAC, IP, IAC, DM];

/// The offset in [`IP_SYNCH`] of the byte that goes as TCP urgent data: the
/// IAC before the DM. RFC 854 wants the urgent pointer at the DM. BSD
/// stacks, Linux among them by default, point the urgent pointer just past
/// the last byte sent with MSG_OOB, so sending the IAC urgent puts it on
/// the DM. This is what the BSD-derived clients (netkit, inetutils, tnftp)
/// send, so it is the form servers have been built against; a receiver
/// without SO_OOBINLINE loses the IAC from the stream and reads
/// `IAC IP DM ABOR`, which [`telnet_decode`] and servers read as ABOR.
pub const SYNCH_URGENT: usize = 2;

/// Removes Telnet command sequences from one line (RFC 959 section 4.1: the
/// control connection follows the Telnet protocol).
///
/// `IAC IAC` is a literal 0xFF. Option negotiation (WILL/WONT/DO/DONT + option),
/// subnegotiation (SB ... IAC SE) and the two-byte commands (IP, DM, AYT, ...)
/// are removed, so `IAC IP IAC DM ABOR` reads as `ABOR`. An IAC followed by a
/// byte that is no Telnet command comes from a peer that did not double a data
/// 0xFF: it is kept as that literal byte. A dangling IAC at the line end is
/// dropped.
///
/// A Telnet IP is followed by a Synch, `IAC DM`, whose one urgent byte a
/// receiver that does not read urgent data inline takes out of the stream
/// (RFC 959 section 4.1.3, RFC 854): the BSD clients send the IAC urgent,
/// which leaves `IAC IP DM`; a sender that marks the DM leaves
/// `IAC IP IAC`. Directly after `IAC IP`, a lone DM or a lone IAC is such a
/// remnant and removed too, so `IAC IP DM ABOR` and `IAC IP IAC ABOR` read as
/// `ABOR`.
pub fn telnet_decode(line: &[u8]) -> Cow<'_, [u8]> {
    if !line.contains(&IAC) {
        return Cow::Borrowed(line);
    }
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b != IAC {
            out.push(b);
            i += 1;
            continue;
        }
        match line.get(i + 1).copied() {
            None => i += 1,
            Some(IAC) => {
                out.push(IAC);
                i += 2;
            }
            Some(SB) => {
                // Skip to IAC SE, or to the end of the line.
                let rest = &line[i + 2..];
                let end = rest.windows(2).position(|w| w == [IAC, SE]);
                i += 2 + end.map_or(rest.len(), |e| e + 2);
            }
            Some(IP) => {
                i += 2;
                i += synch_remnant(&line[i..]);
            }
            Some(c) if (WILL..=DONT).contains(&c) => i += 3,
            Some(c) if c >= SE => i += 2,
            Some(_) => {
                out.push(IAC);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// How many bytes at the start of `rest` (what follows `IAC IP`) are what
/// is left of a Synch whose urgent byte was taken out of the stream: a DM
/// without its IAC, or an IAC without its DM (one that starts no Telnet
/// command). A whole `IAC DM` is left to the caller.
fn synch_remnant(rest: &[u8]) -> usize {
    match rest {
        [DM, ..] => 1,
        [IAC] => 1,
        [IAC, next, ..] if *next < SE => 1,
        _ => 0,
    }
}

/// Encodes logical line bytes for the wire: a data 0xFF is sent as `IAC IAC`.
pub fn telnet_encode_into(line: &[u8], out: &mut Vec<u8>) {
    for &b in line {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
}

/// Why a decoded line cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadChar {
    /// A CR that is not part of the line terminator.
    BareCr,
    Nul,
}

/// Checks a decoded line for bytes that make peers disagree on its meaning.
pub fn check_line_bytes(line: &[u8]) -> Result<(), BadChar> {
    for &b in line {
        match b {
            b'\r' => return Err(BadChar::BareCr),
            0 => return Err(BadChar::Nul),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[&[u8]], max: usize) -> Vec<Frame> {
        let mut f = LineFramer::new(max);
        let mut out = Vec::new();
        for chunk in input {
            f.push(chunk);
            while let Some(fr) = f.next_frame() {
                out.push(fr);
            }
        }
        out
    }

    #[test]
    fn crlf_and_bare_lf_both_end_a_line() {
        let got = frames(&[b"NOOP\r\nPWD\nQUIT\r\n"], 100);
        assert_eq!(
            got,
            vec![
                Frame::Line(b"NOOP".to_vec()),
                Frame::Line(b"PWD".to_vec()),
                Frame::Line(b"QUIT".to_vec())
            ]
        );
    }

    #[test]
    fn partial_line_waits_for_more_input() {
        let mut f = LineFramer::new(100);
        f.push(b"POR");
        assert_eq!(f.next_frame(), None);
        f.push(b"T 1,2,3,4,5,6\r");
        assert_eq!(f.next_frame(), None);
        f.push(b"\n");
        assert_eq!(
            f.next_frame(),
            Some(Frame::Line(b"PORT 1,2,3,4,5,6".to_vec()))
        );
    }

    #[test]
    fn over_long_line_is_discarded_with_bounded_memory() {
        let mut f = LineFramer::new(64);
        f.push(b"STOR ");
        for _ in 0..1000 {
            f.push(&[b'a'; 100]);
            assert_eq!(f.next_frame(), None);
            assert!(f.buffered() <= 64 + 2, "buffer grew to {}", f.buffered());
        }
        f.push(b"\r\nNOOP\r\n");
        assert_eq!(
            f.next_frame(),
            Some(Frame::TooLong(b"STOR aaaaaaaaaaa".to_vec()))
        );
        assert_eq!(f.next_frame(), Some(Frame::Line(b"NOOP".to_vec())));
    }

    #[test]
    fn line_exactly_at_the_limit_is_accepted_one_more_is_not() {
        let ok = [b'x'; 20];
        let got = frames(&[&ok, b"\r\n", &[b'y'; 21], b"\r\n"], 20);
        assert_eq!(got[0], Frame::Line(ok.to_vec()));
        assert!(matches!(got[1], Frame::TooLong(_)));
    }

    #[test]
    fn telnet_sequences_are_removed_and_iac_iac_is_a_literal() {
        assert_eq!(&*telnet_decode(b"\xff\xf4\xff\xf2ABOR"), b"ABOR");
        assert_eq!(&*telnet_decode(b"\xff\xfb\x01NOOP"), b"NOOP");
        assert_eq!(&*telnet_decode(b"\xff\xfa\x18\x01xy\xff\xf0PWD"), b"PWD");
        assert_eq!(&*telnet_decode(b"RETR a\xff\xffb"), b"RETR a\xffb");
        assert_eq!(&*telnet_decode(b"RETR a\xffb"), b"RETR a\xffb");
        assert_eq!(&*telnet_decode(b"NOOP\xff"), b"NOOP");
        // What is left of IP and Synch when one urgent byte went out of band.
        assert_eq!(&*telnet_decode(b"\xff\xf4\xf2ABOR"), b"ABOR");
        assert_eq!(&*telnet_decode(b"\xff\xf4\xffABOR"), b"ABOR");
        assert_eq!(&*telnet_decode(b"\xff\xf4\xff"), b"");
        // Only directly after IP: elsewhere 0xF2 is data, IAC x a literal.
        assert_eq!(&*telnet_decode(b"RETR \xf2\xffx"), b"RETR \xf2\xffx");
        assert_eq!(&*telnet_decode(b"\xff\xf4\xff\xf2\xf2"), b"\xf2");
        let mut enc = Vec::new();
        telnet_encode_into(b"a\xffb", &mut enc);
        assert_eq!(enc, b"a\xff\xffb");
    }

    #[test]
    fn bare_cr_and_nul_are_bad_bytes() {
        assert_eq!(check_line_bytes(b"PORT 1\r2"), Err(BadChar::BareCr));
        assert_eq!(check_line_bytes(b"PO\0RT"), Err(BadChar::Nul));
        assert_eq!(check_line_bytes(b"PORT 1,2,3,4,5,6"), Ok(()));
    }
}
