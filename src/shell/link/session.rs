//! One device's session on its control stream: the `Hello` checked, the
//! device attached to the queue, then its frames read (rate-limited) and
//! answered, its deliveries written in batches, its acks taken, until it
//! leaves, is replaced or revoked, or breaks the protocol.

use super::*;

/// An ack on its way to the disk: resolves once its group commit is done.
type AckWait = std::pin::Pin<
    Box<dyn std::future::Future<Output = (CommandId, Result<(), QueueError>)> + Send>,
>;

/// Deliveries written to a device in one go at most, and the bytes after
/// which a batch goes out whatever its count (big payloads must not make
/// a small box buffer the whole window at once). A batch never waits for
/// more to arrive.
const MAX_DELIVERY_BATCH: usize = 256;
const MAX_DELIVERY_BATCH_BYTES: usize = 256 * 1024;

/// Wait, in the session loop, for the group commit that records `id`.
fn await_ack(
    acks: &mut FuturesUnordered<AckWait>,
    id: CommandId,
    done: impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static,
) {
    acks.push(Box::pin(async move { (id, done.await) }));
}

/// End a command that can never be delivered on this link with the reason,
/// rather than hold it in flight or retry it forever.
fn reject(
    session: &crate::shell::queue::DeviceSession,
    acks: &mut FuturesUnordered<AckWait>,
    id: CommandId,
    reason: String,
) {
    await_ack(acks, id, session.ack(id, Outcome::Rejected { reason }));
}

/// A command too big for the link.
fn reject_oversized(
    frame: &BoxFrame,
    len: u64,
    max: usize,
    session: &crate::shell::queue::DeviceSession,
    acks: &mut FuturesUnordered<AckWait>,
) {
    let id = match frame {
        BoxFrame::Command { id, .. } => *id,
        BoxFrame::Forward(f) => f.id,
        _ => return,
    };
    tracing::warn!(%id, len, max, "command payload over the frame limit; rejecting it");
    let reason =
        format!("payload of {len} bytes is over the device link's frame limit of {max} bytes");
    reject(session, acks, id, reason);
}

/// Why a session ended early: the code and text to send before closing.
struct Fatal {
    code: ErrorCode,
    message: String,
    close: u32,
}

impl Fatal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let close = match code {
            ErrorCode::Revoked => close_code::REVOKED,
            ErrorCode::Replaced => close_code::REPLACED,
            ErrorCode::ShuttingDown => close_code::SHUTDOWN,
            _ => close_code::PROTOCOL,
        };
        Fatal {
            code,
            message: message.into(),
            close,
        }
    }
}

/// The end of a session: fatal (tell the device), or the connection is
/// already gone.
enum End {
    Fatal(Fatal),
    Gone(String),
}

impl From<Fatal> for End {
    fn from(f: Fatal) -> Self {
        End::Fatal(f)
    }
}

/// Aborts its task when dropped (the fetch acceptor ends with its session).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) struct Session {
    conn: quinn::Connection,
    device: DeviceId,
    /// Fingerprint of the certificate this connection was made with.
    cert: [u8; 32],
    shared: Arc<Shared>,
    seq: u64,
    send: quinn::SendStream,
    /// The minor protocol version the device announced.
    minor: u16,
    /// Artifacts named by commands delivered on this connection: the only
    /// ones its fetch streams may read.
    artifacts: Arc<Mutex<std::collections::HashSet<[u8; 32]>>>,
    /// Delivered commands that name an artifact, and its label once
    /// known: the ones whose `Progress` the box keeps (until the ack).
    fetching: Mutex<HashMap<CommandId, Fetching>>,
}

/// The artifact a delivered command names, and its `name@version` once
/// looked up.
type Fetching = ([u8; 32], Option<String>);

