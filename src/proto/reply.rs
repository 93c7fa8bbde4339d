//! FTP replies: multi-line framing and the passive-mode address formats.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use super::command::{decimal_span, format_host_port, is_delimiter};

/// A reply code: three digits, the first 1-5 (RFC 959 section 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Code(pub u16);

impl Code {
    /// 1yz replies are preliminary: the command is still in progress.
    pub fn is_preliminary(self) -> bool {
        self.0 < 200
    }
}

fn code_prefix(line: &[u8]) -> Option<Code> {
    match line {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', ..] => Some(Code(
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'),
        )),
        _ => None,
    }
}

/// The role of one line within a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyLine {
    /// `xyz-text`: the first line of a multi-line reply.
    Start(Code),
    /// `xyz text` (or a bare `xyz`): a single-line reply, or the last line of
    /// a multi-line reply.
    End(Code),
    /// Any other line inside a multi-line reply.
    Text,
}

/// Classifies a line given the code of the multi-line reply in progress, if
/// any (RFC 959 section 4.2: a multi-line reply ends at the first line that
/// starts with the same code followed by a space). Outside a reply, a line
/// that is not a reply line gives `None`.
pub fn classify(line: &[u8], open: Option<Code>) -> Option<ReplyLine> {
    let code = code_prefix(line);
    let sep = line.get(3).copied();
    match open {
        Some(open) => Some(match (code, sep) {
            (Some(c), None | Some(b' ')) if c == open => ReplyLine::End(c),
            _ => ReplyLine::Text,
        }),
        None => match (code?, sep) {
            (c, Some(b'-')) => Some(ReplyLine::Start(c)),
            (c, None | Some(b' ')) => Some(ReplyLine::End(c)),
            _ => None,
        },
    }
}

/// The host-port tuple of a 227 reply and where it sits in the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive227 {
    pub addr: SocketAddrV4,
    pub span: Range<usize>,
}

/// Finds the first six-number group `h1,h2,h3,h4,p1,p2` after the reply code
/// (RFC 1123 section 4.1.2.6: the text around the numbers varies; a client
/// must scan for them). Parentheses are optional, `227 =h1,...` works too.
pub fn parse_227(line: &[u8]) -> Option<Passive227> {
    let mut i = 4.min(line.len());
    while i < line.len() {
        // A group starts at a digit that does not continue a number or a
        // longer comma-separated list.
        let continues = i > 0 && (line[i - 1].is_ascii_digit() || line[i - 1] == b',');
        if line[i].is_ascii_digit()
            && !continues
            && let Some(found) = six_numbers_at(line, i)
        {
            return Some(found);
        }
        i += 1;
    }
    None
}

fn six_numbers_at(line: &[u8], start: usize) -> Option<Passive227> {
    let mut n = [0u8; 6];
    let mut pos = start;
    for (k, slot) in n.iter_mut().enumerate() {
        if k > 0 {
            if line.get(pos) != Some(&b',') {
                return None;
            }
            pos += 1;
            while line.get(pos) == Some(&b' ') {
                pos += 1;
            }
        }
        let (v, end) = decimal_span(line, pos, 3, 255)?;
        *slot = v as u8;
        pos = end;
    }
    // A seventh number would make this something else.
    if line.get(pos) == Some(&b',') && line.get(pos + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let port = u16::from_be_bytes([n[4], n[5]]);
    Some(Passive227 {
        addr: SocketAddrV4::new(Ipv4Addr::new(n[0], n[1], n[2], n[3]), port),
        span: start..pos,
    })
}

/// The port of a 229 reply and where its digits sit in the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive229 {
    pub port: u16,
    pub span: Range<usize>,
}

/// Parses `(<d><d><d><port><d>)` in a 229 reply (RFC 2428 section 3), with
/// any delimiter the RFC allows. Port 0 and ports above 65535 are refused.
pub fn parse_229(line: &[u8]) -> Option<Passive229> {
    let mut from = 4.min(line.len());
    while let Some(off) = line[from..].iter().position(|&b| b == b'(') {
        let open = from + off;
        if let Some(found) = epsv_group_at(line, open) {
            return Some(found);
        }
        from = open + 1;
    }
    None
}

fn epsv_group_at(line: &[u8], open: usize) -> Option<Passive229> {
    let d = *line.get(open + 1)?;
    if !is_delimiter(d) || line.get(open + 2) != Some(&d) || line.get(open + 3) != Some(&d) {
        return None;
    }
    let start = open + 4;
    let (port, end) = decimal_span(line, start, 5, 65535)?;
    if port == 0 || line.get(end) != Some(&d) || line.get(end + 1) != Some(&b')') {
        return None;
    }
    Some(Passive229 {
        port: port as u16,
        span: start..end,
    })
}

/// The 227 line the gateway sends for a pinhole at `addr`, in the form RFC
/// 959 section 4.2.2 gives. The client only ever sees this line as the final
/// reply to PASV, never the server's: the server's text around the numbers
/// could hold another digit group that a client takes for the address.
pub fn canonical_227(addr: SocketAddrV4) -> Vec<u8> {
    format!("227 Entering Passive Mode ({}).", format_host_port(addr)).into_bytes()
}

/// The 229 line the gateway sends for a pinhole on `port` (RFC 2428
/// section 3), for the same reason.
pub fn canonical_229(port: u16) -> Vec<u8> {
    format!("229 Entering Extended Passive Mode (|||{port}|)").into_bytes()
}

