//! FTP commands: verb recognition and the address-bearing arguments.
//!
//! Verbs match exactly and case-insensitively (RFC 959 section 5.3.1: command
//! codes are alphabetic, case does not matter), so `port` is PORT and `PORTAL`
//! is not. A line whose verb is not a clean token (a leading blank, a tab) is
//! refused rather than forwarded: a lenient server might still read it as PORT.
//! For the same reason a longer verb that starts with an address verb
//! (`PORTX`, `PASV2`) is refused: some servers match verbs by prefix, and
//! would act on an address the gateway never checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

/// The commands the gateway acts on; everything else is relayed as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Port,
    Eprt,
    Pasv,
    Epsv,
    /// LPRT and LPSV (RFC 1639): refused, EPRT/EPSV cover every family.
    Lprt,
    Lpsv,
    /// SPSV (single-port passive) answers with a bare port: never rewritten,
    /// so refused.
    Spsv,
    /// A verb longer than four letters that starts with PORT, EPRT, PASV,
    /// EPSV, LPRT, LPSV or SPSV: refused, never forwarded.
    AddressLookalike,
    /// AUTH and the RFC 2228 security commands that would carry protected,
    /// uninspectable commands.
    Auth,
    Protected,
    User,
    Pass,
    Acct,
    Rein,
    Quit,
    /// ABOR: sent upstream behind Telnet IP and Synch (RFC 959 section
    /// 4.1.3), however the client sent it.
    Abor,
    Other,
}

impl Verb {
    /// The verbs that carry or ask for a data address.
    const ADDRESS_VERBS: [&[u8; 4]; 7] = [
        b"PORT", b"EPRT", b"PASV", b"EPSV", b"LPRT", b"LPSV", b"SPSV",
    ];

    fn from_token(token: &[u8]) -> Verb {
        let mut up = [0u8; 4];
        for (d, s) in up.iter_mut().zip(token) {
            *d = s.to_ascii_uppercase();
        }
        if token.len() > 4 {
            return if Verb::ADDRESS_VERBS.contains(&&up) {
                Verb::AddressLookalike
            } else {
                Verb::Other
            };
        }
        match &up[..token.len()] {
            b"PORT" => Verb::Port,
            b"EPRT" => Verb::Eprt,
            b"PASV" => Verb::Pasv,
            b"EPSV" => Verb::Epsv,
            b"LPRT" => Verb::Lprt,
            b"LPSV" => Verb::Lpsv,
            b"SPSV" => Verb::Spsv,
            b"AUTH" => Verb::Auth,
            b"ADAT" | b"MIC" | b"CONF" | b"ENC" | b"CCC" | b"PBSZ" | b"PROT" => Verb::Protected,
            b"USER" => Verb::User,
            b"PASS" => Verb::Pass,
            b"ACCT" => Verb::Acct,
            b"REIN" => Verb::Rein,
            b"QUIT" => Verb::Quit,
            b"ABOR" => Verb::Abor,
            _ => Verb::Other,
        }
    }

    /// Arguments of these verbs are secrets and never appear in a log.
    pub fn is_secret(self) -> bool {
        matches!(self, Verb::Pass | Verb::Acct)
    }
}

/// What a command is for, as counted in `ftpgate_commands_total{class}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandClass {
    /// USER, PASS, ACCT, REIN.
    Login,
    /// PORT, EPRT, PASV, EPSV and the refused LPRT, LPSV, SPSV.
    DataSetup,
    /// Commands that use a data connection: RETR, STOR, STOU, APPE, LIST,
    /// NLST, MLSD.
    Transfer,
    /// AUTH and the other RFC 2228 security commands.
    Security,
    Quit,
    Other,
}

impl CommandClass {
    pub const ALL: [CommandClass; 6] = [
        CommandClass::Login,
        CommandClass::DataSetup,
        CommandClass::Transfer,
        CommandClass::Security,
        CommandClass::Quit,
        CommandClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandClass::Login => "login",
            CommandClass::DataSetup => "data_setup",
            CommandClass::Transfer => "transfer",
            CommandClass::Security => "security",
            CommandClass::Quit => "quit",
            CommandClass::Other => "other",
        }
    }
}

