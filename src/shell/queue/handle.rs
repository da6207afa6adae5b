//! The queue's handle: what every other part of the box calls (sends,
//! acks, device sessions, views, the audit log, backups), as messages to
//! the writer thread (`service`) and the answers it sends back once a
//! round is durable. Checks that need no core (an artifact named, the id
//! a signed command brings) are made here, before the writer is asked.

use super::service::Delivery;
use super::{CommandView, LifecycleEvent, QueueError, QueueStats, SendReceipt, SendRequest};
use crate::engine::command::{CommandId, DeviceId, Millis, Outcome};
use crate::engine::journal::ResultRecord;
use crate::engine::queue::core::{CoreReply, CoreRequest};
use crate::shell::store::DeviceRecord;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

pub(super) type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

pub(crate) enum Msg {
    Core(CoreRequest, Reply<crate::engine::queue::core::CoreReply>),
    Ack {
        device: DeviceId,
        token: u64,
        id: CommandId,
        attempt: Option<u32>,
        outcome: Outcome,
        reply: Reply<()>,
    },
    Connect {
        device: DeviceId,
        window: u32,
        offered: Option<Vec<String>>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        reply: Reply<u64>,
    },
    Disconnect {
        device: DeviceId,
        token: u64,
    },
    Shutdown(oneshot::Sender<()>),
    /// An audit entry to write with a coming round.
    Audit(crate::engine::audit::Note),
    AuditRead {
        since: Option<u64>,
        limit: Option<u64>,
        reply: Reply<Vec<crate::engine::audit::View>>,
    },
    AuditVerify(Reply<AuditVerdict>),
    /// Stream every tree of the store, as of the round this joins, into
    /// `pieces` (`backup::snapshot_trees`).
    Backup(Box<BackupJob>),
}

/// A snapshot asked of the writer.
pub(crate) struct BackupJob {
    pub(super) pieces: mpsc::Sender<Vec<u8>>,
    pub(super) reply: Reply<crate::shell::backup::SnapshotInfo>,
}

/// What a walk of the audit log found.
pub type AuditVerdict = Result<crate::engine::audit::Intact, crate::engine::audit::Broken>;

/// A device's live attachment to the queue. Dropping it disconnects the
/// device: its in-flight commands go back to queued for its next session.
pub struct DeviceSession {
    /// The device this session is for, as its certificate names it.
    pub device: DeviceId,
    /// Deliveries for this device, at most `window` unacked at a time.
    pub rx: mpsc::UnboundedReceiver<Delivery>,
    token: u64,
    handle: QueueHandle,
}

impl DeviceSession {
    /// The box's trust gate, for the checks at delivery.
    pub fn gate(&self) -> &Arc<crate::engine::trust::Gate> {
        self.handle.gate()
    }

