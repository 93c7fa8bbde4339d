//! Data-mode conversion (`server_data`) on loopback, without root: a real
//! FTP server (pyftpdlib from Debian), the gateway in-process on the proxy
//! plane, and real curl downloading and uploading in every mode the client
//! has. Client and server share 127.0.0.1 here, so the "active" pinhole
//! takes the client's connection first (it connects on the 227/229, the
//! server only after the transfer command).

mod common;

use common::{FtpServer, curl, have, skip};
use ftpgate::config::Config;
use ftpgate::daemon;

async fn gateway(
    upstream: std::net::SocketAddr,
    ports: &str,
    server_data: &str,
) -> (daemon::Running, std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"{upstream}\"\n\
         server_data = \"{server_data}\"\n[data]\nports = \"{ports}\"\naccept_timeout = \"5s\"\n\
         [deny_log]\npath = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\n",
        dir.path().join("deny.jsonl").display()
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let running = daemon::start(cfg).await.unwrap();
    let addr = running.listeners[0].1;
    (running, addr, dir)
}

async fn transfers_in_every_client_mode(test: &str, server_data: &str, ports: &str) {
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    if !have("curl") {
        return skip(test, "curl is not installed");
    }
    let data = server.put_file("data.bin", 1 << 20);
    let (_running, addr, dir) = gateway(server.addr, ports, server_data).await;
    let cells: [(&str, &[&str]); 4] = [
        ("EPSV", &[]),
        ("PASV", &["--disable-epsv"]),
        ("EPRT", &["--ftp-port", "127.0.0.1"]),
        ("PORT", &["--ftp-port", "127.0.0.1", "--disable-eprt"]),
    ];
    for (i, (name, args)) in cells.into_iter().enumerate() {
        let url = format!("ftp://ftptest:ftptest@{addr}/data.bin");
        let out = dir.path().join(format!("out{i}.bin"));
        let mut all: Vec<&str> = args.to_vec();
        let out_s = out.to_str().unwrap();
        all.extend(["-o", out_s, &url]);
        let (ok, err) = curl(&all).await;
        assert!(ok, "{server_data}, {name} download: {err}");
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{server_data}, {name}: bytes differ"
        );
        // And an upload the same way.
        let up_name = format!("up{i}.bin");
        let up_url = format!("ftp://ftptest:ftptest@{addr}/{up_name}");
        let src = dir.path().join("src.bin");
        std::fs::write(&src, &data).unwrap();
        let mut all: Vec<&str> = args.to_vec();
        let src_s = src.to_str().unwrap();
        all.extend(["-T", src_s, &up_url]);
        let (ok, err) = curl(&all).await;
        assert!(ok, "{server_data}, {name} upload: {err}");
        assert!(
            std::fs::read(server.root.path().join(&up_name)).unwrap() == data,
            "{server_data}, {name} upload: bytes differ"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_data_passive_carries_every_client_mode_both_ways() {
    transfers_in_every_client_mode(
        "server_data_passive_carries_every_client_mode_both_ways",
        "passive",
        "55300-55399",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_data_active_carries_every_client_mode_both_ways() {
    transfers_in_every_client_mode(
        "server_data_active_carries_every_client_mode_both_ways",
        "active",
        "55400-55499",
    )
    .await;
}
