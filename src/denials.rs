//! `ftpgate denials`: read a deny log the way an operator needs to.
//!
//! The summary answers "what is being refused, for whom, toward where";
//! follow mode prints new lines as they arrive, one readable line each, and
//! keeps following across logrotate (the file is reopened when it shrinks or
//! is replaced).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// Which lines count.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only lines at or after this time.
    pub since: Option<SystemTime>,
    /// Only lines with this reason.
    pub reason: Option<String>,
}

impl Filter {
    fn matches(&self, v: &Value) -> bool {
        if let Some(r) = &self.reason
            && v["reason"].as_str() != Some(r)
        {
            return false;
        }
        if let Some(since) = self.since {
            let ts = v["ts"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok());
            if ts.is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    /// Denials, the suppressed ones of summary lines included.
    pub total: u64,
    /// Of `total`, the denials a summary line counted instead of a line each.
    pub suppressed: u64,
    pub unreadable: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub by_client: BTreeMap<String, u64>,
    pub by_target: BTreeMap<String, u64>,
    pub first: Option<String>,
    pub last: Option<String>,
}

/// The host part of "addr:port" or "[v6]:port".
fn host(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        }
        _ => addr.to_string(),
    }
}

pub fn summarize(reader: impl BufRead, filter: &Filter) -> io::Result<Summary> {
    let mut s = Summary::default();
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            s.unreadable += 1;
            continue;
        };
        if !filter.matches(&v) {
            continue;
        }
        // A summary line stands for the denials it counted.
        let n = match v["suppressed"].as_u64() {
            Some(n) => {
                s.suppressed += n;
                n
            }
            None => 1,
        };
        s.total += n;
        let reason = v["reason"].as_str().unwrap_or("?").to_string();
        *s.by_reason.entry(reason).or_default() += n;
        if let Some(c) = v["client"].as_str() {
            *s.by_client.entry(host(c)).or_default() += n;
        }
        if let Some(t) = v["target"].as_str() {
            *s.by_target.entry(t.to_string()).or_default() += 1;
        }
        let ts = v["ts"].as_str().map(str::to_string);
        if s.first.is_none() {
            s.first = ts.clone();
        }
        s.last = ts;
    }
    Ok(s)
}

fn top(map: &BTreeMap<String, u64>, n: usize) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.truncate(n);
    v
}

impl Summary {
    pub fn render(&self, source: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "deny log {source}: {} denials", self.total);
        if let (Some(a), Some(b)) = (&self.first, &self.last) {
            let _ = writeln!(out, "from {a} to {b}");
        }
        if self.suppressed > 0 {
            let _ = writeln!(
                out,
                "({} of them counted in summary lines: a source repeating one refusal)",
                self.suppressed
            );
        }
        if self.unreadable > 0 {
            let _ = writeln!(
                out,
                "({} lines were not JSON and were skipped)",
                self.unreadable
            );
        }
        for (title, map, n) in [
            ("by reason", &self.by_reason, usize::MAX),
            ("top clients", &self.by_client, 10),
            ("top targets", &self.by_target, 10),
        ] {
            if map.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{title}:");
            for (k, v) in top(map, n) {
                let k = printable(k);
                let _ = writeln!(out, "  {k:<40} {v:>8}");
            }
        }
        if self.by_reason.contains_key("pinhole_expired") {
            let _ = writeln!(
                out,
                "\npinhole_expired: a negotiated data connection never arrived. For \"hangs after \
                 PORT/LIST\": is the data port range redirected (transparent mode) and allowed \
                 by the input filter? `ftpgate nft-rules` prints the rules."
            );
        }
        out
    }
}

