//! The check shared by the fuzz target (`fuzz_targets/session.rs`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`): both include this file.

use ftpgate::proto::driver::{self, Transcript};

/// Plays `data` as a script (see `driver::script_from_bytes`) once with every
/// input whole and once cut at offsets taken from the data itself, and
/// checks that both runs produce the same bytes and events, and that nothing
/// the gateway sends upstream contains a bare CR or a NUL.
pub fn check(data: &[u8]) {
    let steps = driver::script_from_bytes(data);
    let whole = driver::play(&steps, &[]);
    let splits: Vec<usize> = data.iter().rev().map(|&b| usize::from(b)).collect();
    let split = driver::play(&steps, &splits);
    assert_same(&whole, &split);
    assert_clean_lines(&whole.to_server);
    assert_clean_lines(&whole.to_client);
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
        split.events, whole.events,
        "events depend on how the input was cut"
    );
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
