//! ftpgate: an FTP application-level gateway (ALG) for the network edge.
//!
//! [`proto`] is the sans-IO protocol core; everything else is the daemon that
//! carries out its decisions with sockets, timers and logs.

pub mod config;
pub mod proto;
