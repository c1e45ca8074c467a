//! A real WebRTC peer for integration tests: [str0m] (sans-IO) driven over a real UDP socket
//! bound to `127.0.0.1`.
//!
//! Each [`Peer`] spawns one tokio task that owns the [`str0m::Rtc`] and the `UdpSocket` and runs
//! str0m's run loop (mutate → drain `poll_output` to `Output::Timeout` → wait for the next
//! command, datagram or timeout). The test talks to it through a command channel, so every method
//! takes `&self` and a `Peer` can be shared (e.g. in an `Arc`). Dropping the `Peer` stops its task
//! and closes its socket. The task never panics on network input: bad datagrams, bad candidates
//! and str0m errors are logged (tracing, target `parley_test_peer`) and the loop goes on.
//!
//! Signaling is left to the test: SDP and ICE candidates are plain strings, so they can be carried
//! through Parley's WebSocket or passed in memory.
//!
//! - [`Peer::create_offer`] — the initial offer. On the first call it adds the data channel
//!   `"parley"` (the offerer creates the channel; the answerer gets it from the remote side).
//! - [`Peer::accept_offer`] — applies a remote offer (initial or ICE restart), returns the
//!   answer.
//! - [`Peer::accept_answer`] — applies the answer to this peer's pending offer.
//! - [`Peer::ice_restart_offer`] — an offer with new ICE ufrag/pwd (either side may call it once
//!   connected); the remote answers it with [`Peer::accept_offer`].
//! - [`Peer::local_candidate`] / [`Peer::add_remote_candidate`] — trickle ICE with
//!   `candidate:…` strings (the `RTCIceCandidate.candidate` form; an `a=` prefix is accepted).
//! - [`Peer::send`], [`Peer::recv`] — text messages on the data channel.
//! - [`Peer::wait_connected`], [`Peer::wait_channel_open`], [`Peer::is_connected`],
//!   [`Peer::is_channel_open`], [`Peer::connect_count`], [`Peer::ice_state`],
//!   [`Peer::ignored_candidates`], [`Peer::local_addr`] — state.
//!
//! Candidates: by default ([`PeerConfig::sdp_candidates`] `true`) each SDP this peer produces
//! carries its one host candidate, so trickling is optional. With `sdp_candidates: false` the
//! `a=candidate` lines are stripped from the SDP this peer emits, and the remote learns the
//! candidate only through [`Peer::local_candidate`] → [`Peer::add_remote_candidate`]. Trickle a
//! candidate after the remote has applied the SDP of the same ICE generation (its `ufrag` must
//! match; str0m drops a mismatching one silently). After an ICE restart the remote forgets all
//! candidates, so a trickle-only pair must trickle again.
//!
//! Loopback only: the peer has exactly one local candidate, `127.0.0.1:<port>` (UDP). Remote
//! candidates, from an SDP or trickled, are used only if their address is `127.0.0.1` and their
//! protocol UDP; others are dropped (counted by [`Peer::ignored_candidates`]). As a last guard the
//! task never sends a datagram to an address other than `127.0.0.1` and ignores datagrams from
//! any other address.
//!
//! Every wait is bounded: the `wait_*`/`recv` methods take a timeout, and every command waits at
//! most [`COMMAND_TIMEOUT`] for the task's reply. Methods that must be called inside a tokio
//! runtime: all of them, including [`Peer::new`] (it spawns the task).

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Label of the data channel [`Peer::create_offer`] adds.
pub const CHANNEL_LABEL: &str = "parley";

/// How long a method waits for the peer task to answer one command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound for one sleep of the run loop (str0m may ask for a far-away timeout).
const MAX_SLEEP: Duration = Duration::from_millis(100);

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const LOG: &str = "parley_test_peer";

/// Options for [`Peer::with_config`].
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Whether the SDP this peer produces carries its `a=candidate` line (default `true`).
    /// With `false`, the remote must get the candidate through [`Peer::local_candidate`].
    pub sdp_candidates: bool,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            sdp_candidates: true,
        }
    }
}