/// Whether a client could read `line` as a passive-mode reply: after any
/// blanks it starts with 227 or 229. Clients differ in how they find the
/// reply (RFC 959 section 4.2 is read loosely): some end a reply at any line
/// that starts with a code and a space, some compare only the first three
/// bytes (so `2270` counts), some skip leading blanks, and some then take
/// the first digit group of the line as the address (RFC 1123 section
/// 4.1.2.6 tells them to scan). Every such line from the server is withheld
/// unless it is the final reply to PASV/EPSV, which the gateway rewrites.
pub fn looks_passive(line: &[u8]) -> bool {
    let start = line
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(line.len());
    matches!(line[start..], [b'2', b'2', b'7' | b'9', ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies_end_at_the_same_code_and_a_space() {
        assert_eq!(
            classify(b"211-Features:", None),
            Some(ReplyLine::Start(Code(211)))
        );
        assert_eq!(classify(b" EPSV", Some(Code(211))), Some(ReplyLine::Text));
        assert_eq!(
            classify(b"227 (1,2,3,4,5,6)", Some(Code(211))),
            Some(ReplyLine::Text)
        );
        assert_eq!(
            classify(b"211-still going", Some(Code(211))),
            Some(ReplyLine::Text)
        );
        assert_eq!(
            classify(b"211 End", Some(Code(211))),
            Some(ReplyLine::End(Code(211)))
        );
        assert_eq!(classify(b"200", None), Some(ReplyLine::End(Code(200))));
        assert_eq!(classify(b"2000 x", None), None);
        assert_eq!(classify(b"600 x", None), None);
        assert_eq!(classify(b"SSH-2.0-OpenSSH", None), None);
    }

    #[test]
    fn parse_227_follows_rfc_1123_scan_rule() {
        let cases: [(&[u8], &str); 5] = [
            (
                b"227 Entering Passive Mode (192,0,2,7,200,10).",
                "192.0.2.7:51210",
            ),
            (
                b"227 Entering Passive Mode 192,0,2,7,200,10",
                "192.0.2.7:51210",
            ),
            (b"227 =192,0,2,7,200,10", "192.0.2.7:51210"),
            (b"227 Mode 2024 ok (192,0,2,7,200,10)", "192.0.2.7:51210"),
            (b"227 (192, 0, 2, 7, 200, 10)", "192.0.2.7:51210"),
        ];
        for (line, want) in cases {
            let got = parse_227(line).unwrap_or_else(|| panic!("{line:?}"));
            assert_eq!(got.addr, want.parse().unwrap(), "{line:?}");
        }
        let p = parse_227(b"227 Entering Passive Mode (192,0,2,7,200,10).").unwrap();
        assert_eq!(p.span, 27..43);
    }

    #[test]
    fn canonical_lines_parse_back_to_what_they_name() {
        let addr: SocketAddrV4 = "192.0.2.1:50001".parse().unwrap();
        let line = canonical_227(addr);
        assert_eq!(line, b"227 Entering Passive Mode (192,0,2,1,195,81).");
        assert_eq!(parse_227(&line).map(|p| p.addr), Some(addr));
        let line = canonical_229(50001);
        assert_eq!(line, b"229 Entering Extended Passive Mode (|||50001|)");
        assert_eq!(parse_229(&line).map(|p| p.port), Some(50001));
    }

    #[test]
    fn passive_lookalikes_are_recognised_anywhere_a_client_might_look() {
        for yes in [
            &b"227 Entering Passive Mode (1,2,3,4,5,6)."[..],
            b"227-(1,2,3,4,5,6)",
            b"227",
            b"2270 files",
            b" 227 (1,2,3,4,5,6)",
            b"\t 229 (|||6446|)",
            b"229-x",
        ] {
            assert!(looks_passive(yes), "{yes:?}");
        }
        for no in [
            &b"211-Features:"[..],
            b" EPSV",
            b"x 227 (1,2,3,4,5,6)",
            b"228 ok",
            b"22",
            b"",
            b"   ",
        ] {
            assert!(!looks_passive(no), "{no:?}");
        }
    }

    #[test]
    fn parse_227_refuses_bad_groups() {
        for bad in [
            &b"227 Entering Passive Mode"[..],
            b"227 (192,0,2,256,1,1)",
            b"227 (192,0,2,7,1)",
            b"227 (192,0,2,7,1,2,3)",
            b"227 (1921,0,2,7,1,2)",
            b"227",
        ] {
            assert_eq!(parse_227(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parse_229_accepts_any_delimiter_and_refuses_bad_ports() {
        let p = parse_229(b"229 Entering Extended Passive Mode (|||6446|)").unwrap();
        assert_eq!(p.port, 6446);
        assert_eq!(parse_229(b"229 ok (!!!6446!)").unwrap().port, 6446);
        assert_eq!(parse_229(b"229 (x) then (|||21|)").unwrap().port, 21);
        for bad in [
            &b"229 (|||0|)"[..],
            b"229 (|||70000|)",
            b"229 (|||6446!)",
            b"229 (||6446|)",
            b"229 (|||6446|",
            b"229 (111123451)",
            b"229 Entering Extended Passive Mode",
        ] {
            assert_eq!(parse_229(bad), None, "{bad:?}");
        }
    }
}
