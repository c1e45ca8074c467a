//! Offer/answer negotiation of one pair of call participants, as the server relays it.
//!
//! In a P2P call every pair of participants runs WebRTC *perfect negotiation* through the server:
//! offers, answers, trickled ICE candidates, end-of-candidates and rollbacks go from one side of
//! the pair to the other. [`PairNegotiation`] owns what the server knows of that exchange (whose
//! offer is outstanding, which side is polite, whether an ICE restart is due) and decides for each
//! signal whether to forward it, refuse it with a typed [`NegotiationError`] or, on glare, which
//! offer stands.
//!
//! It must never look inside SDP (the driver says whether an offer restarts ICE) and never does
//! IO: the driver performs the [`Relay`] it gets back. It never panics on a signal, whatever the
//! order.
//!
//! # Rules
//!
//! - **Roles.** The participant who joined the call first is *impolite*, the other *polite*
//!   ([`impolite_side`]). Roles are fixed for the life of the pair: a reconnect keeps the original
//!   join time, so it never swaps them.
//! - **A signal from or to a participant who left** is refused with
//!   [`NegotiationError::PeerGone`] (the sender is checked first), whatever its kind.
//! - **Offer.** From `Stable` it is forwarded and becomes outstanding. From the side whose offer is
//!   outstanding it *replaces* that offer (WebRTC allows a new local offer in `have-local-offer`)
//!   and is forwarded; an ICE restart stays in progress if either offer restarts ICE. While an ICE
//!   restart is required (after a rejoin) an offer without `ice_restart` is refused with
//!   [`NegotiationError::IceRestartRequired`], from either side.
//! - **Glare** (an offer while the *other* side's offer is outstanding): the impolite offer wins.
//!   If the impolite offer arrives second, it is forwarded and the polite offer is discarded:
//!   [`Relay::ForwardRollingBack`]. If the polite offer arrives second, it is not forwarded:
//!   [`Relay::RolledBack`]. Either way the driver tells the polite side its offer was rolled back,
//!   and the polite side answers the impolite offer, which it has received.
//! - **Answer.** Refused with [`NegotiationError::NoPendingOffer`] in `Stable` and with
//!   [`NegotiationError::AnswerFromOfferer`] from the side whose offer is outstanding; otherwise
//!   forwarded, back to `Stable`, and counted (a restart offer's answer completes the restart).
//! - **Candidate and end-of-candidates** (trickle) are forwarded in any state once the server has
//!   accepted an offer or answer from the sender (since the pair began, or since the last rejoin):
//!   the offerer trickles before the answer comes back; the answerer trickles after its answer.
//!   Before that they are refused with [`NegotiationError::NoLocalDescription`]. Trickle from a
//!   side whose offer was rolled back by glare, until that side next offers, answers or rolls back,
//!   belongs to the discarded offer and is dropped: [`Relay::Discard`].
//! - **Rollback.** From the side whose offer is outstanding it is forwarded and the pair is back in
//!   `Stable`. Refused with [`NegotiationError::NoPendingOffer`] in `Stable` and with
//!   [`NegotiationError::RollbackFromAnswerer`] from the other side. A rollback from a side whose
//!   offer glare already rolled back is dropped ([`Relay::Discard`]).
//! - **Leave and rejoin.** [`PairNegotiation::handle_left`] discards any outstanding offer.
//!   [`PairNegotiation::handle_rejoined`] resets the pair to `Stable`, closes trickle until new
//!   descriptions are exchanged and, if an offer/answer was ever completed on the pair, requires
//!   the next offer to restart ICE.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Server-side negotiation state of one pair of call participants, called `A` and `B` here.
#[derive(Debug, Clone)]
pub struct PairNegotiation {
    /// Fixed at creation so a glare resolves the same way for the life of the pair.
    impolite: Side,
    state: SignalingState,
    /// Indexed by [`Side::index`].
    sides: [SideState; 2],
    /// Set by a rejoin after a completed exchange: the old ICE session may be dead, so the next
    /// offer must carry new ICE credentials. Cleared when a restart offer is answered.
    needs_ice_restart: bool,
    stats: NegotiationStats,
}