/// `text` with every character a terminal would act on written as an
/// escape: control characters (C0, DEL, C1: ESC [ 2 J clears a screen) as
/// `\x1b` or `\u{9b}` (`\t`, `\n`, `\r` by name; a backslash doubled), and the bidirectional overrides and isolates that
/// reorder what is shown (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F).
/// Arguments in the log are client input: they are printed, never obeyed.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if unsafe_char(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One deny-log line as a terminal line; client input is escaped
/// ([`printable`]).
pub fn one_line(v: &Value) -> String {
    let s = |k: &str| printable(v[k].as_str().unwrap_or("")).into_owned();
    let mut out = format!("{} {:<22} client={}", s("ts"), s("reason"), s("client"));
    if let Some(n) = v["suppressed"].as_u64() {
        let _ = write!(out, " suppressed={n}");
        if let Some(w) = v["window"].as_str() {
            let _ = write!(out, " window={}", printable(w));
        }
    }
    for key in [
        "server",
        "verb",
        "argument",
        "target",
        "expected_peer",
        "peer",
        "rule",
    ] {
        if let Some(x) = v[key].as_str() {
            let _ = write!(out, " {key}={}", printable(x));
        }
    }
    if let Some(r) = v["reply"].as_str() {
        let _ = write!(out, " reply=\"{}\"", printable(r));
    }
    out
}

/// Prints matching lines as they are appended, forever (or until an error).
pub fn follow(path: &Path, filter: &Filter, mut emit: impl FnMut(&str)) -> io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut partial = String::new();
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let replaced = same_file_changed(&file, path);
        if len < pos || replaced {
            // Rotated or truncated: start over on the new file.
            file = std::fs::File::open(path)?;
            pos = 0;
            partial.clear();
        }
        file.seek(SeekFrom::Start(pos))?;
        let mut chunk = String::new();
        let n = (&mut file).take(1 << 20).read_to_string(&mut chunk)?;
        pos += n as u64;
        partial.push_str(&chunk);
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            if let Ok(v) = serde_json::from_str::<Value>(line.trim())
                && filter.matches(&v)
            {
                emit(&one_line(&v));
            }
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(unix)]
fn same_file_changed(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() != b.ino() || a.dev() != b.dev(),
        _ => false,
    }
}

/// Parses `--since`: a duration back from now ("1h", "30m").
pub fn since(text: &str) -> Result<SystemTime, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("--since {text:?}: {e}"))?;
    Ok(SystemTime::now() - d)
}

