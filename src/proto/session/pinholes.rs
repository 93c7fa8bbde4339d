//! The pinholes a session asked for: a capped set of slots, each with one
//! owner and one clock (waiting for its peer until it expires).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::Session;
use super::output::Route;
use super::types::{DataMode, Event, PinholeClose, PinholeId};
use crate::proto::deny::{Denial, DenyReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    Requested,
    Waiting {
        expires: Instant,
        listen: SocketAddr,
    },
    Connected,
}

#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) id: PinholeId,
    pub(super) mode: DataMode,
    pub(super) expected_peer: IpAddr,
    pub(super) state: SlotState,
}

impl Session {
    /// Claims a pinhole slot. A new data-connection offer supersedes the
    /// ones still waiting (RFC 959: the server keeps one data address).
    pub(super) fn reserve_slot(
        &mut self,
        mode: DataMode,
        expected_peer: IpAddr,
    ) -> Option<PinholeId> {
        let mut superseded = Vec::new();
        self.slots.retain(|s| match s.state {
            SlotState::Waiting { .. } => {
                superseded.push(s.id);
                false
            }
            _ => true,
        });
        for id in superseded {
            self.events.push_back(Event::ClosePinhole {
                id,
                cause: PinholeClose::Superseded,
            });
        }
        if self.slots.len() >= self.cfg.max_pinholes {
            return None;
        }
        let id = PinholeId(self.allocate_id());
        self.slots.push(Slot {
            id,
            mode,
            expected_peer,
            state: SlotState::Requested,
        });
        Some(id)
    }

    /// The earliest time a waiting pinhole expires.
    pub(super) fn next_pinhole_expiry(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Waiting { expires, .. } => Some(expires),
                _ => None,
            })
            .min()
    }

    /// Closes the pinholes whose peer did not connect by `now`; each is one
    /// silent refusal, blamed on the side that should have connected.
    pub(super) fn expire_pinholes(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.slots.retain(|s| match s.state {
            SlotState::Waiting { expires, listen } if expires <= now => {
                expired.push((s.clone(), listen));
                false
            }
            _ => true,
        });
        for (slot, listen) in expired {
            self.events.push_back(Event::ClosePinhole {
                id: slot.id,
                cause: PinholeClose::Expired,
            });
            let denial = Denial::new(DenyReason::PinholeExpired, slot.mode.connecting_side())
                .target(listen)
                .expected_peer(slot.expected_peer);
            self.refuse(denial, "", Route::Silent);
        }
    }
}