    /// Report a command's outcome. The report is queued at once, in call
    /// order; the returned future resolves once it is durable. It borrows
    /// nothing, so a link can keep many acks in flight (one flush then
    /// carries them all) instead of waiting a flush per ack.
    pub fn ack(
        &self,
        id: CommandId,
        outcome: Outcome,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static {
        self.ack_attempt(id, None, outcome)
    }

    /// [`ack`](Self::ack) of one attempt (`AckAttempt`, protocol 1.4): a
    /// stale attempt's ack is refused with `StaleAttempt` and changes
    /// nothing.
    pub fn ack_attempt(
        &self,
        id: CommandId,
        attempt: Option<u32>,
        outcome: Outcome,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.handle.tx.send(Msg::Ack {
            device: self.device.clone(),
            token: self.token,
            id,
            attempt,
            outcome,
            reply,
        });
        async move {
            sent.map_err(|_| QueueError::ShuttingDown)?;
            rx.await.map_err(|_| QueueError::ShuttingDown)?
        }
    }
}

impl Drop for DeviceSession {
    fn drop(&mut self) {
        let _ = self.handle.tx.send(Msg::Disconnect {
            device: self.device.clone(),
            token: self.token,
        });
    }
}

/// A cheap, cloneable handle to the queue service.
#[derive(Clone)]
pub struct QueueHandle {
    pub(super) tx: std_mpsc::Sender<Msg>,
    pub(super) events: broadcast::Sender<LifecycleEvent>,
    /// The outbox's next seq after each write that added to it (the
    /// uplink wakes on it; nothing polls).
    pub(super) outbox: tokio::sync::watch::Receiver<u64>,
    /// Bumped when a device connects or disconnects (the monitor's alert
    /// rules wake on it; nothing polls).
    pub(super) sessions: tokio::sync::watch::Receiver<u64>,
    pub(super) gate: Arc<crate::engine::trust::Gate>,
    pub(super) shelf: crate::shell::artifact::shelf::Shelf,
    pub(super) progress: super::progress::Board,
    /// Names this database's outbox to the hub above (`UpFrom`).
    pub(super) uplink_epoch: u64,
}

/// A shelf error as the queue's: unknown names are `UnknownArtifact`, a
/// full disk `NoSpace`-like storage refusal, the rest storage faults.
pub fn shelf_error(e: crate::shell::artifact::shelf::ShelfError) -> QueueError {
    use crate::shell::artifact::shelf::ShelfError as S;
    match e {
        S::NotFound(what) => QueueError::UnknownArtifact(what),
        S::Closed => QueueError::ShuttingDown,
        S::Chunk(crate::shell::artifact::chunks::ChunkError::OverBudget(o)) => {
            QueueError::ArtifactBudget(o)
        }
        S::Manifest(_)
        | S::MissingChunk { .. }
        | S::Chunk(crate::shell::artifact::chunks::ChunkError::Mismatch { .. }) => {
            QueueError::BadRequest(e.to_string())
        }
        other => QueueError::Storage(other.to_string()),
    }
}

/// The artifact a command's envelope names, if any.
fn named_artifact(
    req: &SendRequest,
) -> Result<Option<crate::engine::artifact::Digest>, QueueError> {
    let Some(env) = req.signature.as_deref() else {
        return Ok(None);
    };
    crate::engine::trust::envelope::artifact(env)
        .map(|d| d.map(crate::engine::artifact::Digest))
        .map_err(|e| QueueError::Untrusted(e.into()))
}

/// The id a command will have, known before it is queued so a reference
/// can be noted under it: a signed command's is its envelope's (and the
/// core takes it from there, refusing a replay), else a new one the core
/// is given. Returns the id and what to queue it under.
fn intake_id(req: &SendRequest) -> Result<(CommandId, Option<CommandId>), QueueError> {
    Ok(
        match crate::engine::trust::envelope::sealed(req.signature.as_deref()) {
            Some(env) => {
                let id = crate::engine::trust::envelope::open(env)
                    .map_err(|e| QueueError::Untrusted(e.into()))?
                    .claims
                    .id;
                (id, None)
            }
            None => {
                let id = CommandId::new(crate::now_millis(), rand::random());
                (id, Some(id))
            }
        },
    )
}

/// What checking an artifact's referrers found (`QueueHandle::retire`).
enum Retired {
    /// Another removal is checking it.
    Busy,
    /// This live command names it.
    Named(CommandId),
    /// No live command names it (the references of ended ones swept).
    Unneeded,
}

impl QueueHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| QueueError::ShuttingDown)?;
        rx.await.map_err(|_| QueueError::ShuttingDown)?
    }

    async fn core(&self, req: CoreRequest) -> Result<CoreReply, QueueError> {
        self.call(|reply| Msg::Core(req, reply)).await
    }

    /// Enqueue durably. Returns once the command is on disk.
    pub async fn send(&self, req: SendRequest) -> Result<SendReceipt, QueueError> {
        self.admit(None, &req)?;
        let Some(d) = named_artifact(&req)? else {
            return self.core(CoreRequest::Send(req)).await?.into_receipt();
        };
        // The reference is noted under the id before the command is queued,
        // so it is on disk no later than the command; both under the
        // intake lock, so no removal checks in between.
        let (id, queue_as) = intake_id(&req)?;
        let reply = {
            let intake = self.shelf.intake();
            self.held(&d, &intake)?;
            self.shelf
                .reference(&d, id, crate::now_millis())
                .map_err(shelf_error)?;
            match queue_as {
                Some(id) => self.queued(CoreRequest::SendAs { id, req }),
                None => self.queued(CoreRequest::Send(req)),
            }
        };
        reply.await?.into_receipt()
    }

    /// Whether the box holds artifact `d` and is not removing it.
    fn held(
        &self,
        d: &crate::engine::artifact::Digest,
        intake: &crate::shell::artifact::shelf::Intake<'_>,
    ) -> Result<(), QueueError> {
        if intake.contains(d) {
            return Err(QueueError::ArtifactRetiring(d.to_string()));
        }
        match self.shelf.manifest_bytes(d).map_err(shelf_error)? {
            Some(_) => Ok(()),
            None => Err(QueueError::UnknownArtifact(d.to_string())),
        }
    }

    /// Remove an artifact no live command names (sweeping references of
    /// commands that ended). Returns what was removed and the bytes freed.
    pub async fn remove_artifact(
        &self,
        spec: &crate::engine::artifact::ArtifactSpec,
    ) -> Result<(crate::shell::artifact::shelf::ArtifactView, u64), QueueError> {
        let d = self.shelf.resolve(spec).map_err(shelf_error)?;
        match self.retire(&d).await? {
            Retired::Busy => Err(QueueError::ArtifactRetiring(spec.to_string())),
            Retired::Named(by) => {
                self.shelf.unretire(&d);
                Err(QueueError::ArtifactInUse {
                    artifact: spec.to_string(),
                    by,
                })
            }
            Retired::Unneeded => {
                let removed = self.remove_retired(&d);
                self.shelf.unretire(&d);
                removed?.ok_or_else(|| QueueError::UnknownArtifact(spec.to_string()))
            }
        }
    }

    /// One retention pass (`artifact::retention`): marks artifacts newly
    /// unneeded, removes those unneeded past `retention_ms`. Returns what
    /// it removed and the bytes freed.
    pub async fn collect_artifacts(
        &self,
        now: Millis,
        retention_ms: u64,
    ) -> Result<Vec<(crate::shell::artifact::shelf::ArtifactView, u64)>, QueueError> {
        use crate::engine::artifact::retention::{verdict, Held, Verdict};
        let mut removed = Vec::new();
        for a in self.shelf.list().map_err(shelf_error)? {
            let d = a.digest;
            // A first look without the intake lock, so a pass that removes
            // nothing never holds up (or refuses) a sender.
            let (live, last_named) = self.named(&d).await?;
            let held = Held {
                digest: d,
                added_at: a.added_at,
                last_named,
                unneeded_since: self.shelf.unneeded_since(&d).map_err(shelf_error)?,
                live,
            };
            match verdict(&held, now, retention_ms) {
                Verdict::Needed if held.unneeded_since.is_some() => {
                    self.shelf.mark_unneeded(&d, None).map_err(shelf_error)?
                }
                Verdict::Mark(at) => self
                    .shelf
                    .mark_unneeded(&d, Some(at))
                    .map_err(shelf_error)?,
                Verdict::Needed | Verdict::Keep => {}
                // Checked again under the lock (sweeping what ended), so no
                // command comes to name it between the check and the removal.
                Verdict::Remove => match self.retire(&d).await? {
                    Retired::Busy => {}
                    Retired::Named(_) => self.shelf.unretire(&d),
                    Retired::Unneeded => {
                        let r = self.remove_retired(&d);
                        self.shelf.unretire(&d);
                        removed.extend(r?);
                    }
                },
            }
        }
        let before = std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_millis(retention_ms))
            .unwrap_or(std::time::UNIX_EPOCH);
        let (n, freed) = self.shelf.sweep(before).map_err(shelf_error)?;
        if n > 0 {
            tracing::info!(
                chunks = n,
                freed,
                "removed chunks no artifact names (from adds cut short)"
            );
        }
        Ok(removed)
    }

    /// Whether a live command names `d`, and the newest time an ended one
    /// was noted as naming it (references are left as they are).
    async fn named(
        &self,
        d: &crate::engine::artifact::Digest,
    ) -> Result<(bool, Option<Millis>), QueueError> {
        let mut last = None;
        for (id, at) in self.shelf.referrers(d).map_err(shelf_error)? {
            match self.show(id).await {
                Ok(v) if !v.state.is_final() => return Ok((true, None)),
                Ok(_) | Err(QueueError::NotFound(_)) => last = last.max(Some(at)),
                Err(e) => return Err(e),
            }
        }
        Ok((false, last))
    }

    /// Mark `d` retiring and ask the queue about every command noted as
    /// naming it; references of commands that ended are swept. The caller
    /// must `unretire` unless the answer is `Busy`.
    async fn retire(&self, d: &crate::engine::artifact::Digest) -> Result<Retired, QueueError> {
        let (fresh, refs) = self.shelf.retire(d).map_err(shelf_error)?;
        if !fresh {
            return Ok(Retired::Busy);
        }
        let answer = async {
            // Every sender that noted a reference queued its command before
            // `retire` took the lock, so these are answered after it.
            let asks: Vec<_> = refs
                .iter()
                .map(|&(id, _)| (id, self.show_queued(id)))
                .collect();
            for (id, ask) in asks {
                match ask.await {
                    Ok(v) if !v.state.is_final() => return Ok(Retired::Named(id)),
                    Ok(_) | Err(QueueError::NotFound(_)) => {
                        self.shelf.unreference(d, id).map_err(shelf_error)?
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Retired::Unneeded)
        }
        .await;
        if answer.is_err() {
            self.shelf.unretire(d);
        }
        answer
    }

    /// Remove retired artifact `d`: what it was and the bytes freed.
    fn remove_retired(
        &self,
        d: &crate::engine::artifact::Digest,
    ) -> Result<Option<(crate::shell::artifact::shelf::ArtifactView, u64)>, QueueError> {
        let Some(view) = self.shelf.view(d).map_err(shelf_error)? else {
            return Ok(None);
        };
        let freed = self.shelf.remove(d).map_err(shelf_error)?;
        Ok(Some((view, freed)))
    }

    /// The trust gate's verdict on a command at intake (see `trust::gate`):
    /// checked here, in the caller's task, before the writer sees it.
    fn admit(&self, id: Option<CommandId>, req: &SendRequest) -> Result<(), QueueError> {
        let intake = crate::engine::trust::Intake {
            envelope: req.signature.as_deref(),
            target: &req.target,
            id,
            payload: &req.payload,
            priority: req.opts.priority,
            not_before: req.opts.not_before,
        };
        self.gate
            .admit(intake, crate::now_millis())
            .map(|_| ())
            .map_err(QueueError::Untrusted)
    }

    /// The box's trust gate.
    pub fn gate(&self) -> &Arc<crate::engine::trust::Gate> {
        &self.gate
    }

    /// The box's artifacts (manifests and chunks).
    pub fn shelf(&self) -> &crate::shell::artifact::shelf::Shelf {
        &self.shelf
    }

    /// Add or remove an operator key; durable on return.
    pub async fn edit_trust(
        &self,
        edit: crate::engine::trust::TrustEdit,
    ) -> Result<crate::engine::trust::TrustedKey, QueueError> {
        match self.core(CoreRequest::Trust(edit)).await? {
            CoreReply::Trusted(k) => Ok(k),
            _ => Err(QueueError::BadRequest(
                "internal: unexpected reply, wanted a key".into(),
            )),
        }
    }

    /// One command, live or among the results still kept (`NotFound`
    /// past them); a live one carries its artifact fetch progress.
    pub async fn show(&self, id: CommandId) -> Result<CommandView, QueueError> {
        let mut v = self.core(CoreRequest::Show(id)).await?.into_view()?;
        if !v.state.is_final() {
            v.progress = self.progress.get(id);
        }
        Ok(v)
    }

    /// Artifact fetch progress of delivered commands (memory only).
    pub fn progress(&self) -> &super::progress::Board {
        &self.progress
    }

    /// A device's live commands, in delivery order.
    pub async fn list(&self, device: DeviceId) -> Result<Vec<CommandView>, QueueError> {
        self.core(CoreRequest::List { device }).await?.into_views()
    }

    /// Cancel a command that has not ended (a broadcast: each open child);
    /// one in flight is also cancelled on its device. Durable on return.
    pub async fn cancel(&self, id: CommandId) -> Result<CommandView, QueueError> {
        self.core(CoreRequest::Cancel(id)).await?.into_view()
    }

    /// Put a dead or failed command back in the queue, with fresh
    /// attempts, under its own id. Durable on return.
    pub async fn retry(&self, id: CommandId) -> Result<CommandView, QueueError> {
        self.core(CoreRequest::Retry(id)).await?.into_view()
    }

    /// The queue's counts and totals, for `status` and metrics.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        self.core(CoreRequest::Stats).await?.into_stats()
    }

    /// Register (or re-admit) a device. Durable on return.
    pub async fn enroll(&self, record: DeviceRecord) -> Result<(), QueueError> {
        self.core(CoreRequest::Enroll(record)).await.map(|_| ())
    }

    /// Enroll a device, refusing an id that has a record (enrolled or
    /// revoked) unless `force`. Durable on return.
    pub async fn enroll_new(&self, record: DeviceRecord, force: bool) -> Result<(), QueueError> {
        self.core(CoreRequest::EnrollNew { record, force })
            .await
            .map(|_| ())
    }

    /// Revoke a device: refused at its next connect, and its live session
    /// (if any) is ended. Durable on return.
    pub async fn revoke(&self, device: DeviceId) -> Result<DeviceRecord, QueueError> {
        self.core(CoreRequest::Revoke(device)).await?.into_device()
    }

    /// Every device with a record here (revoked ones too), online or not
    /// with its queued and in-flight counts, then those the boxes below
    /// last reported.
    pub async fn devices(&self) -> Result<Vec<crate::engine::queue::core::DeviceView>, QueueError> {
        self.core(CoreRequest::Devices).await?.into_devices()
    }

    /// Change a device's tags and capabilities (durable when it returns).
    pub async fn relabel(
        &self,
        r: crate::engine::queue::core::Relabel,
    ) -> Result<DeviceRecord, QueueError> {
        self.core(CoreRequest::Relabel(r)).await?.into_device()
    }

    /// A device sends a command, subject to the ACL; its origin is the
    /// device. Queued with the writer at once, in call order (so one
    /// device's sends keep their order), the future resolves once durable.
    pub fn device_send(
        &self,
        from: DeviceId,
        req: SendRequest,
    ) -> impl std::future::Future<Output = Result<SendReceipt, QueueError>> + Send + 'static {
        let reply = self.admit(None, &req).and_then(|()| {
            let Some(d) = named_artifact(&req)? else {
                return Ok(self.queued(CoreRequest::DeviceSend {
                    from,
                    id: None,
                    req,
                }));
            };
            let (id, queue_as) = intake_id(&req)?;
            let intake = self.shelf.intake();
            self.held(&d, &intake)?;
            self.shelf
                .reference(&d, id, crate::now_millis())
                .map_err(shelf_error)?;
            Ok(self.queued(CoreRequest::DeviceSend {
                from,
                id: queue_as,
                req,
            }))
        });
        async move { reply?.await?.into_receipt() }
    }

    /// A command forwarded from the hub above under its id (edge side):
    /// queued with the writer at once, in call order (a `Cancel` that
    /// follows it on the link finds it); durable when the future resolves.
    /// A known id answers `duplicate` and queues nothing.
    pub fn send_as(
        &self,
        id: CommandId,
        req: SendRequest,
    ) -> impl std::future::Future<Output = Result<SendReceipt, QueueError>> + Send + 'static {
        let reply = self.admit(Some(id), &req).and_then(|()| {
            let d = named_artifact(&req)?;
            let intake = self.shelf.intake();
            if let Some(d) = d {
                self.held(&d, &intake)?;
                self.shelf
                    .reference(&d, id, crate::now_millis())
                    .map_err(shelf_error)?;
            }
            Ok(self.queued(CoreRequest::SendAs { id, req }))
        });
        async move { reply?.await?.into_receipt() }
    }

    /// Record the end of a command the box ran itself (see
    /// `QueueCore::record_finished`); durable on return.
    pub async fn record_finished(&self, rec: ResultRecord) -> Result<(), QueueError> {
        self.core(CoreRequest::Finished(Box::new(rec)))
            .await
            .map(|_| ())
    }

    /// `cancel`, queued with the writer at once, in call order.
    pub fn cancel_queued(
        &self,
        id: CommandId,
    ) -> impl std::future::Future<Output = Result<CommandView, QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::Cancel(id));
        async move { reply.await?.into_view() }
    }

    /// The hub's cancel (`QueueCore::cancel_from_hub`), queued with the
    /// writer at once, in call order; durable on return.
    pub fn cancel_from_hub(
        &self,
        id: CommandId,
    ) -> impl std::future::Future<Output = Result<CommandView, QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::HubCancel(id));
        async move { reply.await?.into_view() }
    }

    /// A gateway holds a forwarded command durably (hub side).
    pub fn handed(
        &self,
        gateway: DeviceId,
        id: CommandId,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::Handed { gateway, id });
        async move { reply.await.map(|_| ()) }
    }

    /// Apply a gateway's outbox records (hub side), queued in call order;
    /// resolves, once durable, to the cursor to acknowledge.
    pub fn up(
        &self,
        edge: DeviceId,
        entries: Vec<crate::engine::journal::UpEntry>,
    ) -> impl std::future::Future<Output = Result<u64, QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::Up { edge, entries });
        async move { reply.await?.into_cursor() }
    }

    /// The database a gateway's outbox counts in (`UpFrom`), queued in
    /// call order, before the `Up`s that follow it.
    pub fn up_from(
        &self,
        edge: DeviceId,
        epoch: u64,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::UpFrom { edge, epoch });
        async move { reply.await.map(|_| ()) }
    }

    /// Telemetry a device sent, for the upstream (fire and forget: an
    /// event is not acknowledged to its device).
    pub fn device_event(&self, device: DeviceId, payload: Vec<u8>, at: Millis) {
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Msg::Core(
            CoreRequest::Event {
                device,
                payload,
                at,
            },
            reply,
        ));
    }

    /// The hub stored the outbox up to `seq` (edge side): those records
    /// are deleted with the next group.
    pub async fn up_ack(&self, seq: u64) -> Result<(), QueueError> {
        self.core(CoreRequest::UpAck(seq)).await.map(|_| ())
    }

    /// A new uplink session (edge side): every device's presence goes up
    /// again.
    pub async fn presence_snapshot(&self) -> Result<(), QueueError> {
        self.core(CoreRequest::PresenceSnapshot).await.map(|_| ())
    }

    /// Outbox records after `after` (about `max` at most), oldest first.
    pub async fn outbox_read(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<crate::engine::journal::UpEntry>, QueueError> {
        self.core(CoreRequest::OutboxRead { after, max })
            .await?
            .into_outbox()
    }

    /// The upstream outbox's depth and progress, for `status` and metrics.
    pub async fn outbox_stats(
        &self,
    ) -> Result<crate::engine::queue::outbox::OutboxStats, QueueError> {
        self.core(CoreRequest::OutboxStats)
            .await?
            .into_outbox_stats()
    }

    /// The epoch this box's outbox counts in (`Store::uplink_epoch`).
    pub fn uplink_epoch(&self) -> u64 {
        self.uplink_epoch
    }

    /// Changes whenever the outbox grew (its value: the next seq).
    pub fn outbox_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox.clone()
    }

    /// Changes whenever a device connects or disconnects.
    pub fn sessions_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sessions.clone()
    }

    /// `show`, queued with the writer at once, in call order.
    pub fn show_queued(
        &self,
        id: CommandId,
    ) -> impl std::future::Future<Output = Result<CommandView, QueueError>> + Send + 'static {
        let reply = self.queued(CoreRequest::Show(id));
        async move { reply.await?.into_view() }
    }

    fn queued(
        &self,
        req: CoreRequest,
    ) -> impl std::future::Future<Output = Result<CoreReply, QueueError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Msg::Core(req, reply));
        async move {
            sent.map_err(|_| QueueError::ShuttingDown)?;
            rx.await.map_err(|_| QueueError::ShuttingDown)?
        }
    }

    /// Attach a device. At most `window` commands are unacked at once.
    pub async fn connect(
        &self,
        device: DeviceId,
        window: u32,
    ) -> Result<DeviceSession, QueueError> {
        self.connect_offering(device, window, None).await
    }

    /// Attach a device that offers only some of its enrolled capabilities
    /// in this session (`None`: all of them).
    pub async fn connect_offering(
        &self,
        device: DeviceId,
        window: u32,
        offered: Option<Vec<String>>,
    ) -> Result<DeviceSession, QueueError> {
        let (deliveries, rx) = mpsc::unbounded_channel();
        let d = device.clone();
        let token = self
            .call(|reply| Msg::Connect {
                device: d,
                window,
                offered,
                deliveries,
                reply,
            })
            .await?;
        Ok(DeviceSession {
            device,
            rx,
            token,
            handle: self.clone(),
        })
    }

    /// Wait until a command reaches an end state, or `timeout` passes
    /// (`Ok(None)`). A broadcast command waits for the command itself.
    pub async fn wait(
        &self,
        id: CommandId,
        timeout: Duration,
    ) -> Result<Option<CommandView>, QueueError> {
        // Subscribe before the first look, so an end between the two is seen.
        let mut events = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let v = self.show(id).await?;
        if v.state.is_final() {
            return Ok(Some(v));
        }
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Ok(None),
                Ok(Ok(ev)) if ev.id == id && ev.state.is_final() => {
                    return self.show(id).await.map(Some)
                }
                Ok(Ok(_)) => {}
                // Fell behind a busy box: look again rather than miss the end.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    let v = self.show(id).await?;
                    if v.state.is_final() {
                        return Ok(Some(v));
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(QueueError::ShuttingDown)
                }
            }
        }
    }

    /// Lifecycle events from now on (for `watch`, `--wait`, metrics).
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.events.subscribe()
    }

    /// Record an audit entry; it is written with a coming round (see
    /// `queue::audit` for when).
    pub fn audit(&self, note: crate::engine::audit::Note) {
        let _ = self.tx.send(Msg::Audit(note));
    }

    /// Audit entries at or after `since` (ms), the newest `limit`.
    pub async fn audit_read(
        &self,
        since: Option<u64>,
        limit: Option<u64>,
    ) -> Result<Vec<crate::engine::audit::View>, QueueError> {
        self.call(|reply| Msg::AuditRead {
            since,
            limit,
            reply,
        })
        .await
    }

    /// Walk the audit log's chain.
    pub async fn audit_verify(&self) -> Result<AuditVerdict, QueueError> {
        self.call(Msg::AuditVerify).await
    }

    /// Stream a snapshot of every tree of the store into `pieces`, as of
    /// the next round's commit (`backup::snapshot_trees`). Blocking: call
    /// it off the async runtime (the writer fills `pieces` while this
    /// waits for its answer).
    pub fn snapshot_blocking(
        &self,
        pieces: mpsc::Sender<Vec<u8>>,
    ) -> Result<crate::shell::backup::SnapshotInfo, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Backup(Box::new(BackupJob { pieces, reply })))
            .map_err(|_| QueueError::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| QueueError::ShuttingDown)?
    }

    /// Finish the current group, stop the writer thread.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}