/// One side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

/// A participant's role in perfect negotiation with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
// Named apart from the member `Role` in the OpenAPI document (both were `Role`, and one hid the other).
#[schema(as = NegotiationRole)]
pub enum Role {
    /// Gives way on glare: rolls back its own offer and answers the peer's.
    Polite,
    /// Wins on glare: ignores the peer's colliding offer.
    Impolite,
}

/// The signaling state of a pair, from the server's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalingState {
    /// No offer is outstanding.
    Stable,
    /// An offer from `from` has been forwarded and not yet answered or rolled back.
    HaveOffer {
        from: Side,
        /// The offer restarts ICE.
        ice_restart: bool,
    },
}

/// A relayed signal, as the state machine sees it (the SDP or candidate itself is not its concern).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An SDP offer; `ice_restart` when it carries new ICE credentials.
    Offer {
        ice_restart: bool,
    },
    Answer,
    /// One trickled ICE candidate.
    Candidate,
    /// The sender has gathered all its candidates.
    EndOfCandidates,
    /// The sender withdraws its outstanding offer.
    Rollback,
}

/// The kind of a signal on the wire (the `kind` of a `call.signal` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    Offer,
    Answer,
    Candidate,
    EndOfCandidates,
    Rollback,
}

/// What the driver must do with an accepted signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Relay {
    /// Forward the signal to `to`, the sender's peer.
    Forward { to: Side },
    /// Glare won by the impolite sender: forward the offer to `to`, the polite side, whose own
    /// offer the server has discarded; tell `to` that its offer was rolled back.
    ForwardRollingBack { to: Side },
    /// Glare lost by the polite sender: do not forward the offer; tell `sender` that its offer
    /// was rolled back (the impolite offer it has received stands and awaits its answer).
    RolledBack { sender: Side },
    /// Forward nothing and report nothing: the signal belongs to an offer glare rolled back.
    Discard,
}

/// Why a signal was refused. Nothing changed in the pair's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiationError {
    /// `side` has left the call: nothing is relayed from or to it until it rejoins.
    PeerGone { side: Side },
    /// An answer or a rollback while no offer is outstanding.
    NoPendingOffer,
    /// An answer from the side whose offer is outstanding.
    AnswerFromOfferer,
    /// A rollback from the side that did not make the outstanding offer.
    RollbackFromAnswerer,
    /// A candidate or end-of-candidates before the sender made any offer or answer.
    NoLocalDescription,
    /// After a rejoin, the next offer must restart ICE.
    IceRestartRequired,
}

/// Counters of a pair, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NegotiationStats {
    /// Offer/answer exchanges completed (answers forwarded).
    pub completed: u64,
    /// Completed exchanges after the first one (track changes and ICE restarts).
    pub renegotiations: u64,
    /// Completed exchanges whose offer restarted ICE.
    pub ice_restarts: u64,
    /// Offers that collided with the other side's outstanding offer.
    pub glares: u64,
    /// Outstanding offers withdrawn by an explicit rollback from their offerer.
    pub rollbacks: u64,
}

/// What the server knows of one side.
#[derive(Debug, Clone, Copy, Default)]
struct SideState {
    /// Left the call (and not rejoined).
    gone: bool,
    /// An offer or answer from this side was accepted since the pair began or last rejoined; it
    /// has candidates worth trickling.
    described: bool,
    /// Its offer was rolled back by glare and it has not offered, answered or rolled back since.
    rolled_back: bool,
}

/// The side that is impolite in a pair whose participants joined with keys `a_joined` and
/// `b_joined`: the smaller key, i.e. the participant who joined the call first. Pass
/// `(joined_at_ms, participant_id)` so ties resolve the same way on every node, and the join time
/// of the call participation (not of the connection) so a reconnect keeps the roles. Equal keys
/// make `A` impolite.
pub fn impolite_side<J: Ord>(a_joined: J, b_joined: J) -> Side {
    if b_joined < a_joined {
        Side::B
    } else {
        Side::A
    }
}

