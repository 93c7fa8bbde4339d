//! Data connections end with their control session. One test per binary:
//! it reads a gauge, and the metrics recorder is process-wide.

mod common;

use std::time::{Duration, Instant};

use common::{FtpClient, FtpServer, Gateway, metric, parse_227, scrape, skip};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

const ACTIVE: &str = "ftpgate_data_connections_active";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_quits_mid_transfer_leaves_no_relay_behind() {
    let test = "a_session_that_quits_mid_transfer_leaves_no_relay_behind";
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    let data = server.put_file("big.bin", 16 << 20);
    let gw = Gateway::reverse(server.addr, "53100-53199", "").await;
    let admin = gw.running.admin.unwrap();
    let gauge = || async { metric(&scrape(admin).await, ACTIVE, &[]) };
    let wait_gauge = |want: f64| async move {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let now = metric(&scrape(admin).await, ACTIVE, &[]);
            if now == want || Instant::now() > until {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(gauge().await, 0.0);

    let mut c = FtpClient::login(gw.addr).await;
    assert!(c.cmd("TYPE I").await.starts_with("200"));
    let pasv = parse_227(&c.cmd("PASV").await);
    // A data connection that is never read: the relay stalls mid-file.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut d = socket.connect(pasv).await.unwrap();
    assert!(c.cmd("RETR big.bin").await.starts_with('1'));
    assert_eq!(wait_gauge(1.0).await, 1.0, "the relay runs");

    // QUIT mid-transfer (pyftpdlib answers at once and keeps the transfer
    // going), then the client closes its control connection.
    assert!(c.cmd("QUIT").await.starts_with("221"));
    drop(c);
    assert_eq!(
        wait_gauge(0.0).await,
        0.0,
        "the relay outlived its control session"
    );
    // The relay's sockets are closed: the data connection ends (EOF or
    // reset) long before the end of the file.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), d.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the data connection is still open ({got} bytes read)"),
        }
    }
    assert!(got < data.len(), "the whole file ({got} bytes) was relayed");
}
