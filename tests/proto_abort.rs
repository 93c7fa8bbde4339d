//! ABOR as the classic clients send it (netkit, inetutils, tnftp): Telnet
//! IP, then a Synch whose IAC goes as TCP urgent data, then `DM ABOR`
//! (RFC 959 section 4.1.3, RFC 854). Depending on how the receiving socket
//! treats urgent data, the gateway reads the whole sequence inline, or one
//! byte of the Synch is missing from the stream. Every form must reach the
//! server as ABOR preceded by a Synch of the gateway's own, and the replies
//! (426 for the transfer, 226 for ABOR) must reach the client in order.

use ftpgate::proto::Side;
use ftpgate::proto::driver::{Driver, Step, Transcript, play};

/// What the server receives for any ABOR: Telnet IP, IAC, DM, the command.
const SYNCH_ABOR: &[u8] = b"\xff\xf4\xff\xf2ABOR\r\n";

/// The forms an ABOR arrives in.
const FORMS: &[(&str, &[u8])] = &[
    (
        "inline (SO_OOBINLINE): IAC IP IAC DM ABOR",
        b"\xff\xf4\xff\xf2ABOR\r\n",
    ),
    (
        "the urgent IAC taken out of the stream: IAC IP DM ABOR",
        b"\xff\xf4\xf2ABOR\r\n",
    ),
    (
        "an urgent DM taken out of the stream: IAC IP IAC ABOR",
        b"\xff\xf4\xffABOR\r\n",
    ),
    ("no Telnet signals at all (Python's ftplib)", b"ABOR\r\n"),
    ("lower case", b"\xff\xf4\xff\xf2abor\r\n"),
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A session in the middle of a passive download: PASV answered, RETR
/// answered with 150; the transcript starts empty.
fn downloading() -> Vec<Step> {
    vec![
        Step::Input(Side::Server, b"220 ready\r\n".to_vec()),
        Step::Input(Side::Client, b"USER u\r\nPASS p\r\n".to_vec()),
        Step::Input(Side::Server, b"331 pw\r\n230 ok\r\n".to_vec()),
        Step::Input(Side::Client, b"TYPE I\r\nPASV\r\n".to_vec()),
        Step::Input(
            Side::Server,
            b"200 ok\r\n227 Entering Passive Mode (198,51,100,20,200,10).\r\n".to_vec(),
        ),
        Step::Input(Side::Client, b"RETR big.bin\r\n".to_vec()),
        Step::Input(
            Side::Server,
            b"150 Opening BINARY mode data connection\r\n".to_vec(),
        ),
    ]
}

/// The download, the abort in `form`, the server's two replies, and one
/// more command and its reply.
fn abort_script(form: &[u8]) -> Vec<Step> {
    let mut steps = downloading();
    steps.push(Step::Input(Side::Client, form.to_vec()));
    steps.push(Step::Input(
        Side::Server,
        b"426 Failure writing network stream.\r\n226 ABOR successful.\r\n".to_vec(),
    ));
    steps.push(Step::Input(Side::Client, b"PWD\r\n".to_vec()));
    steps.push(Step::Input(Side::Server, b"257 \"/\"\r\n".to_vec()));
    steps
}

/// The part of the transcript after `downloading()`.
fn after_download(form: &[u8], splits: &[usize]) -> (Transcript, Transcript) {
    let before = play(&downloading(), &[]);
    let all = play(&abort_script(form), splits);
    (before, all)
}

#[test]
fn classic_abort_reaches_the_server_as_a_synch_and_abor_in_every_form() {
    for (name, form) in FORMS {
        let (before, all) = after_download(form, &[]);
        let sent = &all.to_server[before.to_server.len()..];
        let mut want = SYNCH_ABOR.to_vec();
        if name.starts_with("lower") {
            want = b"\xff\xf4\xff\xf2abor\r\n".to_vec();
        }
        want.extend_from_slice(b"PWD\r\n");
        assert_eq!(text(sent), text(&want), "{name}: bytes to the server");
        // The Synch's IAC goes as urgent data, so the urgent pointer lands
        // on the DM (RFC 854); nothing else is urgent.
        let at = before.to_server.len() + 2;
        assert_eq!(all.urgent_to_server, [at], "{name}: urgent bytes");
        assert_eq!(&all.to_server[at..at + 2], b"\xff\xf2", "{name}");
        let denials: Vec<_> = all
            .events
            .iter()
            .filter(|e| matches!(e, ftpgate::proto::Event::Deny(_)))
            .collect();
        assert!(denials.is_empty(), "{name}: refused: {denials:?}");
    }
}

#[test]
fn replies_to_the_aborted_transfer_and_to_abor_reach_the_client_in_order() {
    for (name, form) in FORMS {
        let (before, all) = after_download(form, &[]);
        let got = text(&all.to_client[before.to_client.len()..]);
        assert_eq!(
            got, "426 Failure writing network stream.\r\n226 ABOR successful.\r\n257 \"/\"\r\n",
            "{name}: bytes to the client"
        );
    }
}

#[test]
fn abort_gives_the_same_result_however_the_bytes_are_cut() {
    for (name, form) in FORMS {
        let whole = play(&abort_script(form), &[]);
        let bytes: usize = abort_script(form)
            .iter()
            .map(|s| match s {
                Step::Input(_, d) => d.len(),
                _ => 0,
            })
            .sum();
        // One byte per read, then every cut of the abort line in two.
        let mut cuts = vec![vec![0; bytes]];
        let inputs_before = downloading().len();
        for at in 0..form.len() {
            let mut splits: Vec<usize> = downloading()
                .iter()
                .map(|s| match s {
                    Step::Input(_, d) => d.len() - 1,
                    _ => 0,
                })
                .collect();
            assert_eq!(splits.len(), inputs_before);
            // `play` cuts at (split % rest) + 1 bytes.
            splits.push(at);
            cuts.push(splits);
        }
        for splits in cuts {
            let split = play(&abort_script(form), &splits);
            assert_eq!(
                text(&split.to_server),
                text(&whole.to_server),
                "{name}: {splits:?}"
            );
            assert_eq!(split, whole, "{name}: {splits:?}");
        }
    }
}

#[test]
fn abort_with_no_transfer_running_is_answered_once_and_the_session_goes_on() {
    let mut d = Driver::lab();
    d.login();
    d.input(Side::Client, b"\xff\xf4\xff\xf2ABOR\r\n");
    assert_eq!(text(&d.transcript.to_server), text(SYNCH_ABOR));
    assert_eq!(d.transcript.urgent_to_server, [2]);
    d.input(Side::Server, b"225 No transfer to ABOR.\r\n");
    d.input(Side::Client, b"NOOP\r\n");
    d.input(Side::Server, b"200 NOOP ok.\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        "225 No transfer to ABOR.\r\n200 NOOP ok.\r\n"
    );
}

#[test]
fn telnet_ip_before_another_command_is_dropped_and_the_command_goes_plain() {
    // RFC 959 section 4.1.3 names the Synch for ABOR (and STAT, QUIT, which
    // servers read without one); only ABOR is sent on as urgent.
    let mut d = Driver::lab();
    d.login();
    d.input(
        Side::Client,
        b"\xff\xf4\xff\xf2STAT\r\n\xff\xf4\xf2NOOP\r\n",
    );
    assert_eq!(text(&d.transcript.to_server), "STAT\r\nNOOP\r\n");
    assert!(d.transcript.urgent_to_server.is_empty());
}

#[test]
fn two_aborts_in_one_read_each_get_their_own_urgent_byte() {
    let mut d = Driver::lab();
    d.login();
    d.input(Side::Client, b"\xff\xf4\xff\xf2ABOR\r\nABOR\r\n");
    assert_eq!(
        text(&d.transcript.to_server),
        text(&[SYNCH_ABOR, SYNCH_ABOR].concat())
    );
    assert_eq!(d.transcript.urgent_to_server, [2, SYNCH_ABOR.len() + 2]);
}
