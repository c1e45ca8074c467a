//! A connection's bounded queue of outgoing frames.
//!
//! Every connection has one from the moment it authenticates, and most of them sit empty: an
//! idle WebSocket is the common case. `tokio::sync::mpsc::channel` allocates its first block of
//! slots up front, so it would cost every idle connection about 1.5 KB. This queue holds no
//! buffer while empty (the deque gives its memory back once drained), so an idle queue costs only
//! its header.
//!
//! One reader (the connection's task), any number of writers (hubs, the user registry, call
//! signaling). Writers `try_send` and never wait: a full queue is the writer's signal that the
//! reader is too slow. (Acknowledgements do not come through here: the session machine queues
//! them, in send order, with its own bound.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
pub(crate) use tokio::sync::mpsc::error::TrySendError;

struct State {
    frames: VecDeque<Utf8Bytes>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    /// Woken when a frame is added or the queue closes (one waiter: the reader).
    readable: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writing end; cheap to clone.
#[derive(Clone)]
pub(crate) struct FrameSender(Arc<Shared>);

/// The reading end, owned by the connection's task. Dropping it closes the queue.
pub(crate) struct FrameReceiver(Arc<Shared>);

/// A queue holding at most `capacity` frames (at least one).
pub(crate) fn frame_queue(capacity: usize) -> (FrameSender, FrameReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            closed: false,
        }),
        capacity: capacity.max(1),
        readable: Notify::new(),
    });
    (FrameSender(shared.clone()), FrameReceiver(shared))
}

impl FrameSender {
    /// Adds a frame if there is room, without waiting.
    pub fn try_send(&self, frame: Utf8Bytes) -> Result<(), TrySendError<Utf8Bytes>> {
        let mut state = self.0.lock();
        if state.closed {
            return Err(TrySendError::Closed(frame));
        }
        if state.frames.len() >= self.0.capacity {
            return Err(TrySendError::Full(frame));
        }
        state.frames.push_back(frame);
        drop(state);
        self.0.readable.notify_one();
        Ok(())
    }
}

impl FrameReceiver {
    /// The next frame, waiting for one; `None` once closed and drained.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let shared = self.0.clone();
        loop {
            let ready = shared.readable.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            if shared.lock().closed {
                return None;
            }
            ready.await;
        }
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.0.lock().frames.len()
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let mut state = self.0.lock();
        let frame = state.frames.pop_front()?;
        if state.frames.is_empty() {
            // Give the buffer back: an idle connection holds none.
            state.frames = VecDeque::new();
        }
        Some(frame)
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.closed = true;
        state.frames = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn f(s: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(s)
    }

    #[tokio::test]
    async fn bounded_fifo_with_full_and_closed() {
        let (tx, mut rx) = frame_queue(2);
        tx.try_send(f("a")).unwrap();
        tx.try_send(f("b")).unwrap();
        assert!(matches!(tx.try_send(f("c")), Err(TrySendError::Full(_))));
        assert_eq!(rx.recv().await.unwrap().as_str(), "a");
        tx.try_send(f("c")).unwrap();
        assert_eq!(rx.recv().await.unwrap().as_str(), "b");
        assert_eq!(rx.recv().await.unwrap().as_str(), "c");
        assert!(rx.try_recv().is_none());
        drop(rx);
        assert!(matches!(tx.try_send(f("d")), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn reader_wakes_for_a_frame_sent_later() {
        let (tx, mut rx) = frame_queue(4);
        let reader = tokio::spawn(async move { rx.recv().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.try_send(f("x")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("reader woke")
            .unwrap();
        assert_eq!(got.unwrap().as_str(), "x");
    }
}
