//! One WebSocket connection: a reader that takes a frame only while fewer than
//! `max_unacked_frames` are being processed, a task per frame that ingests it and
//! queues its answer, and one writer task that sends the answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Interval;

use super::{answer_frame, hello, json_message, ConnectionGuard, Ending};
use crate::config::WebSocketConfig;
use crate::intake::browser::Client;
use crate::intake::IntakeState;
use crate::telemetry::metric;

/// While shutting down, a connection quiet for this long is closed.
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// How long a Close frame waits for the client's answering Close.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);

/// Serves the connection until it ends, then unregisters it (through `guard`).
pub(super) async fn serve_connection(
    app: Arc<IntakeState>,
    socket: WebSocket,
    source: Option<Arc<str>>,
    client: Arc<Client>,
    guard: ConnectionGuard,
) {
    let settings = app.websocket.clone();
    let hello_deadline = source
        .is_none()
        .then(|| tokio::time::Instant::now() + Duration::from_millis(settings.hello_timeout_ms));
    let (outgoing, incoming) = socket.split();
    // Answers go through one writer task; a client that stops reading them fills
    // this channel, which holds up frame tasks, which holds up reading.
    let (answers, to_write) = mpsc::channel::<Message>(settings.max_unacked_frames + 4);
    let stalled = Arc::new(Notify::new());
    let write_timeout = Duration::from_millis(settings.write_timeout_ms);
    let writer = tokio::spawn(write_answers(outgoing, to_write, write_timeout, stalled.clone()));
    let mut ping = tokio::time::interval(Duration::from_millis(settings.ping_interval_ms));
    ping.tick().await;
    let mut connection = Connection {
        in_flight: Arc::new(Semaphore::new(settings.max_unacked_frames)),
        shutdown: app.websockets.shutdown.subscribe(),
        min_gap: (settings.max_frames_per_second > 0)
            .then(|| Duration::from_secs_f64(1.0 / settings.max_frames_per_second as f64)),
        last_frame: Instant::now() - Duration::from_secs(1),
        last_heard: Instant::now(),
        app,
        settings,
        incoming,
        answers,
        stalled,
        ping,
        hello_deadline,
        source,
        client,
    };
    let ending = connection.run().await;
    connection.close(ending, writer).await;
    metrics::counter!(metric::WS_CLOSED, "reason" => ending.label()).increment(1);
    drop(guard);
}

/// The reading side of one connection and what it needs to decide what comes next.
struct Connection {
    /// Write keys and the pipeline, shared with every other handler.
    app: Arc<IntakeState>,
    settings: WebSocketConfig,
    /// Frames from the client.
    incoming: SplitStream<WebSocket>,
    /// Answers to the writer task (bounded: see `serve_connection`).
    answers: mpsc::Sender<Message>,
    /// Woken when the writer could not send within `write_timeout_ms`.
    stalled: Arc<Notify>,
    /// One permit per frame being processed: no permit, no read.
    in_flight: Arc<Semaphore>,
    /// Turns true when the server begins shutting down.
    shutdown: watch::Receiver<bool>,
    /// Pings the client; an idle check rides on each tick.
    ping: Interval,
    /// When the client last sent anything (frames, pings, pongs).
    last_heard: Instant,
    /// Least time between two frames (`max_frames_per_second`), when limited.
    min_gap: Option<Duration>,
    last_frame: Instant,
    /// The authenticated source: from the upgrade, or from the `hello` frame.
    source: Option<Arc<str>>,
    /// The client as the upgrade showed it (its IP and User-Agent for `context`).
    client: Arc<Client>,
    /// Until a `hello` arrives (none when authenticated at the upgrade): when the
    /// connection is closed for want of one.
    hello_deadline: Option<tokio::time::Instant>,
}

/// What the reader does after one wait.
enum Next {
    Frame(Utf8Bytes),
    Continue,
    End(Ending),
}

impl Connection {
    /// Reads and answers frames until the connection ends, and says why.
    async fn run(&mut self) -> Ending {
        loop {
            // Flow control: no permit, no read.
            let permit = tokio::select! {
                permit = self.in_flight.clone().acquire_owned() => permit.expect("semaphore never closed"),
                () = self.stalled.notified() => return Ending::WriteStalled,
            };
            let text = match self.next_frame().await {
                Next::Frame(text) => text,
                Next::Continue => continue,
                Next::End(ending) => return ending,
            };
            self.last_heard = Instant::now();
            self.keep_frame_rate().await;
            match self.source.clone() {
                Some(source) => self.answer_in_background(text, source, permit),
                None => {
                    if let Err(ending) = self.authenticate(&text).await {
                        return ending;
                    }
                }
            }
        }
    }

