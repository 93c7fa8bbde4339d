//! The check shared by the fuzz target (`fuzz_targets/session.rs`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`): both include this file.

use std::net::IpAddr;

use ftpgate::proto::driver::{self, Transcript};
use ftpgate::proto::reply;

/// Plays `data` as a script (see `driver::script_from_bytes`) once with every
/// input whole and once cut at offsets taken from the data itself, and
/// checks that both runs produce the same bytes and events, that nothing
/// the gateway sends either way contains a bare CR or a NUL, and that the
/// only passive replies the client sees are the gateway's own.
pub fn check(data: &[u8]) {
    let steps = driver::script_from_bytes(data);
    let whole = driver::play(&steps, &[]);
    let splits: Vec<usize> = data.iter().rev().map(|&b| usize::from(b)).collect();
    let split = driver::play(&steps, &splits);
    assert_same(&whole, &split);
    assert_clean_lines(&whole.to_server);
    assert_clean_lines(&whole.to_client);
    assert_only_gateway_passive_lines(&whole.to_client);
}

fn assert_same(whole: &Transcript, split: &Transcript) {
    assert_eq!(
        String::from_utf8_lossy(&split.to_client),
        String::from_utf8_lossy(&whole.to_client),
        "bytes to the client depend on how the input was cut"
    );
    assert_eq!(
        String::from_utf8_lossy(&split.to_server),
        String::from_utf8_lossy(&whole.to_server),
        "bytes to the server depend on how the input was cut"
    );
    assert_eq!(
        split.urgent_to_server, whole.urgent_to_server,
        "urgent data to the server depends on how the input was cut"
    );
    assert_eq!(
        split.events, whole.events,
        "events depend on how the input was cut"
    );
}

/// DESIGN.md "State": every line to the client that a client could read as
/// a 227/229 (see `reply::looks_passive`) is a canonical line the gateway
/// built, and a 227 names the gateway (the driver's inside address).
fn assert_only_gateway_passive_lines(out: &[u8]) {
    let gateway = driver::lab_endpoints().client_local.ip();
    for line in out.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !reply::looks_passive(line) {
            continue;
        }
        let mut canonical = reply::parse_227(line)
            .filter(|p| IpAddr::V4(*p.addr.ip()) == gateway)
            .map(|p| reply::canonical_227(p.addr))
            .into_iter()
            .chain(reply::parse_229(line).map(|p| reply::canonical_229(p.port)));
        assert!(
            canonical.any(|c| c == line),
            "a passive reply the gateway did not write reached the client: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Every line the gateway writes ends in CRLF and holds no other CR and no
/// NUL: a peer can never be made to see a line boundary the gateway did not.
fn assert_clean_lines(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "unterminated output"
    );
    for line in out.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !line.contains(&b'\r') && !line.contains(&0),
            "bare CR or NUL sent: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}
