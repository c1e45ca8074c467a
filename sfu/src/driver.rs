//! The thin tokio driver: one task owns the [`Sfu`] and ONE UDP socket for every participant of
//! every room, and runs the sans-IO loop (input → drain `poll_output` → wait for a datagram, a
//! command or the next timeout). The call layer talks to it through a cloneable [`SfuHandle`]
//! and reads [`SfuEvent`]s from [`SfuServer::events`].

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::core::{
    ParticipantId, RoomKey, Sfu, SfuConfig, SfuError, SfuEvent, SfuOutput, SfuStats, TrackId,
    TrackKind, VideoPrefs,
};

const LOG: &str = "parley_sfu";
/// Datagrams read per wake-up before the outputs are drained.
const RECV_BATCH: usize = 64;

/// Where the driver listens and what it announces.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// The UDP socket's address (e.g. `0.0.0.0:3479`, or `127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// Addresses put in answers as host candidates. Empty: the socket's own address (which
    /// must then not be a wildcard). A port of 0 means the socket's port (useful when the
    /// listen port is 0, or when only the IP differs behind a NAT that keeps ports).
    pub announce: Vec<SocketAddr>,
}

/// A running SFU: the driver task, a handle, and the event stream.
pub struct SfuServer {
    handle: SfuHandle,
    events: Option<mpsc::UnboundedReceiver<SfuEvent>>,
    task: JoinHandle<()>,
}

impl Drop for SfuServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SfuServer {
    /// Binds the socket and starts the driver task (call inside a tokio runtime).
    /// `config.candidates` is replaced by the resolved `listen.announce`.
    pub async fn start(listen: ListenConfig, mut config: SfuConfig) -> io::Result<SfuServer> {
        let socket = UdpSocket::bind(listen.listen).await?;
        let local = socket.local_addr()?;
        let announce: Vec<SocketAddr> = if listen.announce.is_empty() {
            if local.ip().is_unspecified() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "listening on a wildcard address needs at least one announced address",
                ));
            }
            vec![local]
        } else {
            listen
                .announce
                .iter()
                .map(|a| {
                    if a.port() == 0 {
                        SocketAddr::new(a.ip(), local.port())
                    } else {
                        *a
                    }
                })
                .collect()
        };
        config.candidates = announce.clone();
        let sfu = Sfu::new(config, Instant::now());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(sfu, socket, command_rx, event_tx));
        Ok(SfuServer {
            handle: SfuHandle {
                commands,
                local,
                announce,
            },
            events: Some(events),
            task,
        })
    }

    pub fn handle(&self) -> SfuHandle {
        self.handle.clone()
    }

    /// The event stream (once; `None` after it was taken).
    pub fn events(&mut self) -> Option<mpsc::UnboundedReceiver<SfuEvent>> {
        self.events.take()
    }
}

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

enum Command {
    Join {
        tenant: String,
        call: String,
        participant: String,
        credential: String,
        reply: Reply<ParticipantId>,
    },
    Offer(ParticipantId, String, Reply<String>),
    Candidate(ParticipantId, String, Reply<()>),
    Leave(ParticipantId, Reply<()>),
    Subscribe(ParticipantId, TrackId, VideoPrefs, Reply<()>),
    Unsubscribe(ParticipantId, TrackId, Reply<()>),
    SetVideo(ParticipantId, TrackId, VideoPrefs, Reply<()>),
    RoomTracks(RoomKey, Reply<Vec<(TrackId, ParticipantId, TrackKind)>>),
    Stats(Reply<SfuStats>),
}

/// Cloneable access to a running SFU; every method is one round trip to the driver task.
#[derive(Clone)]
pub struct SfuHandle {
    commands: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    announce: Vec<SocketAddr>,
}