/// A parsed command line (Telnet-decoded, terminator removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    pub verb: Verb,
    /// The verb as sent, upper-cased, for logs.
    pub verb_text: String,
    /// Everything after the single space that follows the verb.
    pub arg: Option<&'a [u8]>,
}

/// The longest verb accepted; RFC 959 verbs have at most four letters, some
/// extensions (XSHA256) are longer.
const MAX_VERB: usize = 16;

impl Command<'_> {
    pub fn class(&self) -> CommandClass {
        match self.verb {
            Verb::User | Verb::Pass | Verb::Acct | Verb::Rein => CommandClass::Login,
            Verb::Port
            | Verb::Eprt
            | Verb::Pasv
            | Verb::Epsv
            | Verb::Lprt
            | Verb::Lpsv
            | Verb::Spsv => CommandClass::DataSetup,
            Verb::Auth | Verb::Protected => CommandClass::Security,
            Verb::Quit => CommandClass::Quit,
            Verb::AddressLookalike | Verb::Abor => CommandClass::Other,
            Verb::Other => match self.verb_text.as_str() {
                "RETR" | "STOR" | "STOU" | "APPE" | "LIST" | "NLST" | "MLSD" => {
                    CommandClass::Transfer
                }
                _ => CommandClass::Other,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the command verb is not a clean token")]
pub struct BadVerb;

pub fn parse_command(line: &[u8]) -> Result<Command<'_>, BadVerb> {
    let (token, arg) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if token.is_empty() || token.len() > MAX_VERB || !token.iter().all(u8::is_ascii_alphanumeric) {
        return Err(BadVerb);
    }
    Ok(Command {
        verb: Verb::from_token(token),
        verb_text: String::from_utf8_lossy(token).to_ascii_uppercase(),
        arg,
    })
}

/// Why an address argument was refused; each maps to the reply RFC 959 or
/// RFC 2428 prescribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// 501: syntax error in parameters.
    #[error("syntax error in the address argument")]
    Syntax,
    /// 522 (RFC 2428 section 2): the network protocol is not supported.
    #[error("unsupported network protocol")]
    Family,
}

/// Parses one decimal field of a host-port tuple: digits only, no sign,
/// leading zeros are decimal, value at most `max`.
fn decimal(field: &[u8], max: u32) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: u32 = 0;
    for &d in field {
        v = v.saturating_mul(10).saturating_add(u32::from(d - b'0'));
    }
    (v <= max).then_some(v)
}

/// Reads a run of at most `max_digits` decimal digits starting at `start`;
/// returns its value (at most `max`) and the index after it. A longer run of
/// digits is refused, not split.
pub(crate) fn decimal_span(
    line: &[u8],
    start: usize,
    max_digits: usize,
    max: u32,
) -> Option<(u32, usize)> {
    let len = line
        .get(start..)?
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if len == 0 || len > max_digits {
        return None;
    }
    let end = start + len;
    decimal(&line[start..end], max).map(|v| (v, end))
}

/// PORT h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2): exactly six decimal fields
/// 0-255, nothing else. Port 0 is no address one can connect to.
pub fn parse_port_arg(arg: &[u8]) -> Result<SocketAddrV4, ArgError> {
    let mut n = [0u8; 6];
    let mut fields = arg.split(|&b| b == b',');
    for slot in &mut n {
        let field = fields.next().ok_or(ArgError::Syntax)?;
        *slot = decimal(field, 255).ok_or(ArgError::Syntax)? as u8;
    }
    if fields.next().is_some() {
        return Err(ArgError::Syntax);
    }
    let port = u16::from_be_bytes([n[4], n[5]]);
    if port == 0 {
        return Err(ArgError::Syntax);
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::new(n[0], n[1], n[2], n[3]),
        port,
    ))
}

