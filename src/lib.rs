//! ftpgate: an FTP application-level gateway (ALG) for the network edge.
//!
//! [`proto`] is the sans-IO protocol core; everything else is the daemon that
//! carries out its decisions with sockets, timers and logs: [`server`]
//! accepts control connections, [`control`] runs one session around the core,
//! [`dataplane`] and [`relay`] carry the data connections, [`denylog`] and
//! [`metrics`] make every decision visible. [`proxy_protocol`] takes the
//! client's address from a trusted load balancer.

pub mod admin;
pub mod balancer;
pub mod clients;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod denials;
pub mod denylog;
pub mod localaddrs;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod netfilter;
pub mod nft;
pub mod proto;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod sockets;
pub mod tasks;
pub mod tls;
