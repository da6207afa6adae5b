//! The order in which an edge takes its hub's frames about one command.
//!
//! Taking a `Forward` or a `Cancel` takes time (an artifact staged, a job
//! handed to its runner, the writer's round), and the edge takes frames
//! about different commands side by side. Frames about the same command
//! must not overlap: a `Cancel` that looked for a command while its
//! `Forward` was still being taken found nothing, and the command ran
//! though the hub had cancelled it; and a `Cancel` that records a
//! `cancelled` end for a command the edge never got must not race the
//! late `Forward` it is meant to stop. So each command has a lane: one
//! frame is taken at a time, the rest wait in arrival order.

use crate::engine::command::CommandId;
use std::collections::{HashMap, VecDeque};

/// Frames of type `T` in lanes by command id.
#[derive(Debug)]
pub struct Lanes<T> {
    /// A command with a frame being taken, and the frames waiting behind it.
    busy: HashMap<CommandId, VecDeque<T>>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            busy: HashMap::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// A frame about `id` came: `Some` to take it now, or `None` when it
    /// waits behind another frame about `id`.
    pub fn arrive(&mut self, id: CommandId, frame: T) -> Option<T> {
        match self.busy.get_mut(&id) {
            Some(waiting) => {
                waiting.push_back(frame);
                None
            }
            None => {
                self.busy.insert(id, VecDeque::new());
                Some(frame)
            }
        }
    }

    /// The frame being taken for `id` is done: the next to take, if any.
    pub fn done(&mut self, id: CommandId) -> Option<T> {
        let waiting = self.busy.get_mut(&id)?;
        match waiting.pop_front() {
            Some(next) => Some(next),
            None => {
                self.busy.remove(&id);
                None
            }
        }
    }

    /// Whether a frame about `id` is being taken.
    #[cfg(test)]
    pub fn is_busy(&self, id: CommandId) -> bool {
        self.busy.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> CommandId {
        CommandId(n)
    }

    #[test]
    fn frames_about_one_command_are_taken_one_at_a_time_in_arrival_order() {
        let mut l = Lanes::default();
        assert_eq!(l.arrive(id(1), "forward"), Some("forward"));
        assert_eq!(l.arrive(id(1), "cancel"), None);
        assert_eq!(l.arrive(id(1), "forward again"), None);
        assert!(l.is_busy(id(1)));
        assert_eq!(l.done(id(1)), Some("cancel"));
        assert_eq!(l.done(id(1)), Some("forward again"));
        assert_eq!(l.done(id(1)), None);
        assert!(!l.is_busy(id(1)));
        // The lane is free again: the next frame is taken at once.
        assert_eq!(l.arrive(id(1), "cancel"), Some("cancel"));
    }

    #[test]
    fn frames_about_other_commands_do_not_wait() {
        let mut l = Lanes::default();
        assert_eq!(l.arrive(id(1), 'a'), Some('a'));
        assert_eq!(l.arrive(id(2), 'b'), Some('b'));
        assert_eq!(l.arrive(id(1), 'c'), None);
        assert_eq!(l.done(id(2)), None);
        assert_eq!(l.done(id(1)), Some('c'));
        assert_eq!(l.done(id(1)), None);
        // A done for a lane that is not busy is nothing.
        assert_eq!(l.done(id(3)), None);
    }
}
