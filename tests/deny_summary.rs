//! A summary from the core's deny aggregation is a normal deny event with a
//! count: the deny log writes it as a normal line with `suppressed`, and
//! leaves the field out of every other line.

use std::time::Duration;

use ftpgate::config::{DenyLogConfig, Mode};
use ftpgate::denylog::{DenyLog, SessionInfo};
use ftpgate::proto::{Denial, DenyReason, Side};

#[tokio::test(flavor = "current_thread")]
async fn a_summary_line_carries_the_suppressed_count_and_other_lines_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deny.jsonl");
    let cfg = DenyLogConfig {
        path: Some(path.clone()),
        queue: 16,
        burst: 10,
        interval: Duration::from_secs(10),
    };
    let (log, _writer) = DenyLog::start(&cfg).unwrap();
    let info = SessionInfo {
        id: 1,
        mode: Mode::Reverse,
        client: "192.0.2.10:40000".parse().unwrap(),
        server: Some("198.51.100.20:21".parse().unwrap()),
        source: ftpgate::clients::ClientKey::of("192.0.2.10".parse().unwrap(), 64),
    };
    log.record(
        &info,
        &Denial::new(DenyReason::UnsupportedCommand, Side::Client),
    );
    let mut summary = Denial::new(DenyReason::UnsupportedCommand, Side::Client);
    summary.suppressed = Some(7);
    log.record(&info, &summary);
    let mut lines = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        lines = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect();
        if lines.len() == 2 {
            break;
        }
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["reason"], "unsupported_command");
    assert!(lines[0].get("suppressed").is_none(), "{}", lines[0]);
    assert_eq!(lines[1]["reason"], "unsupported_command");
    assert_eq!(lines[1]["suppressed"], 7, "{}", lines[1]);
}