impl PairNegotiation {
    /// A fresh pair in `Stable` where `impolite` wins glare.
    pub fn new(impolite: Side) -> Self {
        PairNegotiation {
            impolite,
            state: SignalingState::Stable,
            sides: [SideState::default(); 2],
            needs_ice_restart: false,
            stats: NegotiationStats::default(),
        }
    }

    /// A fresh pair with roles assigned by [`impolite_side`].
    pub fn for_join_order<J: Ord>(a_joined: J, b_joined: J) -> Self {
        Self::new(impolite_side(a_joined, b_joined))
    }

    /// Feeds one signal sent by `from` to its peer. On `Err` the signal is not relayed and the
    /// state is unchanged; the driver reports the error to the sender.
    #[must_use = "the relay says where the signal goes"]
    pub fn handle_signal(&mut self, from: Side, signal: Signal) -> Result<Relay, NegotiationError> {
        for side in [from, from.other()] {
            if self.sides[side.index()].gone {
                return Err(NegotiationError::PeerGone { side });
            }
        }
        match signal {
            Signal::Offer { ice_restart } => self.offer(from, ice_restart),
            Signal::Answer => self.answer(from),
            Signal::Candidate | Signal::EndOfCandidates => self.trickle(from),
            Signal::Rollback => self.rollback(from),
        }
    }

    /// `side` left the call (or its grace period started). Its outstanding offer, or the one it
    /// was sent, is discarded; signals from or to it are refused until
    /// [`handle_rejoined`](Self::handle_rejoined).
    pub fn handle_left(&mut self, side: Side) {
        self.sides[side.index()].gone = true;
        self.state = SignalingState::Stable;
        for s in &mut self.sides {
            s.rolled_back = false;
        }
    }

    /// `side` is back after a reconnect (whether or not [`handle_left`](Self::handle_left) was
    /// called). The pair restarts from `Stable` with trickle closed until new descriptions are
    /// exchanged, and, if an exchange was ever completed, the next offer must restart ICE.
    pub fn handle_rejoined(&mut self, side: Side) {
        self.sides[side.index()].gone = false;
        self.state = SignalingState::Stable;
        for s in &mut self.sides {
            s.described = false;
            s.rolled_back = false;
        }
        if self.stats.completed > 0 {
            self.needs_ice_restart = true;
        }
    }

    /// The pair's signaling state.
    pub fn state(&self) -> SignalingState {
        self.state
    }

    /// The role of `side` in this pair.
    pub fn role(&self, side: Side) -> Role {
        if side == self.impolite {
            Role::Impolite
        } else {
            Role::Polite
        }
    }

    /// The side that wins glare.
    pub fn impolite(&self) -> Side {
        self.impolite
    }

    /// An ICE-restart offer is outstanding.
    pub fn ice_restart_in_progress(&self) -> bool {
        matches!(
            self.state,
            SignalingState::HaveOffer {
                ice_restart: true,
                ..
            }
        )
    }

    /// The next offer must restart ICE (set by a rejoin, cleared when a restart is answered).
    pub fn needs_ice_restart(&self) -> bool {
        self.needs_ice_restart
    }

    /// `side` has not left the call (or has rejoined).
    pub fn is_present(&self, side: Side) -> bool {
        !self.sides[side.index()].gone
    }

    pub fn stats(&self) -> NegotiationStats {
        self.stats
    }

