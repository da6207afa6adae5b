//! A rollout's commands, sans IO: what each device (or edge) is sent,
//! under an id derived from the rollout and the step so a send repeated
//! after a crash is the same command, and what the queue's lifecycle
//! events tell the rollout. The runner (`shell::rollout`) and the
//! simulation both call these.

use super::{Action, End, Rollout};
use crate::engine::command::{CommandId, Millis, Outcome, State};
use crate::engine::queue::{LifecycleEvent, SendRequest};
use crate::engine::workflow::{step_command_id, text};

/// Feed a rollout what became of one of its commands: taken (delivered
/// at least once: a delivery heard of only through the attempt count of
/// its end, as after a restart, counts too) or ended. `None`: nothing
/// the rollout follows.
pub fn feed(r: &mut Rollout, ev: &LifecycleEvent, now: Millis) -> Option<Vec<Action>> {
    let delivered = matches!(ev.state, State::Delivered { .. });
    if delivered || (ev.state.is_final() && ev.attempts > 0) {
        r.taken(ev.id, now);
    }
    if ev.state.is_final() {
        Some(r.ended(ev.id, end_of(ev), now))
    } else {
        delivered.then(Vec::new)
    }
}

/// How a rollout's command ended, from its lifecycle event.
pub fn end_of(ev: &LifecycleEvent) -> End {
    End {
        state: ev.state,
        rejected: matches!(ev.outcome, Some(Outcome::Rejected { .. })),
        result: text(ev.outcome.as_ref(), ev.error.as_ref())
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    }
}

/// The send of `step` (a device's command, or its rollback) as the queue
/// takes it: its id, derived from (rollout, step) so a send repeated after
/// a crash is the same command; the request, unsigned; and the artifact
/// whose envelope signs it (`None`: nothing to send).
pub fn request<'a>(
    r: &'a Rollout,
    step: &str,
    device: &str,
    rollback: bool,
) -> Option<(CommandId, SendRequest, Option<&'a str>)> {
    let (target, payload, artifact) = what_to_send(r, device, rollback)?;
    let req = SendRequest {
        target,
        payload,
        opts: crate::SendOptions {
            priority: r.plan.priority,
            // A rollback is worth a retry; the change gets the plan's.
            max_attempts: Some(if rollback {
                r.plan.max_attempts.max(3)
            } else {
                r.plan.max_attempts
            }),
            ..Default::default()
        },
        origin: "rollout".into(),
        signature: None,
    };
    Some((step_command_id(r.id, step), req, artifact))
}

/// What a device's send is: (target, payload, artifact). Through boxes
/// below, an edge's command is its plan, for its runner (`edge/rollout`),
/// carrying the artifact so the edge stages it before it starts; its
/// rollback goes to the devices below it that its plan named (`None`:
/// nothing to send).
fn what_to_send<'a>(
    r: &'a Rollout,
    device: &str,
    rollback: bool,
) -> Option<(String, Vec<u8>, Option<&'a str>)> {
    let plan = r.edges.iter().find(|(e, _)| e == device).map(|(_, p)| p);
    match (plan, rollback) {
        (None, false) => Some((
            device.to_string(),
            r.plan.payload.clone(),
            r.plan.artifact.as_deref(),
        )),
        (None, true) => Some((device.to_string(), r.plan.on_abort.clone()?, None)),
        (Some(p), false) => Some((
            format!("{device}/{}", super::ROLLOUT),
            serde_json::to_vec(p).ok()?,
            r.plan.artifact.as_deref(),
        )),
        // One command for the edge's devices: its plan's first target
        // (a plan through an edge names one target below it, as a rule).
        (Some(p), true) => Some((
            format!("{device}/{}", p.target.first()?),
            r.plan.on_abort.clone()?,
            None,
        )),
    }
}