impl Session {
    pub(super) async fn run(
        conn: quinn::Connection,
        device: DeviceId,
        cert: [u8; 32],
        shared: Arc<Shared>,
    ) {
        let opts = &shared.opts;
        let (send, recv) = match timeout(opts.hello_timeout, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "device left before opening its control stream");
                return;
            }
            Err(_) => {
                tracing::info!("device opened no control stream in time; closing");
                conn.close(
                    VarInt::from_u32(close_code::PROTOCOL),
                    b"no control stream opened",
                );
                return;
            }
        };
        let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut s = Session {
            conn,
            device,
            cert,
            shared: shared.clone(),
            seq,
            send,
            minor: 0,
            artifacts: Arc::default(),
            fetching: Mutex::default(),
        };
        let end = s.handshake_and_serve(proto::frame_reader(recv)).await;
        s.unregister();
        for id in s.fetching.lock().unwrap().keys() {
            s.shared.queue.progress().clear(*id);
        }
        match end {
            End::Fatal(f) => s.fail(f).await,
            End::Gone(why) => tracing::info!(reason = %why, "device disconnected"),
        }
    }

    async fn handshake_and_serve(
        &mut self,
        mut recv: proto::FrameReader<quinn::RecvStream>,
    ) -> End {
        let opts = &self.shared.opts;
        let hello = timeout(
            opts.hello_timeout,
            proto::read_frame::<DeviceFrame, _>(&mut recv, opts.max_frame),
        )
        .await;
        let (version, agent, caps) = match hello {
            Ok(Ok(Some(DeviceFrame::Hello {
                version,
                agent,
                caps,
            }))) => (version, agent, caps),
            Ok(Ok(Some(other))) => {
                return Fatal::new(
                    ErrorCode::ProtocolViolation,
                    format!("the first frame must be Hello, not {}", other.name()),
                )
                .into()
            }
            Ok(Ok(None)) => return End::Gone("closed its stream before Hello".into()),
            Ok(Err(e)) => return frame_error(e),
            Err(_) => {
                return Fatal::new(
                    ErrorCode::ProtocolViolation,
                    format!("no Hello within {:?}", opts.hello_timeout),
                )
                .into()
            }
        };
        if let Err(msg) = proto::check_version(version) {
            return Fatal::new(ErrorCode::UnsupportedVersion, msg).into();
        }
        self.minor = version.minor;
        // An empty list offers all the device is enrolled with.
        let offered = (!caps.is_empty()).then_some(caps);
        if let Err(f) = self.register() {
            return f.into();
        }
        let mut session = match self
            .shared
            .queue
            .connect_offering(self.device.clone(), opts.window, offered)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let code = match e {
                    QueueError::Revoked(_) => ErrorCode::Revoked,
                    QueueError::UnknownDevice(_) => ErrorCode::NotEnrolled,
                    QueueError::ShuttingDown => ErrorCode::ShuttingDown,
                    _ => ErrorCode::Internal,
                };
                return Fatal::new(code, e.to_string()).into();
            }
        };
        let welcome = BoxFrame::Welcome {
            version: VERSION,
            device_id: self.device.clone(),
            window: opts.window,
        };
        if let Err(e) = self.write(&welcome).await {
            return End::Gone(e.to_string());
        }
        tracing::info!(%agent, %version, "device connected");
        let _fetch = (self.minor >= proto::MINOR_ARTIFACT).then(|| {
            AbortOnDrop(tokio::spawn(fetch::accept(
                self.conn.clone(),
                self.shared.clone(),
                self.artifacts.clone(),
            )))
        });

        // Deliveries are received (&mut) while acks are issued (&self) in
        // the same loop: take the receiver out of the session.
        let (_, placeholder) = mpsc::unbounded_channel();
        let mut rx = std::mem::replace(&mut session.rx, placeholder);
        let end = self.serve(recv, &mut rx, &session).await;
        drop(rx);
        end
    }

    async fn serve(
        &mut self,
        mut stream: proto::FrameReader<quinn::RecvStream>,
        rx: &mut mpsc::UnboundedReceiver<Delivery>,
        session: &crate::shell::queue::DeviceSession,
    ) -> End {
        let shared = self.shared.clone();
        let opts = &shared.opts;
        // Reading is not cancel-safe inside select!, so a small task reads
        // and hands over whole frames through a bounded channel. Boxed: the
        // channel allocates 32 slots up front, for every connected device,
        // and a frame inline made that 5 KiB each (issue 29).
        let (ftx, mut frx) = mpsc::channel::<Box<Result<DeviceFrame, FrameError>>>(16);
        let max = opts.max_frame;
        let reader = tokio::spawn(async move {
            loop {
                let r = proto::read_frame::<DeviceFrame, _>(&mut stream, max).await;
                let stop = !matches!(r, Ok(Some(_)));
                let item = match r {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                if ftx.send(Box::new(item)).await.is_err() || stop {
                    break;
                }
            }
        });
        // Acks wait for their group commit here, polled by this loop: no
        // task per ack.
        let mut acks: FuturesUnordered<AckWait> = FuturesUnordered::new();
        // Acks beyond the window can only be duplicates or bogus: cap them so
        // a device cannot pile up work in the queue.
        let ack_limit = opts.window as usize + 16;
        // The bucket is handed the time since the session began (it reads
        // no clock).
        let began = Instant::now();
        let mut bucket = crate::engine::rate::Bucket::new(opts.frame_rate, opts.frame_burst);
        let mut bad_acks = 0u32;
        // Answers to Send and Query, in the order they were asked.
        let mut answers: VecDeque<JoinHandle<BoxFrame>> = VecDeque::new();
        let end = loop {
            tokio::select! {
                answer = async { answers.front_mut().expect("checked").await }, if !answers.is_empty() => {
                    answers.pop_front();
                    let frame = answer.unwrap_or_else(|e| BoxFrame::Refused {
                        code: ErrorCode::Internal,
                        message: format!("the box failed to answer: {e}"),
                    });
                    if let Err(e) = self.write(&frame).await {
                        break End::Gone(e.to_string());
                    }
                }
                Some((id, res)) = acks.next(), if !acks.is_empty() => {
                    match res {
                        Ok(()) => bump(&shared.stats.acks),
                        // A late answer to an earlier delivery: harmless,
                        // the device answers the current attempt as well.
                        Err(e @ QueueError::StaleAttempt { .. }) => tracing::debug!(%id, "{e}"),
                        Err(QueueError::NotInFlight { .. }) => {
                            bad_acks += 1;
                            tracing::warn!(%id, "device acked a command that is not in flight on it");
                            if bad_acks > opts.max_bad_acks {
                                break Fatal::new(
                                    ErrorCode::TooManyFrames,
                                    format!("more than {} acks for commands not in flight on this device", opts.max_bad_acks),
                                ).into();
                            }
                            let f = BoxFrame::Error {
                                code: ErrorCode::NotYourCommand,
                                message: format!("command {id} is not in flight on this device (stale, duplicate or foreign ack); ignored"),
                            };
                            if let Err(e) = self.write(&f).await {
                                break End::Gone(e.to_string());
                            }
                        }
                        Err(QueueError::ShuttingDown) => {
                            break Fatal::new(ErrorCode::ShuttingDown, "the box is shutting down; reconnect later").into();
                        }
                        Err(e) => {
                            tracing::error!(%id, error = %e, "the queue failed to record an ack");
                            break Fatal::new(ErrorCode::Internal, format!("the box could not record the ack of {id}: {e}")).into();
                        }
                    }
                }
                d = rx.recv() => {
                    // Whatever else is ready goes out in the same write, so
                    // a burst costs one wakeup of the connection, not one
                    // per command.
                    let mut out = Vec::new();
                    let (mut next, mut sent, mut frames, mut end) = (d, 0u64, 0u64, None);
                    for _ in 0..MAX_DELIVERY_BATCH {
                        let Some(d) = next else {
                            end = Some(if shared.revoked.contains(&self.device) {
                                Fatal::new(ErrorCode::Revoked, "this device was revoked")
                            } else {
                                Fatal::new(ErrorCode::ShuttingDown, "the queue ended this session; reconnect later")
                            }.into());
                            break;
                        };
                        if let Some(frame) = self.delivery_frame(d, session, &mut acks) {
                            let is_command = matches!(frame, BoxFrame::Command { .. } | BoxFrame::Forward(_));
                            match proto::encode_into(&frame, opts.max_frame, &mut out) {
                                Ok(()) => {
                                    sent += u64::from(is_command);
                                    frames += 1;
                                }
                                Err(FrameError::TooLarge { len, max }) => reject_oversized(&frame, len, max, session, &mut acks),
                                Err(e) => {
                                    end = Some(End::Gone(e.to_string()));
                                    break;
                                }
                            }
                        }
                        if out.len() >= MAX_DELIVERY_BATCH_BYTES {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(d) => next = Some(d),
                            // Empty, or closed: the next recv() says which.
                            Err(_) => break,
                        }
                    }
                    if !out.is_empty() {
                        if let Err(e) = self.send.write_all(&out).await {
                            break End::Gone(e.to_string());
                        }
                        shared.stats.commands_sent.fetch_add(sent, Ordering::Relaxed);
                        shared.stats.frames_out.fetch_add(frames, Ordering::Relaxed);
                    }
                    if let Some(end) = end {
                        break end;
                    }
                }
                f = frx.recv(), if acks.len() < ack_limit && answers.len() < MAX_ANSWERS => {
                    let frame = match f.map(|f| *f) {
                        None => break End::Gone("device closed its control stream".into()),
                        Some(Err(e)) => break frame_error(e),
                        Some(Ok(frame)) => frame,
                    };
                    bump(&shared.stats.frames_in);
                    if !bucket.take(began.elapsed()) {
                        break Fatal::new(
                            ErrorCode::TooManyFrames,
                            format!("more than {} frames per second (burst {}); slow down", opts.frame_rate, opts.frame_burst),
                        ).into();
                    }
                    match frame {
                        DeviceFrame::Progress { id, bytes, total } => self.progress(id, bytes, total),
                        DeviceFrame::Ack { id, outcome } => self.ack(session, &mut acks, id, None, outcome),
                        DeviceFrame::AckAttempt { id, attempt, outcome } => self.ack(session, &mut acks, id, Some(attempt), outcome),
                        DeviceFrame::Ping => {
                            if let Err(e) = self.write(&BoxFrame::Pong).await {
                                break End::Gone(e.to_string());
                            }
                        }
                        DeviceFrame::Event { payload } => self.event(payload),
                        DeviceFrame::Send { .. } | DeviceFrame::Query { .. } if self.minor < proto::MINOR_SEND => {
                            let f = BoxFrame::Error {
                                code: ErrorCode::Unsupported,
                                message: format!("{} needs protocol 1.{} or later; this device announced {}.{}", frame.name(), proto::MINOR_SEND, proto::VERSION.major, self.minor),
                            };
                            if let Err(e) = self.write(&f).await {
                                break End::Gone(e.to_string());
                            }
                        }
                        DeviceFrame::Send { to, payload, opts } => {
                            // Handed to the writer now, so a device's sends
                            // are enqueued in the order it sent them.
                            let from = self.device.clone();
                            let req = SendRequest { target: to, payload, opts, origin: from.clone(), signature: None };
                            let sent = shared.queue.device_send(from, req);
                            answers.push_back(tokio::spawn(async move {
                                match sent.await {
                                    Ok(r) => BoxFrame::Sent { id: r.id, duplicate: r.duplicate },
                                    Err(e) => refusal(e),
                                }
                            }));
                        }
                        DeviceFrame::Query { id } => {
                            let from = self.device.clone();
                            let shown = shared.queue.show_queued(id);
                            answers.push_back(tokio::spawn(async move {
                                match shown.await {
                                    // A device sees only what it sent itself.
                                    Ok(v) if v.origin == from => BoxFrame::Status { id, state: v.state, outcome: v.outcome, error: v.error },
                                    Ok(_) | Err(QueueError::NotFound(_)) => BoxFrame::Refused {
                                        code: ErrorCode::NotFound,
                                        message: format!("no command {id} sent by this device (or its result is past retention)"),
                                    },
                                    Err(e) => refusal(e),
                                }
                            }));
                        }
                        DeviceFrame::Hello { .. } => {
                            break Fatal::new(ErrorCode::ProtocolViolation, "Hello sent twice").into();
                        }
                        DeviceFrame::Accepted { id, .. } => {
                            if self.fetching.lock().unwrap().remove(&id).is_some() {
                                shared.queue.progress().clear(id);
                            }
                            // Like an ack: a stray one counts as a bad ack.
                            await_ack(&mut acks, id, shared.queue.handed(self.device.clone(), id));
                        }
                        DeviceFrame::UpFrom { epoch } => {
                            // Queued ahead of the `Up`s after it; an error
                            // (not a gateway) comes back on its first `Up`.
                            drop(shared.queue.up_from(self.device.clone(), epoch));
                        }
                        DeviceFrame::Up { entries } => {
                            // Answered in order with the other answers; an
                            // error is not fatal (the edge retries later).
                            let applied = shared.queue.up(self.device.clone(), entries);
                            answers.push_back(tokio::spawn(async move {
                                match applied.await {
                                    Ok(seq) => BoxFrame::UpAck { seq },
                                    Err(e) => match refusal(e) {
                                        BoxFrame::Refused { code, message } => BoxFrame::Error { code, message },
                                        other => other,
                                    },
                                }
                            }));
                        }
                    }
                }
            }
        };
        drop(frx);
        reader.abort();
        // Let acks already handed to the queue finish, so an outcome the
        // device sent just before leaving is not redelivered needlessly.
        let _ = timeout(Duration::from_secs(2), async {
            while acks.next().await.is_some() {}
        })
        .await;
        end
    }

    /// A device's ack, with the attempt it answers when it names one. It
    /// is queued with the writer now, in arrival order; only the wait for
    /// durability runs aside, so one flush carries many acks.
    fn ack(
        &self,
        session: &crate::shell::queue::DeviceSession,
        acks: &mut FuturesUnordered<AckWait>,
        id: CommandId,
        attempt: Option<u32>,
        outcome: Outcome,
    ) {
        if self.fetching.lock().unwrap().remove(&id).is_some() {
            self.shared.queue.progress().clear(id);
        }
        await_ack(acks, id, session.ack_attempt(id, attempt, outcome));
    }

    /// A device's report on fetching the artifact of a command delivered
    /// to it on this connection; any other is ignored (a device reports
    /// only on its own deliveries).
    fn progress(&self, id: CommandId, bytes: u64, total: u64) {
        let mut f = self.fetching.lock().unwrap();
        let Some((digest, label)) = f.get_mut(&id) else {
            tracing::debug!(%id, "progress for a command not fetching on this connection; ignored");
            return;
        };
        if label.is_none() {
            let d = crate::engine::artifact::Digest(*digest);
            *label = match self.shared.queue.shelf().manifest(&d) {
                Ok(Some(m)) => Some(format!("{}@{}", m.name, m.version)),
                _ => Some(d.to_string()),
            };
        }
        self.shared
            .queue
            .progress()
            .report(id, label.clone(), bytes, total);
    }

    fn event(&self, payload: Vec<u8>) {
        let stats = &self.shared.stats;
        bump(&stats.events);
        match &self.shared.opts.events {
            Some(tx) => {
                let ev = DeviceEvent {
                    device: self.device.clone(),
                    payload,
                    at: crate::now_millis(),
                };
                if tx.try_send(ev).is_err() {
                    bump(&stats.events_dropped);
                    tracing::debug!("device event dropped: the event consumer is behind");
                }
            }
            None => tracing::debug!(bytes = payload.len(), "device event"),
        }
    }

    /// The frame that carries a delivery, or `None` when it was ended here
    /// instead (a forward to an edge too old to take it).
    fn delivery_frame(
        &self,
        d: Delivery,
        session: &crate::shell::queue::DeviceSession,
        acks: &mut FuturesUnordered<AckWait>,
    ) -> Option<BoxFrame> {
        // A signer removed, or signatures required, since it was queued:
        // it ends here, rejected with the reason, and never reaches the
        // device.
        let envelope = match &d {
            Delivery::Command(c) => Some((c.id, c.signature.as_deref())),
            Delivery::Forward(f) => Some((f.id, f.signature.as_deref())),
            Delivery::Cancel(_) => None,
        };
        if let Some((id, env)) = envelope {
            if let Some(why) = session.gate().at_delivery(env) {
                reject(
                    session,
                    acks,
                    id,
                    format!("refused by the box at delivery: {why}"),
                );
                return None;
            }
        }
        // A command naming an artifact lets this connection fetch it; a
        // box below stages a Forward's the same way (`artifact::stage`),
        // reporting progress under the Forward's id as a device does.
        let named = envelope.and_then(|(id, env)| {
            Some((
                id,
                crate::engine::trust::envelope::artifact(env?)
                    .ok()
                    .flatten()?,
            ))
        });
        if let Some((id, a)) = named {
            if self.minor < proto::MINOR_ARTIFACT {
                let (who, what) = match &d {
                    Delivery::Forward(_) => ("the box below", "upgrade it"),
                    _ => ("this device", "upgrade the agent"),
                };
                let reason = format!(
                    "the command carries an artifact, which needs protocol 1.{}; {who} speaks {}.{}: {what}",
                    proto::MINOR_ARTIFACT,
                    proto::VERSION.major,
                    self.minor
                );
                reject(session, acks, id, reason);
                return None;
            }
            self.artifacts.lock().unwrap().insert(a);
            self.fetching.lock().unwrap().insert(id, (a, None));
        }
        Some(match d {
            Delivery::Command(c) => BoxFrame::Command {
                id: c.id,
                priority: c.priority,
                payload: c.payload,
                attempt: c.attempt,
                deadline: c.deadline,
                signature: c.signature,
            },
            Delivery::Cancel(id) => BoxFrame::Cancel { id },
            Delivery::Forward(f) if self.minor < proto::MINOR_GATEWAY => {
                let reason = format!(
                    "the box below speaks protocol {}.{}; forwarding needs 1.{} (upgrade it)",
                    proto::VERSION.major,
                    self.minor,
                    proto::MINOR_GATEWAY
                );
                reject(session, acks, f.id, reason);
                return None;
            }
            Delivery::Forward(f) => BoxFrame::Forward(f),
        })
    }

    async fn write(&mut self, frame: &BoxFrame) -> Result<(), FrameError> {
        proto::write_frame(&mut self.send, frame, self.shared.opts.max_frame).await?;
        bump(&self.shared.stats.frames_out);
        Ok(())
    }

    /// Record this connection as the device's live one, closing an older
    /// one: a rebooted device's stale connection must not hold its id until
    /// the idle timeout. Refused if the device is revoked, this certificate
    /// is superseded, or the bundle is in use on another live device (see
    /// `contest`).
    fn register(&self) -> Result<(), Fatal> {
        let now = Instant::now();
        let old = {
            let mut live = self.shared.live();
            let holder = live
                .get(&self.device)
                .map(|l| crate::engine::contest::Holder {
                    age: now.saturating_duration_since(l.since),
                    open: l.conn.close_reason().is_none(),
                });
            let verdict = self
                .shared
                .contests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .arrive(&self.device, holder, now.into_std());
            if let crate::engine::contest::Verdict::Refuse { detected } = verdict {
                drop(live);
                bump(&self.shared.stats.in_use_refused);
                if detected {
                    bump(&self.shared.stats.shared_bundles_found);
                    self.shared.bundles_found.send_modify(|n| *n += 1);
                    tracing::warn!(
                        "two live connections keep taking this device's id from each other: its bundle is in use on more than one device; refusing newcomers while one holds it (give each device its own bundle: `outpost enroll ID`)"
                    );
                }
                return Err(Fatal {
                    code: ErrorCode::Replaced,
                    message: format!("this bundle is in use elsewhere: another live device holds `{}` with it; give each device its own bundle (`outpost enroll ID` on the box)", self.device),
                    close: close_code::IN_USE,
                });
            }
            live.insert(
                self.device.clone(),
                Live {
                    seq: self.seq,
                    conn: self.conn.clone(),
                    since: now,
                },
            )
        };
        if let Some(old) = old {
            tracing::info!("a new connection of this device replaces the old one");
            old.conn.close(
                VarInt::from_u32(close_code::REPLACED),
                b"replaced by a newer connection of this device",
            );
        }
        // Checked after inserting: see `DeviceLink::revoke` and `supersede`.
        match self.shared.revoked.check(&self.device, &self.cert) {
            Ok(()) => Ok(()),
            Err(identity::Refusal::Revoked) => {
                Err(Fatal::new(ErrorCode::Revoked, "this device is revoked"))
            }
            Err(identity::Refusal::Superseded) => Err(Fatal {
                code: ErrorCode::Revoked,
                message: "this certificate was superseded: the device was enrolled again and only its newest bundle is admitted".into(),
                close: close_code::SUPERSEDED,
            }),
        }
    }

    fn unregister(&self) {
        let mut live = self.shared.live();
        if live.get(&self.device).map(|l| l.seq) == Some(self.seq) {
            live.remove(&self.device);
        }
    }

    /// Send a fatal Error frame, give it a moment to arrive, then close.
    async fn fail(&mut self, f: Fatal) {
        bump(&self.shared.stats.protocol_errors);
        // Refusals that a client may retry in a loop are counted per address
        // and device, not logged each.
        let refusal = match (f.code, f.close) {
            (_, close_code::IN_USE) => Some("bundle in use elsewhere of device"),
            (_, close_code::SUPERSEDED) => Some("superseded certificate of device"),
            (ErrorCode::Revoked, _) => Some("revoked device"),
            (ErrorCode::NotEnrolled, _) => Some("not enrolled device"),
            _ => None,
        };
        match refusal {
            Some(what) => {
                let ip = self.conn.remote_address().ip();
                if self
                    .shared
                    .refusals
                    .refused(Some(ip), Some(&self.device), what)
                {
                    tracing::info!(code = %f.code, message = %f.message, "refused the device (repeats are summed up once a minute)");
                }
            }
            None => {
                tracing::warn!(code = %f.code, message = %f.message, "closing the device connection")
            }
        }
        let frame = BoxFrame::Error {
            code: f.code,
            message: f.message.clone(),
        };
        let wait = Duration::from_secs(1);
        // These two have no Error code of their own (the protocol's codes
        // are fixed): the close code and its reason say it all.
        let frame_first = !matches!(f.close, close_code::IN_USE | close_code::SUPERSEDED);
        if frame_first {
            if let Ok(Ok(())) = timeout(wait, self.write(&frame)).await {
                let _ = self.send.finish();
                // Resolves once the device has received everything, so the
                // close below does not discard the Error frame in flight.
                let _ = timeout(wait, self.send.stopped()).await;
            }
        }
        let mut reason = f.message.into_bytes();
        reason.truncate(200);
        self.conn.close(VarInt::from_u32(f.close), &reason);
    }
}