    fn offer(&mut self, from: Side, ice_restart: bool) -> Result<Relay, NegotiationError> {
        if self.needs_ice_restart && !ice_restart {
            return Err(NegotiationError::IceRestartRequired);
        }
        let to = from.other();
        let relay = match self.state {
            SignalingState::Stable => Relay::Forward { to },
            SignalingState::HaveOffer {
                from: offerer,
                ice_restart: restarting,
            } if offerer == from => {
                // A replacement: the restart the first offer began is not undone by a re-offer.
                self.state = SignalingState::HaveOffer {
                    from,
                    ice_restart: ice_restart || restarting,
                };
                self.accepted_from(from);
                return Ok(Relay::Forward { to });
            }
            SignalingState::HaveOffer { .. } => {
                self.stats.glares = self.stats.glares.saturating_add(1);
                if from != self.impolite {
                    self.sides[from.index()].rolled_back = true;
                    return Ok(Relay::RolledBack { sender: from });
                }
                self.sides[to.index()].rolled_back = true;
                Relay::ForwardRollingBack { to }
            }
        };
        self.state = SignalingState::HaveOffer { from, ice_restart };
        self.accepted_from(from);
        Ok(relay)
    }

    fn answer(&mut self, from: Side) -> Result<Relay, NegotiationError> {
        let SignalingState::HaveOffer {
            from: offerer,
            ice_restart,
        } = self.state
        else {
            return Err(NegotiationError::NoPendingOffer);
        };
        if offerer == from {
            return Err(NegotiationError::AnswerFromOfferer);
        }
        self.state = SignalingState::Stable;
        let stats = &mut self.stats;
        if stats.completed > 0 {
            stats.renegotiations = stats.renegotiations.saturating_add(1);
        }
        stats.completed = stats.completed.saturating_add(1);
        if ice_restart {
            stats.ice_restarts = stats.ice_restarts.saturating_add(1);
            self.needs_ice_restart = false;
        }
        self.accepted_from(from);
        Ok(Relay::Forward { to: from.other() })
    }

    fn trickle(&mut self, from: Side) -> Result<Relay, NegotiationError> {
        let side = self.sides[from.index()];
        if side.rolled_back {
            return Ok(Relay::Discard);
        }
        if !side.described {
            return Err(NegotiationError::NoLocalDescription);
        }
        Ok(Relay::Forward { to: from.other() })
    }

    fn rollback(&mut self, from: Side) -> Result<Relay, NegotiationError> {
        let side = &mut self.sides[from.index()];
        if side.rolled_back {
            side.rolled_back = false;
            return Ok(Relay::Discard);
        }
        match self.state {
            SignalingState::Stable => Err(NegotiationError::NoPendingOffer),
            SignalingState::HaveOffer { from: offerer, .. } if offerer != from => {
                Err(NegotiationError::RollbackFromAnswerer)
            }
            SignalingState::HaveOffer { .. } => {
                self.state = SignalingState::Stable;
                self.stats.rollbacks = self.stats.rollbacks.saturating_add(1);
                Ok(Relay::Forward { to: from.other() })
            }
        }
    }

    /// An offer or answer from `side` was accepted: it now has candidates of its own, and any
    /// earlier rolled-back offer is behind it.
    fn accepted_from(&mut self, side: Side) {
        let s = &mut self.sides[side.index()];
        s.described = true;
        s.rolled_back = false;
    }
}

impl Side {
    /// The peer of this side.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

impl Signal {
    /// The signal of a wire `kind`; `ice_restart` is meaningful for offers only and ignored for
    /// other kinds.
    pub fn from_wire(kind: SignalKind, ice_restart: bool) -> Signal {
        match kind {
            SignalKind::Offer => Signal::Offer { ice_restart },
            SignalKind::Answer => Signal::Answer,
            SignalKind::Candidate => Signal::Candidate,
            SignalKind::EndOfCandidates => Signal::EndOfCandidates,
            SignalKind::Rollback => Signal::Rollback,
        }
    }

    pub fn kind(self) -> SignalKind {
        match self {
            Signal::Offer { .. } => SignalKind::Offer,
            Signal::Answer => SignalKind::Answer,
            Signal::Candidate => SignalKind::Candidate,
            Signal::EndOfCandidates => SignalKind::EndOfCandidates,
            Signal::Rollback => SignalKind::Rollback,
        }
    }
}

impl SignalKind {
    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::Offer => "offer",
            SignalKind::Answer => "answer",
            SignalKind::Candidate => "candidate",
            SignalKind::EndOfCandidates => "end_of_candidates",
            SignalKind::Rollback => "rollback",
        }
    }
}