/// Formats the six-number host-port tuple of PORT and 227.
pub fn format_host_port(addr: SocketAddrV4) -> String {
    let [a, b, c, d] = addr.ip().octets();
    let [p1, p2] = addr.port().to_be_bytes();
    format!("{a},{b},{c},{d},{p1},{p2}")
}

/// Whether a byte may delimit EPRT/EPSV fields (RFC 2428 section 2: ASCII
/// 33-126). Digits are refused too: they would be ambiguous with the fields.
pub fn is_delimiter(b: u8) -> bool {
    (33..=126).contains(&b) && !b.is_ascii_digit()
}

/// EPRT <d><af><d><address><d><port><d> (RFC 2428 section 2).
pub fn parse_eprt_arg(arg: &[u8]) -> Result<SocketAddr, ArgError> {
    let (&d, rest) = arg.split_first().ok_or(ArgError::Syntax)?;
    if !is_delimiter(d) {
        return Err(ArgError::Syntax);
    }
    let body = rest.strip_suffix(&[d]).ok_or(ArgError::Syntax)?;
    let fields: Vec<&[u8]> = body.split(|&b| b == d).collect();
    let [af, addr, port] = fields[..] else {
        return Err(ArgError::Syntax);
    };
    let port = decimal(port, 65535)
        .filter(|&p| p != 0)
        .ok_or(ArgError::Syntax)? as u16;
    let addr = std::str::from_utf8(addr).map_err(|_| ArgError::Syntax)?;
    let ip = match af {
        b"1" => IpAddr::V4(addr.parse::<Ipv4Addr>().map_err(|_| ArgError::Syntax)?),
        b"2" => IpAddr::V6(addr.parse::<Ipv6Addr>().map_err(|_| ArgError::Syntax)?),
        _ if decimal(af, u32::MAX).is_some() => return Err(ArgError::Family),
        _ => return Err(ArgError::Syntax),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Formats an EPRT argument for `addr` with the `|` delimiter.
pub fn format_eprt_arg(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("|1|{ip}|{}|", addr.port()),
        IpAddr::V6(ip) => format!("|2|{ip}|{}|", addr.port()),
    }
}

/// The network protocol number of RFC 2428 for an address family.
pub fn af_number(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 1,
        IpAddr::V6(_) => 2,
    }
}

/// The argument of EPSV (RFC 2428 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpsvArg {
    /// No argument: the control connection's family.
    Any,
    /// A network protocol number.
    Family(u8),
    /// EPSV ALL: from now on only EPSV sets up data connections.
    All,
}