/// Answers to Send/Query a device may have outstanding before the box stops
/// reading its frames (backpressure, not an error).
const MAX_ANSWERS: usize = 64;

/// A queue refusal as the device sees it.
fn refusal(e: QueueError) -> BoxFrame {
    let code = match &e {
        QueueError::Forbidden { .. } | QueueError::Untrusted(_) => ErrorCode::Forbidden,
        QueueError::NoRoute(_) | QueueError::UnknownDevice(_) | QueueError::Revoked(_) => {
            ErrorCode::NoRoute
        }
        QueueError::QueueFull { .. }
        | QueueError::DiskFull { .. }
        | QueueError::NoSpace { .. }
        | QueueError::ArtifactBudget(_) => ErrorCode::Full,
        QueueError::BadRequest(_)
        | QueueError::UnknownDependency(_)
        | QueueError::KeyReused { .. } => ErrorCode::BadRequest,
        QueueError::NotFound(_) | QueueError::UnknownArtifact(_) => ErrorCode::NotFound,
        QueueError::ArtifactInUse { .. } => ErrorCode::BadRequest,
        QueueError::ArtifactRetiring(_) => ErrorCode::NotFound,
        QueueError::AlreadyEnrolled { .. } => ErrorCode::BadRequest,
        QueueError::ShuttingDown => ErrorCode::ShuttingDown,
        QueueError::InvalidTransition { .. }
        | QueueError::NotInFlight { .. }
        | QueueError::StaleAttempt { .. }
        | QueueError::Storage(_) => ErrorCode::Internal,
    };
    BoxFrame::Refused {
        code,
        message: e.to_string(),
    }
}

fn frame_error(e: FrameError) -> End {
    match e.code() {
        Some(code) => Fatal::new(code, e.to_string()).into(),
        None => End::Gone(e.to_string()),
    }
}