impl Relay {
    /// The side the signal must be forwarded to, if any.
    pub fn forward_to(self) -> Option<Side> {
        match self {
            Relay::Forward { to } | Relay::ForwardRollingBack { to } => Some(to),
            Relay::RolledBack { .. } | Relay::Discard => None,
        }
    }

    /// The side to tell that its offer was rolled back by glare, if any.
    pub fn rolled_back(self) -> Option<Side> {
        match self {
            Relay::ForwardRollingBack { to } => Some(to),
            Relay::RolledBack { sender } => Some(sender),
            Relay::Forward { .. } | Relay::Discard => None,
        }
    }
}

impl NegotiationError {
    /// A stable snake_case code; never changes meaning once published.
    pub fn code(self) -> &'static str {
        match self {
            NegotiationError::PeerGone { .. } => "peer_gone",
            NegotiationError::NoPendingOffer => "no_pending_offer",
            NegotiationError::AnswerFromOfferer => "answer_from_offerer",
            NegotiationError::RollbackFromAnswerer => "rollback_from_answerer",
            NegotiationError::NoLocalDescription => "no_local_description",
            NegotiationError::IceRestartRequired => "ice_restart_required",
        }
    }
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NegotiationError::PeerGone { .. } => "a participant of this pair has left the call",
            NegotiationError::NoPendingOffer => "no offer is outstanding",
            NegotiationError::AnswerFromOfferer => "the offerer cannot answer its own offer",
            NegotiationError::RollbackFromAnswerer => "only the offerer can roll back its offer",
            NegotiationError::NoLocalDescription => {
                "candidates need an offer or answer from the sender first"
            }
            NegotiationError::IceRestartRequired => {
                "after a reconnect the next offer must restart ICE"
            }
        })
    }
}

impl std::error::Error for NegotiationError {}

#[cfg(test)]
mod tests {
    use super::Side::{A, B};
    use super::*;

    const OFFER: Signal = Signal::Offer { ice_restart: false };
    const RESTART: Signal = Signal::Offer { ice_restart: true };

    /// A is impolite, B polite.
    fn pair() -> PairNegotiation {
        PairNegotiation::new(A)
    }

    fn ok(p: &mut PairNegotiation, from: Side, signal: Signal) -> Relay {
        p.handle_signal(from, signal).expect("accepted")
    }

    fn err(p: &mut PairNegotiation, from: Side, signal: Signal) -> NegotiationError {
        p.handle_signal(from, signal).expect_err("refused")
    }

    /// A pair that completed one exchange, A offering.
    fn negotiated() -> PairNegotiation {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        let _ = ok(&mut p, B, Signal::Answer);
        p
    }

    #[test]
    fn the_participant_who_joined_first_is_impolite() {
        assert_eq!(impolite_side((100, "zed"), (200, "amy")), A);
        assert_eq!(impolite_side((300, "amy"), (200, "zed")), B);
        assert_eq!(
            impolite_side((100, "zed"), (100, "amy")),
            B,
            "ties go to the smaller id"
        );
        assert_eq!(impolite_side(7, 7), A, "equal keys make A impolite");
        let p = PairNegotiation::for_join_order(2, 1);
        assert_eq!((p.role(A), p.role(B)), (Role::Polite, Role::Impolite));
    }