pub fn summarize_file(path: &Path, filter: &Filter) -> io::Result<Summary> {
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    summarize(BufReader::new(file), filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"ts":"2026-11-22T05:10:49.814Z","reason":"bounce","session":3,"mode":"transparent","client":"192.0.2.10:53246","server":"198.51.100.20:21","side":"client","verb":"PORT","argument":"198,51,100,30,9,221","target":"198.51.100.30:2525","rule":"data_peer_is_control_peer","reply":"504 Data connection target refused by policy."}
{"ts":"2026-11-22T05:11:00.000Z","reason":"bounce","session":4,"mode":"transparent","client":"192.0.2.10:53250","side":"client","target":"198.51.100.30:2525"}
not json
{"ts":"2026-11-22T05:12:00.000Z","reason":"pasv_theft","session":5,"mode":"transparent","client":"[2001:db8:1::10]:4000","side":"client","target":"192.0.2.1:50123","peer":"192.0.2.11:3333"}
"#;

    #[test]
    fn summary_counts_reasons_clients_and_targets() {
        let s = summarize(LOG.as_bytes(), &Filter::default()).unwrap();
        assert_eq!(s.total, 3);
        assert_eq!(s.unreadable, 1);
        assert_eq!(s.by_reason["bounce"], 2);
        assert_eq!(s.by_client["192.0.2.10"], 2);
        assert_eq!(s.by_client["2001:db8:1::10"], 1);
        assert_eq!(s.by_target["198.51.100.30:2525"], 2);
        let text = s.render("test");
        assert!(text.contains("bounce"), "{text}");
    }

    #[test]
    fn filters_by_reason_and_time() {
        let only_theft = Filter {
            reason: Some("pasv_theft".into()),
            ..Filter::default()
        };
        assert_eq!(summarize(LOG.as_bytes(), &only_theft).unwrap().total, 1);
        let late = Filter {
            since: Some(humantime::parse_rfc3339("2026-11-22T05:10:55Z").unwrap()),
            ..Filter::default()
        };
        assert_eq!(summarize(LOG.as_bytes(), &late).unwrap().total, 2);
    }

    #[test]
    fn summary_lines_count_the_denials_they_stand_for() {
        let log = r#"{"ts":"2026-11-22T05:10:49.814Z","reason":"malformed_command","session":3,"mode":"reverse","client":"192.0.2.10:53246","side":"client"}
{"ts":"2026-11-22T05:10:59.814Z","reason":"malformed_command","suppressed":41,"client":"192.0.2.10","window":"10s"}
{"ts":"2026-11-22T05:10:59.814Z","reason":"bounce","suppressed":2,"client":"2001:db8:1:2::/64","window":"10s"}
"#;
        let s = summarize(log.as_bytes(), &Filter::default()).unwrap();
        assert_eq!((s.total, s.suppressed), (44, 43));
        assert_eq!(s.by_reason["malformed_command"], 42);
        assert_eq!(s.by_client["192.0.2.10"], 42);
        assert_eq!(s.by_client["2001:db8:1:2::/64"], 2);
        let v: Value = serde_json::from_str(log.lines().nth(1).unwrap()).unwrap();
        let line = one_line(&v);
        assert!(line.contains("suppressed=41 window=10s"), "{line}");
    }

    #[test]
    fn control_characters_from_client_input_are_escaped_not_printed() {
        // A client sent `PORT \x1b[2J\x07` (clear screen, bell); the
        // JSON line carries it escaped, serde decodes it again.
        let line = r#"{"ts":"2026-11-22T05:10:49.814Z","reason":"bad_argument","session":3,"mode":"reverse","client":"192.0.2.10:53246","side":"client","verb":"PORT","argument":"\u001b[2J\u0007\u009b31m\u202e","reply":"501 x\r"}"#;
        let v: Value = serde_json::from_str(line).unwrap();
        let out = one_line(&v);
        assert!(
            !out.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{out:?}"
        );
        assert!(
            out.contains(r"argument=\x1b[2J\x07\u{9b}31m\u{202e}"),
            "{out}"
        );
        assert!(out.contains(r#"reply="501 x\r""#), "{out}");
        // The summary prints keys from the log too.
        let s = summarize(line.as_bytes(), &Filter::default()).unwrap();
        let text = s.render("test");
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn one_line_is_readable() {
        let v: Value = serde_json::from_str(LOG.lines().next().unwrap()).unwrap();
        let line = one_line(&v);
        assert!(
            line.starts_with("2026-11-22T05:10:49.814Z bounce"),
            "{line}"
        );
        assert!(line.contains("target=198.51.100.30:2525"), "{line}");
        assert!(line.contains("reply=\"504 "), "{line}");
    }

    #[test]
    fn follow_prints_new_lines_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        std::fs::write(&path, LOG.lines().next().unwrap().to_string() + "\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let filter = Filter {
            reason: Some("pasv_theft".into()),
            ..Filter::default()
        };
        // follow() runs until the process ends; the thread is left behind.
        std::thread::spawn(move || follow(&p, &filter, |l| tx.send(l.to_string()).unwrap()));
        std::thread::sleep(Duration::from_millis(400));
        let theft = LOG.lines().nth(3).unwrap();
        let append = |path: &Path, line: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .unwrap();
            writeln!(f, "{line}").unwrap();
        };
        // Lines already there are not repeated; new matching lines are.
        append(&path, LOG.lines().nth(1).unwrap());
        append(&path, theft);
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            got.contains("pasv_theft") && got.contains("peer=192.0.2.11:3333"),
            "{got}"
        );
        // logrotate: the file is moved away and a new one started.
        std::fs::rename(&path, dir.path().join("deny.jsonl.1")).unwrap();
        append(&path, theft);
        let again = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(again.contains("pasv_theft"), "{again}");
        assert!(
            rx.recv_timeout(Duration::from_millis(600)).is_err(),
            "a line came twice"
        );
    }
}
