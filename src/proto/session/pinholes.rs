//! The pinholes a session asked for: a capped set of slots, each with one
//! owner and one clock (waiting for its peer until it expires).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::Session;
use super::output::{NO_DATA_LEGS, Route};
use super::types::{DataMode, DataVerdict, Event, PinholeClose, PinholeId};
use crate::proto::Side;
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::policy::canonical_ip;

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
    /// Every peer the pinhole carries a connection from (two for
    /// [`super::types::Shape::AcceptBoth`]).
    pub(super) peers: Vec<IpAddr>,
    /// Those of `peers` that have not connected yet.
    pub(super) awaiting: Vec<IpAddr>,
    pub(super) state: SlotState,
}

impl Session {
    /// A connection from `peer` arrived at pinhole `id`. The core alone
    /// decides: the expected peer, while the pinhole waits, is taken (one
    /// connection per pinhole); anyone else is PASV theft (or, for an
    /// active pinhole, a server other than the one the PORT went to) and
    /// is refused and logged with its address.
    pub fn handle_data_connection(
        &mut self,
        id: PinholeId,
        peer: SocketAddr,
        now: Instant,
    ) -> DataVerdict {
        if self.closed {
            return DataVerdict::Refuse;
        }
        self.tick(now);
        let peer_ip = canonical_ip(peer.ip());
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            // Superseded, expired or already over: nothing waits here.
            return DataVerdict::Refuse;
        };
        let awaited = slot.awaiting.iter().position(|p| *p == peer_ip);
        let listen = match (slot.state, awaited) {
            (SlotState::Waiting { listen, .. }, Some(i)) => {
                slot.awaiting.swap_remove(i);
                let connected = slot.awaiting.is_empty();
                if connected {
                    slot.state = SlotState::Connected;
                }
                self.last_activity = now;
                if connected {
                    self.release_held_reply(id, listen, now);
                }
                return DataVerdict::Accept;
            }
            (SlotState::Waiting { listen, .. }, None) => Some(listen),
            (SlotState::Requested | SlotState::Connected, _) => None,
        };
        if !slot.peers.contains(&peer_ip) {
            let mut denial = Denial::new(DenyReason::PasvTheft, slot.mode.connecting_side())
                .expected_peer(slot.expected_peer)
                .peer(peer)
                .rule("expected_peer_only");
            denial.target = listen;
            self.refuse(denial, "", Route::Silent);
        }
        DataVerdict::Refuse
    }

    /// Another session of the same client took pinhole `id` over for a
    /// server-to-server transfer: it is withdrawn if it still waits.
    pub fn handle_pinhole_taken_over(&mut self, id: PinholeId, now: Instant) {
        self.tick(now);
        let before = self.slots.len();
        self.slots
            .retain(|s| !(s.id == id && matches!(s.state, SlotState::Waiting { .. })));
        if self.slots.len() < before {
            self.events.push_back(Event::ClosePinhole {
                id,
                cause: PinholeClose::TakenOver,
            });
        }
    }

    /// A transfer command got its final reply: the data connections it used
    /// are over as far as the session is concerned.
    pub(super) fn transfer_done(&mut self) {
        self.slots
            .retain(|s| !matches!(s.state, SlotState::Connected));
    }

    /// Claims a pinhole slot. A new data-connection offer supersedes the
    /// ones still waiting (RFC 959: the server keeps one data address).
    pub(super) fn reserve_slot(&mut self, mode: DataMode, peers: Vec<IpAddr>) -> Option<PinholeId> {
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
        let id = PinholeId {
            session: self.id,
            seq: self.allocate_id(),
        };
        self.slots.push(Slot {
            id,
            mode,
            expected_peer: peers.first().copied()?,
            awaiting: peers.clone(),
            peers,
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
            // A two-leg pinhole names the leg that never came.
            let (side, missing) = match slot.awaiting.as_slice() {
                [only] if slot.peers.len() > 1 && *only != slot.expected_peer => {
                    (Side::Server, *only)
                }
                _ => (slot.mode.connecting_side(), slot.expected_peer),
            };
            let denial = Denial::new(DenyReason::PinholeExpired, side)
                .target(listen)
                .expected_peer(missing);
            if self.held_reply.as_ref().is_some_and(|h| h.id == slot.id) {
                // A converted PORT/EPRT whose legs never came: its 425.
                self.refuse_held_reply(slot.id, denial, NO_DATA_LEGS);
            } else {
                self.refuse(denial, "", Route::Silent);
            }
        }
    }
}