    #[test]
    fn an_offer_and_its_answer_are_forwarded_and_the_pair_returns_to_stable() {
        let mut p = pair();
        assert_eq!(ok(&mut p, B, OFFER), Relay::Forward { to: A });
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: B,
                ice_restart: false
            }
        );
        assert_eq!(ok(&mut p, A, Signal::Answer), Relay::Forward { to: B });
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().completed, 1);
        assert_eq!(p.stats().renegotiations, 0);
    }

    #[test]
    fn glare_with_the_polite_offer_second_rolls_the_polite_offer_back_unforwarded() {
        let mut p = pair();
        assert_eq!(ok(&mut p, A, OFFER), Relay::Forward { to: B });
        let relay = ok(&mut p, B, OFFER);
        assert_eq!(relay, Relay::RolledBack { sender: B });
        assert_eq!((relay.forward_to(), relay.rolled_back()), (None, Some(B)));
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
        assert_eq!(ok(&mut p, B, Signal::Answer), Relay::Forward { to: A });
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().glares, 1);
    }

    #[test]
    fn glare_with_the_impolite_offer_second_forwards_it_over_the_polite_offer() {
        let mut p = pair();
        assert_eq!(ok(&mut p, B, OFFER), Relay::Forward { to: A });
        let relay = ok(&mut p, A, OFFER);
        assert_eq!(relay, Relay::ForwardRollingBack { to: B });
        assert_eq!(
            (relay.forward_to(), relay.rolled_back()),
            (Some(B), Some(B))
        );
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
        assert_eq!(ok(&mut p, B, Signal::Answer), Relay::Forward { to: A });
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().glares, 1);
    }

    #[test]
    fn trickle_of_an_offer_rolled_back_by_glare_is_discarded_until_the_polite_side_answers() {
        let mut p = pair();
        let _ = ok(&mut p, B, OFFER);
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(ok(&mut p, B, Signal::Candidate), Relay::Discard);
        assert_eq!(ok(&mut p, B, Signal::EndOfCandidates), Relay::Discard);
        assert_eq!(ok(&mut p, A, Signal::Candidate), Relay::Forward { to: B });
        let _ = ok(&mut p, B, Signal::Answer);
        assert_eq!(ok(&mut p, B, Signal::Candidate), Relay::Forward { to: A });
    }

    #[test]
    fn a_rollback_of_an_offer_glare_already_rolled_back_is_discarded() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        let _ = ok(&mut p, B, OFFER);
        assert_eq!(ok(&mut p, B, Signal::Rollback), Relay::Discard);
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
        assert_eq!(p.stats().rollbacks, 0);
    }

    #[test]
    fn the_offerer_can_roll_back_its_offer() {
        let mut p = pair();
        let _ = ok(&mut p, B, OFFER);
        assert_eq!(ok(&mut p, B, Signal::Rollback), Relay::Forward { to: A });
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().rollbacks, 1);
        assert_eq!(
            ok(&mut p, A, OFFER),
            Relay::Forward { to: B },
            "either side may offer again"
        );
    }

    #[test]
    fn an_ice_restart_is_in_progress_until_answered_and_then_counted() {
        let mut p = negotiated();
        assert_eq!(ok(&mut p, B, RESTART), Relay::Forward { to: A });
        assert!(p.ice_restart_in_progress());
        let _ = ok(&mut p, A, Signal::Answer);
        assert!(!p.ice_restart_in_progress());
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().ice_restarts, 1);
        assert_eq!(p.stats().renegotiations, 1);
    }

    #[test]
    fn renegotiation_works_any_number_of_times() {
        let mut p = negotiated();
        // Adding a track, adding another, removing one: each a full offer/answer round.
        for (offerer, round) in [(A, 1), (B, 2), (A, 3)] {
            assert_eq!(
                ok(&mut p, offerer, OFFER),
                Relay::Forward {
                    to: offerer.other()
                }
            );
            let _ = ok(&mut p, offerer, Signal::Candidate);
            assert_eq!(
                ok(&mut p, offerer.other(), Signal::Answer),
                Relay::Forward { to: offerer }
            );
            assert_eq!(p.state(), SignalingState::Stable);
            assert_eq!(p.stats().renegotiations, round);
        }
        assert_eq!(p.stats().completed, 4);
        assert_eq!(p.stats().ice_restarts, 0);
    }

    #[test]
    fn a_second_offer_from_the_offerer_replaces_the_first() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(ok(&mut p, A, OFFER), Relay::Forward { to: B });
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
        let _ = ok(&mut p, B, Signal::Answer);
        assert_eq!(p.stats().completed, 1);
        assert_eq!(p.stats().glares, 0);
    }

    #[test]
    fn a_replacement_offer_keeps_an_ice_restart_in_progress() {
        let mut p = negotiated();
        let _ = ok(&mut p, A, RESTART);
        let _ = ok(&mut p, A, OFFER);
        assert!(p.ice_restart_in_progress());
        let _ = ok(&mut p, B, Signal::Answer);
        assert_eq!(p.stats().ice_restarts, 1);
    }

    #[test]
    fn the_offerer_trickles_before_the_answer_arrives() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(ok(&mut p, A, Signal::Candidate), Relay::Forward { to: B });
        assert_eq!(
            ok(&mut p, A, Signal::EndOfCandidates),
            Relay::Forward { to: B }
        );
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
    }

    #[test]
    fn both_sides_trickle_after_the_answer() {
        let mut p = negotiated();
        assert_eq!(ok(&mut p, A, Signal::Candidate), Relay::Forward { to: B });
        assert_eq!(ok(&mut p, B, Signal::Candidate), Relay::Forward { to: A });
        assert_eq!(
            ok(&mut p, B, Signal::EndOfCandidates),
            Relay::Forward { to: A }
        );
    }

    #[test]
    fn trickle_before_any_offer_or_answer_is_refused() {
        let mut p = pair();
        assert_eq!(
            err(&mut p, A, Signal::Candidate),
            NegotiationError::NoLocalDescription
        );
        assert_eq!(
            err(&mut p, B, Signal::EndOfCandidates),
            NegotiationError::NoLocalDescription
        );
    }

    #[test]
    fn the_answerer_cannot_trickle_before_its_answer() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(
            err(&mut p, B, Signal::Candidate),
            NegotiationError::NoLocalDescription
        );
    }

    #[test]
    fn an_answer_without_an_outstanding_offer_is_refused() {
        let mut p = pair();
        assert_eq!(
            err(&mut p, A, Signal::Answer),
            NegotiationError::NoPendingOffer
        );
        let mut p = negotiated();
        assert_eq!(
            err(&mut p, B, Signal::Answer),
            NegotiationError::NoPendingOffer,
            "answered once"
        );
        assert_eq!(p.stats().completed, 1);
    }

    #[test]
    fn the_offerer_cannot_answer_its_own_offer() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(
            err(&mut p, A, Signal::Answer),
            NegotiationError::AnswerFromOfferer
        );
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
    }

    #[test]
    fn a_rollback_without_an_outstanding_offer_is_refused() {
        let mut p = negotiated();
        assert_eq!(
            err(&mut p, A, Signal::Rollback),
            NegotiationError::NoPendingOffer
        );
    }

    #[test]
    fn the_answerer_cannot_roll_back_the_offer() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        assert_eq!(
            err(&mut p, B, Signal::Rollback),
            NegotiationError::RollbackFromAnswerer
        );
        assert_eq!(
            p.state(),
            SignalingState::HaveOffer {
                from: A,
                ice_restart: false
            }
        );
    }

    #[test]
    fn signals_to_a_participant_who_left_are_refused() {
        let mut p = negotiated();
        p.handle_left(B);
        assert!(!p.is_present(B));
        for signal in [
            OFFER,
            Signal::Answer,
            Signal::Candidate,
            Signal::EndOfCandidates,
            Signal::Rollback,
        ] {
            assert_eq!(
                err(&mut p, A, signal),
                NegotiationError::PeerGone { side: B }
            );
        }
    }

    #[test]
    fn signals_from_a_participant_who_left_are_refused() {
        let mut p = negotiated();
        p.handle_left(A);
        p.handle_left(B);
        assert_eq!(
            err(&mut p, A, Signal::Candidate),
            NegotiationError::PeerGone { side: A }
        );
    }

    #[test]
    fn leaving_discards_the_outstanding_offer() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        p.handle_left(B);
        assert_eq!(p.state(), SignalingState::Stable);
        assert_eq!(p.stats().completed, 0);
    }

    #[test]
    fn after_a_rejoin_the_next_offer_must_restart_ice() {
        let mut p = negotiated();
        let _ = ok(&mut p, B, OFFER); // outstanding when B drops
        p.handle_left(B);
        p.handle_rejoined(B);
        assert!(p.is_present(B));
        assert_eq!(p.state(), SignalingState::Stable);
        assert!(p.needs_ice_restart());
        assert_eq!(err(&mut p, A, OFFER), NegotiationError::IceRestartRequired);
        assert_eq!(err(&mut p, B, OFFER), NegotiationError::IceRestartRequired);
        assert_eq!(ok(&mut p, B, RESTART), Relay::Forward { to: A });
        let _ = ok(&mut p, A, Signal::Answer);
        assert!(!p.needs_ice_restart());
        assert_eq!(p.stats().ice_restarts, 1);
        assert_eq!(
            ok(&mut p, A, OFFER),
            Relay::Forward { to: B },
            "plain offers again"
        );
    }

    #[test]
    fn a_rejoin_closes_trickle_until_new_descriptions_are_exchanged() {
        let mut p = negotiated();
        p.handle_rejoined(A); // a resume the driver saw without a leave
        assert_eq!(
            err(&mut p, A, Signal::Candidate),
            NegotiationError::NoLocalDescription
        );
        assert_eq!(
            err(&mut p, B, Signal::Candidate),
            NegotiationError::NoLocalDescription
        );
        let _ = ok(&mut p, A, RESTART);
        assert_eq!(ok(&mut p, A, Signal::Candidate), Relay::Forward { to: B });
    }

    #[test]
    fn a_rolled_back_restart_offer_leaves_the_restart_required() {
        let mut p = negotiated();
        p.handle_rejoined(B);
        let _ = ok(&mut p, B, RESTART);
        let _ = ok(&mut p, B, Signal::Rollback);
        assert!(p.needs_ice_restart());
        assert_eq!(err(&mut p, A, OFFER), NegotiationError::IceRestartRequired);
    }

    #[test]
    fn a_rejoin_before_any_completed_exchange_does_not_require_a_restart() {
        let mut p = pair();
        let _ = ok(&mut p, A, OFFER);
        p.handle_left(A);
        p.handle_rejoined(A);
        assert!(!p.needs_ice_restart());
        assert_eq!(ok(&mut p, A, OFFER), Relay::Forward { to: B });
    }

    #[test]
    fn error_codes_are_stable_snake_case() {
        let all = [
            (NegotiationError::PeerGone { side: A }, "peer_gone"),
            (NegotiationError::NoPendingOffer, "no_pending_offer"),
            (NegotiationError::AnswerFromOfferer, "answer_from_offerer"),
            (
                NegotiationError::RollbackFromAnswerer,
                "rollback_from_answerer",
            ),
            (NegotiationError::NoLocalDescription, "no_local_description"),
            (NegotiationError::IceRestartRequired, "ice_restart_required"),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn signal_kinds_are_snake_case_on_the_wire() {
        for kind in [
            SignalKind::Offer,
            SignalKind::Answer,
            SignalKind::Candidate,
            SignalKind::EndOfCandidates,
            SignalKind::Rollback,
        ] {
            let json = serde_json::to_string(&kind).expect("serializes");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(
                serde_json::from_str::<SignalKind>(&json).expect("parses"),
                kind
            );
            assert_eq!(Signal::from_wire(kind, false).kind(), kind);
        }
        assert_eq!(Signal::from_wire(SignalKind::Offer, true), RESTART);
        assert_eq!(Signal::from_wire(SignalKind::Answer, true), Signal::Answer);
        assert_eq!(
            serde_json::to_string(&Role::Impolite).expect("serializes"),
            "\"impolite\""
        );
    }
}