/// What the task publishes after each step.
#[derive(Debug, Clone, Default)]
struct Status {
    /// `Rtc::is_connected()`: ICE connected, DTLS up.
    connected: bool,
    /// How many times `connected` went from false to true.
    connect_count: u32,
    /// The data channel has opened (`Event::ChannelOpen`) and not closed since.
    channel_open: bool,
    /// The last ICE connection state str0m reported.
    ice_state: Option<IceConnectionState>,
    /// Remote candidates dropped by the loopback-only policy (or unparsable).
    ignored_candidates: u32,
}

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

enum Command {
    CreateOffer(Reply<String>),
    IceRestartOffer(Reply<String>),
    AcceptOffer(String, Reply<String>),
    AcceptAnswer(String, Reply<()>),
    LocalCandidate(Reply<String>),
    AddRemoteCandidate(String, Reply<bool>),
    Send(String, Reply<()>),
}

/// A WebRTC peer (str0m) on a UDP socket bound to `127.0.0.1`; see the module docs.
pub struct Peer {
    name: String,
    addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<Status>,
    messages: Mutex<mpsc::UnboundedReceiver<String>>,
    task: JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Peer {
    /// A peer with the default [`PeerConfig`] (candidate carried in the SDP).
    ///
    /// Binds `127.0.0.1:0` and spawns the run-loop task; must be called inside a tokio runtime.
    /// Panics if the socket cannot be bound.
    pub fn new(name: impl Into<String>) -> Peer {
        Peer::with_config(name, PeerConfig::default())
    }

    /// A peer with the given options; see [`Peer::new`].
    pub fn with_config(name: impl Into<String>, config: PeerConfig) -> Peer {
        let name = name.into();
        let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding a UDP socket on 127.0.0.1");
        std_socket
            .set_nonblocking(true)
            .expect("setting the UDP socket non-blocking");
        let socket =
            UdpSocket::from_std(std_socket).expect("registering the UDP socket with tokio");
        let addr = socket.local_addr().expect("the UDP socket's local address");

        let mut rtc = Rtc::builder().build(Instant::now());
        let candidate = Candidate::host(addr, "udp").expect("a host candidate for 127.0.0.1");
        let local_candidate = rtc
            .add_local_candidate(candidate)
            .expect("str0m accepts the 127.0.0.1 host candidate")
            .clone();

        let (commands, command_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::default());
        let (message_tx, messages) = mpsc::unbounded_channel();

        let driver = Driver {
            config,
            rtc,
            socket,
            addr,
            local_candidate,
            sdp_ufrag: None,
            pending: None,
            offered_channel: false,
            channel: None,
            status: Status::default(),
            status_tx,
            message_tx,
        };
        let span = tracing::debug_span!(target: LOG, "peer", name = %name);
        let task = tokio::spawn(driver.run(command_rx).instrument(span));

        Peer {
            name,
            addr,
            commands,
            status,
            messages: Mutex::new(messages),
            task,
        }
    }

    /// The name given at creation (used in logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UDP socket's address, `127.0.0.1:<port>`.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| anyhow!("peer {}: its task has stopped", self.name))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Err(_) => bail!(
                "peer {}: no reply from its task within {COMMAND_TIMEOUT:?}",
                self.name
            ),
            Ok(Err(_)) => bail!("peer {}: its task stopped before replying", self.name),
            Ok(Ok(result)) => result.with_context(|| format!("peer {}", self.name)),
        }
    }

    /// The initial offer (SDP text). The first call adds the data channel [`CHANNEL_LABEL`];
    /// the offer stays pending until [`Peer::accept_answer`]. Fails if there is nothing to
    /// negotiate (e.g. a second call after the channel exists: use [`Peer::ice_restart_offer`]).
    pub async fn create_offer(&self) -> anyhow::Result<String> {
        self.call(Command::CreateOffer).await
    }

    /// An offer that restarts ICE (new ufrag/pwd, same local candidate). Pending until
    /// [`Peer::accept_answer`]; ICE reconnects once both sides applied it.
    pub async fn ice_restart_offer(&self) -> anyhow::Result<String> {
        self.call(Command::IceRestartOffer).await
    }

    /// Applies a remote offer (initial or re-offer, e.g. an ICE restart) and returns the answer
    /// SDP. Candidates in it that are not `127.0.0.1`/UDP are dropped first. Any offer of ours
    /// still pending is discarded (str0m's rule).
    pub async fn accept_offer(&self, sdp: &str) -> anyhow::Result<String> {
        self.call(|r| Command::AcceptOffer(sdp.to_owned(), r)).await
    }

    /// Applies the remote answer to our pending offer.
    pub async fn accept_answer(&self, sdp: &str) -> anyhow::Result<()> {
        self.call(|r| Command::AcceptAnswer(sdp.to_owned(), r))
            .await
    }

    /// Our one host candidate as a `candidate:<foundation> 1 udp <prio> 127.0.0.1 <port> typ
    /// host ufrag <ufrag>` string, with the ufrag of the last SDP this peer produced (none
    /// before the first one).
    pub async fn local_candidate(&self) -> anyhow::Result<String> {
        self.call(Command::LocalCandidate).await
    }

    /// Adds a trickled remote candidate (`candidate:…` or `a=candidate:…`). Returns `Ok(true)`
    /// if it was handed to str0m, `Ok(false)` if the loopback policy dropped it (or it was the
    /// empty end-of-candidates string), `Err` if it does not parse.
    pub async fn add_remote_candidate(&self, candidate: &str) -> anyhow::Result<bool> {
        self.call(|r| Command::AddRemoteCandidate(candidate.to_owned(), r))
            .await
    }

    /// Sends a text message on the data channel; fails if it is not open or its buffer is full.
    pub async fn send(&self, text: &str) -> anyhow::Result<()> {
        self.call(|r| Command::Send(text.to_owned(), r)).await
    }

    /// The next data-channel message received (binary ones as lossy UTF-8), in order, or
    /// `None` if none comes within `timeout`.
    pub async fn recv(&self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut messages = tokio::time::timeout_at(deadline, self.messages.lock())
            .await
            .ok()?;
        tokio::time::timeout_at(deadline, messages.recv())
            .await
            .ok()
            .flatten()
    }

    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl FnMut(&Status) -> bool,
    ) -> anyhow::Result<()> {
        let mut status = self.status.clone();
        match tokio::time::timeout(timeout, status.wait_for(ready)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("peer {}: task stopped while waiting for {what}", self.name),
            Err(_) => bail!(
                "peer {}: not {what} within {timeout:?} (status {:?})",
                self.name,
                *self.status.borrow()
            ),
        }
    }

    /// Waits until ICE and DTLS are up (`Rtc::is_connected`). Right after an ICE restart has
    /// been applied on this side (`accept_offer`/`accept_answer` returned) the peer is not
    /// connected, so this waits for the reconnection.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for("connected", timeout, |s| s.connected).await
    }

    /// Waits until the data channel has opened on this side.
    pub async fn wait_channel_open(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for("channel open", timeout, |s| s.channel_open)
            .await
    }

    /// Whether ICE and DTLS are up right now.
    pub fn is_connected(&self) -> bool {
        self.status.borrow().connected
    }

    /// Whether the data channel is open right now.
    pub fn is_channel_open(&self) -> bool {
        self.status.borrow().channel_open
    }

    /// How many times this peer became connected (1 after the first connection, 2 after one
    /// ICE restart has reconnected, …).
    pub fn connect_count(&self) -> u32 {
        self.status.borrow().connect_count
    }

    /// The last ICE connection state str0m reported, as text (`"Connected"`, `"Checking"`, …).
    pub fn ice_state(&self) -> Option<String> {
        self.status.borrow().ice_state.map(|s| format!("{s:?}"))
    }

    /// How many remote candidates (SDP or trickled) the loopback-only policy dropped.
    pub fn ignored_candidates(&self) -> u32 {
        self.status.borrow().ignored_candidates
    }
}