    /// Waits for the next frame, pinging meanwhile. Shutting down: frames the client
    /// already sent are still read and answered until the line has been quiet for a
    /// moment; then the connection closes.
    async fn next_frame(&mut self) -> Next {
        let frame = if *self.shutdown.borrow() {
            match tokio::time::timeout(DRAIN_QUIET, self.incoming.next()).await {
                Ok(frame) => frame,
                Err(_) => return Next::End(Ending::ShuttingDown),
            }
        } else {
            let no_hello = async {
                match self.hello_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = self.incoming.next() => frame,
                () = no_hello => return Next::End(Ending::NoHello),
                _ = self.ping.tick() => return self.ping_or_idle(),
                _ = self.shutdown.changed() => return Next::Continue,
                () = self.stalled.notified() => return Next::End(Ending::WriteStalled),
            }
        };
        match frame {
            None => Next::End(Ending::ClientGone),
            Some(Err(error)) => {
                let text = error.to_string().to_ascii_lowercase();
                let too_big = text.contains("too long") || text.contains("size");
                Next::End(if too_big { Ending::TooBig } else { Ending::ClientGone })
            }
            Some(Ok(Message::Text(text))) => Next::Frame(text),
            Some(Ok(Message::Binary(_))) => Next::End(Ending::Binary),
            Some(Ok(Message::Close(_))) => Next::End(Ending::ClientClosed),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                self.last_heard = Instant::now();
                Next::Continue
            }
        }
    }

    fn ping_or_idle(&self) -> Next {
        if self.last_heard.elapsed() > Duration::from_millis(self.settings.idle_timeout_ms) {
            return Next::End(Ending::Idle);
        }
        let _ = self.answers.try_send(Message::Ping(Default::default()));
        Next::Continue
    }

    /// Holds a frame back until `min_gap` has passed since the previous one.
    async fn keep_frame_rate(&mut self) {
        if let Some(gap) = self.min_gap {
            let since = self.last_frame.elapsed();
            if since < gap {
                tokio::time::sleep(gap - since).await;
            }
            self.last_frame = Instant::now();
        }
    }

    /// Before anything else, an unauthenticated connection must send
    /// `{"type":"hello","writeKey":"…"}`; it is answered `ready`.
    async fn authenticate(&mut self, text: &str) -> Result<(), Ending> {
        let found = hello(&self.app, text).map_err(|_| Ending::Unauthorized)?;
        let _ = self
            .answers
            .send(json_message(&json!({ "type": "ready", "source": &*found })))
            .await;
        self.source = Some(found);
        self.hello_deadline = None;
        Ok(())
    }

    /// Ingests the frame on a task of its own; the permit is held until its answer
    /// is queued.
    fn answer_in_background(&self, text: Utf8Bytes, source: Arc<str>, permit: OwnedSemaphorePermit) {
        let app = self.app.clone();
        let answers = self.answers.clone();
        let client = self.client.clone();
        tokio::spawn(async move {
            let read_at = Instant::now();
            let answer = answer_frame(&app, text.as_str(), source, &client).await;
            let _ = answers.send(answer).await;
            metrics::histogram!(metric::WS_ACK_DURATION).record(read_at.elapsed().as_secs_f64());
            drop(permit);
        });
    }

    /// Answers every frame already read (bounded by the write timeout), sends the
    /// Close frame if the client is still there, and waits for its answering Close.
    async fn close(mut self, ending: Ending, writer: tokio::task::JoinHandle<()>) {
        let write_timeout = Duration::from_millis(self.settings.write_timeout_ms);
        let _ = tokio::time::timeout(
            write_timeout,
            self.in_flight.acquire_many(self.settings.max_unacked_frames as u32),
        )
        .await;
        let close = ending.close_frame();
        let sent_close = close.is_some();
        if let Some(close) = close {
            let _ = self.answers.send(Message::Close(Some(close))).await;
        }
        drop(self.answers);
        let _ = tokio::time::timeout(write_timeout, writer).await;
        if sent_close {
            // Closing handshake: give the client a moment to answer our Close before
            // the TCP connection goes, so it reads the close code rather than a reset.
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
                while let Some(Ok(message)) = self.incoming.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// The writer task: sends answers in order; a send that takes longer than
/// `write_timeout` wakes `stalled` and ends the connection.
async fn write_answers(
    mut outgoing: SplitSink<WebSocket, Message>,
    mut to_write: mpsc::Receiver<Message>,
    write_timeout: Duration,
    stalled: Arc<Notify>,
) {
    while let Some(message) = to_write.recv().await {
        let closing = matches!(message, Message::Close(_));
        match tokio::time::timeout(write_timeout, outgoing.send(message)).await {
            Ok(Ok(())) if !closing => {}
            Ok(Ok(())) => break,
            Ok(Err(_)) => break,
            Err(_) => {
                stalled.notify_one();
                break;
            }
        }
    }
    let _ = outgoing.close().await;
}
