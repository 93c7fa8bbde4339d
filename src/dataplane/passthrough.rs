//! Passthrough grants (transparent mode, `auth_tls = "passthrough"`): after
//! a server named in a `[[policy.tls_passthrough]]` rule accepts AUTH TLS,
//! the gateway can no longer read the control channel, so it cannot see
//! the data connections being negotiated. Instead, for as long as that
//! session lives, its client, and only that client, may connect to that
//! server on the rule's `data_ports` (the server's published passive
//! range). A grant is held by its session and withdrawn when the session
//! ends, however it ends (a drop guard).
//!
//! Those connections reach the gateway through the redirect `ftpgate
//! nft-rules` prints for each rule (to the transparent listener); the
//! listener finds their original destination, looks for a grant of the
//! connecting client, and relays them (in userland, on either data plane:
//! the bytes are TLS the gateway cannot read, so there is nothing to
//! gain from a kernel element over a relay but the copy). Connections that
//! match no grant are closed and counted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Owner;
use crate::proto::policy::canonical_ip;

struct Grant {
    client: IpAddr,
    server: IpAddr,
    ports: (u16, u16),
    owner: Owner,
}

/// Every live grant, gateway-wide.
#[derive(Default)]
pub struct Grants {
    live: Mutex<HashMap<u64, Grant>>,
    next: AtomicU64,
}

/// Withdraws its grant when dropped.
pub struct GrantGuard {
    grants: Arc<Grants>,
    id: u64,
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        self.grants
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Grants {
    pub fn new() -> Arc<Grants> {
        Arc::new(Grants::default())
    }

    /// Lets `client` reach `server` on `ports` until the guard drops.
    pub fn grant(
        self: &Arc<Self>,
        client: IpAddr,
        server: IpAddr,
        ports: (u16, u16),
        owner: Owner,
    ) -> GrantGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let grant = Grant {
            client: canonical_ip(client),
            server: canonical_ip(server),
            ports,
            owner,
        };
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, grant);
        GrantGuard {
            grants: Arc::clone(self),
            id,
        }
    }

    /// The session whose grant lets `client` connect to `to`, if any.
    pub fn find(&self, client: IpAddr, to: SocketAddr) -> Option<Owner> {
        let (client, server) = (canonical_ip(client), canonical_ip(to.ip()));
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values()
            .find(|g| {
                g.client == client
                    && g.server == server
                    && (g.ports.0..=g.ports.1).contains(&to.port())
            })
            .map(|g| g.owner.clone())
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