/// The task side: owns the `Rtc` and the socket.
struct Driver {
    config: PeerConfig,
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
    /// As str0m stored it (local preference applied); its ufrag is replaced when printed.
    local_candidate: Candidate,
    /// `a=ice-ufrag` of the last SDP we produced.
    sdp_ufrag: Option<String>,
    pending: Option<SdpPendingOffer>,
    offered_channel: bool,
    channel: Option<ChannelId>,
    status: Status,
    status_tx: watch::Sender<Status>,
    message_tx: mpsc::UnboundedSender<String>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let deadline = self.drain().await;
            self.publish();
            let sleep = deadline
                .saturating_duration_since(Instant::now())
                .min(MAX_SLEEP);

            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle_command(command).await,
                    // The `Peer` was dropped.
                    None => break,
                },
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, source)) => self.handle_datagram(source, &buf[..n]),
                    Err(e) => {
                        // E.g. ICMP port unreachable reported on a later recv: not fatal.
                        tracing::debug!(target: LOG, "recv_from failed: {e}");
                        // Never spin on a socket that keeps failing.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                },
                _ = tokio::time::sleep(sleep) => {
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(Instant::now())) {
                        tracing::warn!(target: LOG, "handle_input(timeout): {e}");
                    }
                }
            }
        }
        tracing::debug!(target: LOG, "peer task stopped");
    }

    fn handle_datagram(&mut self, source: SocketAddr, data: &[u8]) {
        if source.ip() != LOOPBACK {
            tracing::warn!(target: LOG, %source, "ignoring a non-loopback datagram");
            return;
        }
        let receive = match Receive::new(Protocol::Udp, source, self.addr, data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(target: LOG, %source, "unparsable datagram: {e}");
                return;
            }
        };
        if let Err(e) = self
            .rtc
            .handle_input(Input::Receive(Instant::now(), receive))
        {
            tracing::warn!(target: LOG, %source, "handle_input(receive): {e}");
        }
    }

    /// Polls str0m until it asks for a timeout; sends transmits, handles events.
    async fn drain(&mut self) -> Instant {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return t,
                Ok(Output::Transmit(t)) => {
                    if t.destination.ip() != LOOPBACK {
                        let destination = t.destination;
                        tracing::warn!(target: LOG, %destination, "refusing a non-loopback send");
                        continue;
                    }
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                        tracing::debug!(target: LOG, "send_to {}: {e}", t.destination);
                    }
                }
                Ok(Output::Event(event)) => self.handle_event(event),
                Err(e) => {
                    tracing::warn!(target: LOG, "poll_output: {e}");
                    return Instant::now() + Duration::from_millis(20);
                }
            }
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(target: LOG, ?state, "ICE state");
                self.status.ice_state = Some(state);
            }
            Event::Connected => {
                tracing::debug!(target: LOG, "connected");
            }
            Event::ChannelOpen(id, label) => {
                tracing::debug!(target: LOG, %label, "channel open");
                if self.channel.is_none() || label == CHANNEL_LABEL {
                    self.channel = Some(id);
                    self.status.channel_open = true;
                }
            }
            Event::ChannelClose(id) if self.channel == Some(id) => {
                tracing::debug!(target: LOG, "channel closed");
                self.channel = None;
                self.status.channel_open = false;
            }
            Event::ChannelData(data) => {
                let text = String::from_utf8_lossy(&data.data).into_owned();
                // The receiver is gone only when the `Peer` is being dropped.
                let _ = self.message_tx.send(text);
            }
            _ => {}
        }
    }

    fn publish(&mut self) {
        let connected = self.rtc.is_connected();
        if connected && !self.status.connected {
            self.status.connect_count += 1;
        }
        self.status.connected = connected;
        let status = self.status.clone();
        self.status_tx.send_if_modified(|s| {
            let changed = s.connected != status.connected
                || s.connect_count != status.connect_count
                || s.channel_open != status.channel_open
                || s.ice_state != status.ice_state
                || s.ignored_candidates != status.ignored_candidates;
            *s = status;
            changed
        });
    }

    async fn handle_command(&mut self, command: Command) {
        // Each command is one mutation of the `Rtc`: drain right after it, publish the new
        // status, and only then reply, so a caller sees the effects once its call returns.
        macro_rules! reply {
            ($reply:expr, $value:expr) => {{
                let value = $value;
                self.drain().await;
                self.publish();
                let _ = $reply.send(value);
            }};
        }
        match command {
            Command::CreateOffer(r) => reply!(r, self.create_offer(false)),
            Command::IceRestartOffer(r) => reply!(r, self.create_offer(true)),
            Command::AcceptOffer(sdp, r) => reply!(r, self.accept_offer(&sdp)),
            Command::AcceptAnswer(sdp, r) => reply!(r, self.accept_answer(&sdp)),
            Command::LocalCandidate(r) => {
                let mut candidate = self.local_candidate.clone();
                if let Some(ufrag) = &self.sdp_ufrag {
                    candidate.set_ufrag(ufrag);
                }
                let _ = r.send(Ok(candidate.to_sdp_string()));
            }
            Command::AddRemoteCandidate(s, r) => reply!(r, self.add_remote_candidate(&s)),
            Command::Send(text, r) => reply!(r, self.send(&text)),
        }
    }

    fn create_offer(&mut self, ice_restart: bool) -> anyhow::Result<String> {
        let mut change = self.rtc.sdp_api();
        if ice_restart {
            change.ice_restart(true);
        } else if !self.offered_channel && self.channel.is_none() {
            change.add_channel(CHANNEL_LABEL.to_owned());
        }
        let Some((offer, pending)) = change.apply() else {
            bail!("nothing to negotiate (the data channel exists; use ice_restart_offer)");
        };
        if !ice_restart {
            self.offered_channel = true;
        }
        self.pending = Some(pending);
        Ok(self.outgoing_sdp(offer.to_sdp_string()))
    }

    fn accept_offer(&mut self, sdp: &str) -> anyhow::Result<String> {
        let sdp = self.incoming_sdp(sdp);
        let offer = SdpOffer::from_sdp_string(&sdp).context("parsing the remote offer")?;
        // str0m invalidates any pending offer of ours.
        self.pending = None;
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .context("accepting the remote offer")?;
        Ok(self.outgoing_sdp(answer.to_sdp_string()))
    }

    fn accept_answer(&mut self, sdp: &str) -> anyhow::Result<()> {
        let sdp = self.incoming_sdp(sdp);
        let answer = SdpAnswer::from_sdp_string(&sdp).context("parsing the remote answer")?;
        let pending = self.pending.take().context("no offer of ours is pending")?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .context("accepting the remote answer")?;
        Ok(())
    }

    fn add_remote_candidate(&mut self, s: &str) -> anyhow::Result<bool> {
        let s = s.trim();
        let s = s.strip_prefix("a=").unwrap_or(s);
        if s.is_empty() {
            return Ok(false);
        }
        let candidate = match Candidate::from_sdp_string(s) {
            Ok(c) => c,
            Err(e) => {
                self.status.ignored_candidates += 1;
                return Err(anyhow!("bad remote candidate {s:?}: {e}"));
            }
        };
        if !is_allowed(&candidate) {
            tracing::debug!(target: LOG, %candidate, "ignoring a non-loopback candidate");
            self.status.ignored_candidates += 1;
            return Ok(false);
        }
        self.rtc.add_remote_candidate(candidate);
        Ok(true)
    }

    fn send(&mut self, text: &str) -> anyhow::Result<()> {
        let id = self.channel.context("the data channel is not open")?;
        let mut channel = self.rtc.channel(id).context("the data channel is gone")?;
        let accepted = channel
            .write(false, text.as_bytes())
            .context("writing to the data channel")?;
        if !accepted {
            bail!("the data channel's buffer is full");
        }
        Ok(())
    }

    /// Remembers our ufrag and, in trickle-only mode, strips our candidates.
    fn outgoing_sdp(&mut self, sdp: String) -> String {
        if let Some(ufrag) = sdp
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        {
            self.sdp_ufrag = Some(ufrag.to_owned());
        }
        if self.config.sdp_candidates {
            return sdp;
        }
        sdp.split_inclusive('\n')
            .filter(|line| {
                let line = line.trim_end();
                !line.starts_with("a=candidate:") && line != "a=end-of-candidates"
            })
            .collect()
    }

    /// Drops remote `a=candidate` lines that are not `127.0.0.1`/UDP (or do not parse).
    fn incoming_sdp(&mut self, sdp: &str) -> String {
        let mut out = String::with_capacity(sdp.len());
        for line in sdp.split_inclusive('\n') {
            if let Some(attr) = line.trim().strip_prefix("a=")
                && attr.starts_with("candidate:")
            {
                match Candidate::from_sdp_string(attr) {
                    Ok(c) if is_allowed(&c) => {}
                    Ok(c) => {
                        tracing::debug!(target: LOG, candidate = %c, "dropping from remote SDP");
                        self.status.ignored_candidates += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(target: LOG, "dropping from remote SDP: {e}");
                        self.status.ignored_candidates += 1;
                        continue;
                    }
                }
            }
            out.push_str(line);
        }
        out
    }
}

fn is_allowed(candidate: &Candidate) -> bool {
    candidate.addr().ip() == LOOPBACK && candidate.proto() == Protocol::Udp
}