pub fn parse_epsv_arg(arg: Option<&[u8]>) -> Result<EpsvArg, ArgError> {
    match arg {
        None | Some(b"") => Ok(EpsvArg::Any),
        Some(a) if a.eq_ignore_ascii_case(b"ALL") => Ok(EpsvArg::All),
        Some(b"1") => Ok(EpsvArg::Family(1)),
        Some(b"2") => Ok(EpsvArg::Family(2)),
        Some(a) if decimal(a, u32::MAX).is_some() => Err(ArgError::Family),
        Some(_) => Err(ArgError::Syntax),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_match_exactly_and_ignore_case() {
        assert_eq!(parse_command(b"port 1,2,3,4,5,6").unwrap().verb, Verb::Port);
        assert_eq!(parse_command(b"PoRt 1,2,3,4,5,6").unwrap().verb, Verb::Port);
        assert_eq!(
            parse_command(b"PORTAL 1,2,3,4,5,6").unwrap().verb,
            Verb::AddressLookalike
        );
        assert_eq!(
            parse_command(b"epsvx").unwrap().verb,
            Verb::AddressLookalike
        );
        assert_eq!(parse_command(b"POR 1,2,3,4,5,6").unwrap().verb, Verb::Other);
        assert_eq!(parse_command(b"USERS").unwrap().verb, Verb::Other);
        assert_eq!(parse_command(b"XSHA256").unwrap().verb, Verb::Other);
        assert_eq!(parse_command(b"EPSV").unwrap().arg, None);
        assert_eq!(parse_command(b"RETR a b").unwrap().arg, Some(&b"a b"[..]));
    }

    #[test]
    fn verbs_that_are_not_clean_tokens_are_refused() {
        for line in [
            &b" PORT 1,2,3,4,5,6"[..],
            b"PORT\t1,2,3,4,5,6",
            b"\tPORT 1,2,3,4,5,6",
            b"",
            b"P@SW",
            b"PO-RT 1",
        ] {
            assert_eq!(parse_command(line), Err(BadVerb), "{line:?}");
        }
    }

    #[test]
    fn port_arguments_follow_rfc_959_strictly() {
        let ok = parse_port_arg(b"192,0,2,10,4,1").unwrap();
        assert_eq!(ok, "192.0.2.10:1025".parse().unwrap());
        assert_eq!(
            parse_port_arg(b"192,000,2,010,4,1").unwrap(),
            "192.0.2.10:1025".parse().unwrap(),
            "leading zeros are decimal, not octal"
        );
        for bad in [
            &b"192,0,2,256,4,1"[..],
            b"192,0,2,10,4,1,7",
            b"192,0,2,10,4",
            b"+192,0,2,10,4,1",
            b"192,0,2,-1,4,1",
            b" 192,0,2,10,4,1",
            b"192,0,2,10,4,1 ",
            b"192, 0,2,10,4,1",
            b"192,0,2,10,,1",
            b"192,0,2,10,0,0",
            b"192,0,2,10,4,99999999999999999999",
            b"",
        ] {
            assert_eq!(parse_port_arg(bad), Err(ArgError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn eprt_accepts_any_rfc_2428_delimiter() {
        let v4: SocketAddr = "192.0.2.10:6446".parse().unwrap();
        assert_eq!(parse_eprt_arg(b"|1|192.0.2.10|6446|"), Ok(v4));
        assert_eq!(parse_eprt_arg(b"!1!192.0.2.10!6446!"), Ok(v4));
        assert_eq!(parse_eprt_arg(b"~1~192.0.2.10~6446~"), Ok(v4));
        let v6: SocketAddr = "[2001:db8::1]:6446".parse().unwrap();
        assert_eq!(parse_eprt_arg(b"|2|2001:db8::1|6446|"), Ok(v6));
        let mapped = parse_eprt_arg(b"|2|::ffff:192.0.2.10|6446|").unwrap();
        assert_eq!(mapped.ip(), "::ffff:192.0.2.10".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn eprt_refuses_bad_fields() {
        for bad in [
            &b"|1|192.0.2.10|0|"[..],
            b"|1|192.0.2.10|65536|",
            b"|1|192.0.2.10|6446",
            b"|1|192.0.2.10|6446|x",
            b"|1|192.0.2.10|6446||",
            b"|1|2001:db8::1|6446|",
            b"|2|192.0.2.10|6446|",
            b"|1|192.0.2.010|6446|",
            b"|1|192.0.2.10|+6446|",
            b"1|1|192.0.2.10|6446|",
            b" |1|192.0.2.10|6446|",
            b"|2|fe80::1%eth0|6446|",
            b"",
        ] {
            assert_eq!(parse_eprt_arg(bad), Err(ArgError::Syntax), "{bad:?}");
        }
        assert_eq!(
            parse_eprt_arg(b"|3|192.0.2.10|6446|"),
            Err(ArgError::Family)
        );
    }

    #[test]
    fn epsv_arguments() {
        assert_eq!(parse_epsv_arg(None), Ok(EpsvArg::Any));
        assert_eq!(parse_epsv_arg(Some(b"all")), Ok(EpsvArg::All));
        assert_eq!(parse_epsv_arg(Some(b"2")), Ok(EpsvArg::Family(2)));
        assert_eq!(parse_epsv_arg(Some(b"7")), Err(ArgError::Family));
        assert_eq!(parse_epsv_arg(Some(b"x")), Err(ArgError::Syntax));
    }
}