impl SfuHandle {
    /// The socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The host candidates put in answers.
    pub fn announced(&self) -> &[SocketAddr] {
        &self.announce
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SfuError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| SfuError::Stopped)?;
        rx.await.map_err(|_| SfuError::Stopped)?
    }

    /// See [`Sfu::join`]; the driver supplies the clocks.
    pub async fn join(
        &self,
        tenant: &str,
        call: &str,
        participant: &str,
        credential: &str,
    ) -> Result<ParticipantId, SfuError> {
        self.call(|reply| Command::Join {
            tenant: tenant.to_owned(),
            call: call.to_owned(),
            participant: participant.to_owned(),
            credential: credential.to_owned(),
            reply,
        })
        .await
    }

    /// See [`Sfu::apply_offer`].
    pub async fn apply_offer(&self, p: ParticipantId, sdp: &str) -> Result<String, SfuError> {
        self.call(|r| Command::Offer(p, sdp.to_owned(), r)).await
    }

    /// See [`Sfu::add_remote_candidate`].
    pub async fn add_remote_candidate(&self, p: ParticipantId, c: &str) -> Result<(), SfuError> {
        self.call(|r| Command::Candidate(p, c.to_owned(), r)).await
    }

    /// See [`Sfu::leave`].
    pub async fn leave(&self, p: ParticipantId) -> Result<(), SfuError> {
        self.call(|r| Command::Leave(p, r)).await
    }

    /// See [`Sfu::subscribe`].
    pub async fn subscribe(
        &self,
        p: ParticipantId,
        track: TrackId,
        prefs: VideoPrefs,
    ) -> Result<(), SfuError> {
        self.call(|r| Command::Subscribe(p, track, prefs, r)).await
    }

    /// See [`Sfu::unsubscribe`].
    pub async fn unsubscribe(&self, p: ParticipantId, track: TrackId) -> Result<(), SfuError> {
        self.call(|r| Command::Unsubscribe(p, track, r)).await
    }

    /// See [`Sfu::set_video`].
    pub async fn set_video(
        &self,
        p: ParticipantId,
        track: TrackId,
        prefs: VideoPrefs,
    ) -> Result<(), SfuError> {
        self.call(|r| Command::SetVideo(p, track, prefs, r)).await
    }

    /// See [`Sfu::room_tracks`].
    pub async fn room_tracks(
        &self,
        room: RoomKey,
    ) -> Result<Vec<(TrackId, ParticipantId, TrackKind)>, SfuError> {
        self.call(|r| Command::RoomTracks(room, r)).await
    }

    pub async fn stats(&self) -> Result<SfuStats, SfuError> {
        self.call(Command::Stats).await
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(
    mut sfu: Sfu,
    socket: UdpSocket,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<SfuEvent>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match sfu.poll_output() {
                SfuOutput::Transmit(d) => {
                    if let Err(e) = socket.send_to(&d.contents, d.destination).await {
                        tracing::debug!(target: LOG, destination = %d.destination, "send_to: {e}");
                    }
                }
                SfuOutput::Event(e) => {
                    // Nobody listening is fine (the events are advisory to the call layer).
                    let _ = events.send(e);
                }
                SfuOutput::Timeout(t) => break t,
            }
        };
        let now = Instant::now();
        if timeout <= now {
            sfu.handle_timeout(now);
            continue;
        }
        tokio::select! {
            biased;
            received = socket.recv_from(&mut buf) => {
                match received {
                    Ok((n, source)) => {
                        sfu.handle_datagram(Instant::now(), source, &buf[..n]);
                        for _ in 1..RECV_BATCH {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, source)) => {
                                    sfu.handle_datagram(Instant::now(), source, &buf[..n]);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        // E.g. an ICMP port unreachable surfacing on recv: not fatal.
                        tracing::debug!(target: LOG, "recv_from: {e}");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            command = commands.recv() => {
                let Some(command) = command else {
                    // Every handle is gone.
                    break;
                };
                handle_command(&mut sfu, command);
            }
            _ = tokio::time::sleep_until(timeout.into()) => {
                sfu.handle_timeout(Instant::now());
            }
        }
    }
}

fn handle_command(sfu: &mut Sfu, command: Command) {
    let now = Instant::now();
    match command {
        Command::Join {
            tenant,
            call,
            participant,
            credential,
            reply,
        } => {
            let _ =
                reply.send(sfu.join(now, unix_now(), &tenant, &call, &participant, &credential));
        }
        Command::Offer(p, sdp, r) => {
            let _ = r.send(sfu.apply_offer(now, p, &sdp));
        }
        Command::Candidate(p, c, r) => {
            let _ = r.send(sfu.add_remote_candidate(p, &c));
        }
        Command::Leave(p, r) => {
            let _ = r.send(sfu.leave(now, p));
        }
        Command::Subscribe(p, t, prefs, r) => {
            let _ = r.send(sfu.subscribe(now, p, t, prefs));
        }
        Command::Unsubscribe(p, t, r) => {
            let _ = r.send(sfu.unsubscribe(now, p, t));
        }
        Command::SetVideo(p, t, prefs, r) => {
            let _ = r.send(sfu.set_video(now, p, t, prefs));
        }
        Command::RoomTracks(room, r) => {
            let _ = r.send(Ok(sfu.room_tracks(&room)));
        }
        Command::Stats(r) => {
            let _ = r.send(Ok(sfu.stats()));
        }
    }
}
