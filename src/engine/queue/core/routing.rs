//! Routing state: device and origin indexes, a target resolved to a route
//! (a device, a broadcast, a pool), capability pools, relabelling.

use super::*;

impl QueueCore {
    /// Resolve a target: one device, a capability pool, or the devices a
    /// broadcast fans out to (those with the tag now).
    pub(super) fn route(&mut self, target: &str) -> Result<Route, QueueError> {
        let t = Target::parse(target).map_err(|e| {
            QueueError::BadRequest(format!(
                "{e}; a target is a device id (dev-7), tag:NAME or cap:NAME"
            ))
        })?;
        match t {
            Target::Device(id) => {
                let d = self.enrolled(id)?;
                if self.is_gateway(d) {
                    return Err(QueueError::NoRoute(format!(
                        "`{id}` is a box below this one; address its devices as `{id}/DEVICE`, `{id}/tag:T` or `{id}/cap:C`"
                    )));
                }
                Ok(Route::Device(d))
            }
            Target::Tag(tag) => {
                let devs: Vec<u32> = self
                    .devs
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| {
                        d.record
                            .as_ref()
                            .is_some_and(|r| !r.revoked && r.has_tag(tag))
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                if devs.is_empty() {
                    return Err(QueueError::NoRoute(format!(
                        "no enrolled device has tag `{tag}`; add it with `outpost tag DEVICE --add {tag}`"
                    )));
                }
                Ok(Route::Broadcast(devs))
            }
            Target::Cap(cap) => match self.dev_index.get(target) {
                Some(&p) if !self.devs[p as usize].members.is_empty() => Ok(Route::Pool(p)),
                _ => Err(QueueError::NoRoute(format!(
                    "no enrolled device has capability `{cap}`; add it with `outpost tag DEVICE --add-cap {cap}`"
                ))),
            },
            Target::Edge { edge, .. } => self.route_edge(edge, target),
        }
    }

    /// An enrolled, not revoked device.
    pub(super) fn enrolled(&self, id: &str) -> Result<u32, QueueError> {
        let d = self
            .dev_index
            .get(id)
            .copied()
            .filter(|&d| self.devs[d as usize].record.is_some())
            .ok_or_else(|| QueueError::UnknownDevice(id.to_string()))?;
        if self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.revoked)
        {
            return Err(QueueError::Revoked(id.to_string()));
        }
        Ok(d)
    }

    /// Bring a device's pool memberships in line with its record, and the
    /// pools it serves in line with its session's Hello.
    pub(super) fn index_caps(&mut self, d: u32) {
        let caps: Vec<String> = match &self.devs[d as usize].record {
            Some(r) if !r.revoked => r.caps.clone(),
            _ => Vec::new(),
        };
        let mut pools = Vec::with_capacity(caps.len());
        for c in &caps {
            pools.push(self.dev(&format!("cap:{c}")));
        }
        for (i, dev) in self.devs.iter_mut().enumerate() {
            if dev.pool && !pools.contains(&(i as u32)) {
                dev.members.retain(|&m| m != d);
            }
        }
        for &p in &pools {
            let m = &mut self.devs[p as usize].members;
            if !m.contains(&d) {
                m.push(d);
            }
        }
        // A Hello may narrow what the device serves, never widen it.
        let dev = &mut self.devs[d as usize];
        dev.serves = caps
            .iter()
            .zip(&pools)
            .filter(|(c, _)| dev.offered.as_ref().is_none_or(|o| o.contains(c)))
            .map(|(_, &p)| p)
            .collect();
    }

    /// Change an enrolled device's tags and capabilities. New broadcasts
    /// and `cap:` commands follow the new labels; commands already routed
    /// stay where they are.
    pub fn relabel(&mut self, r: Relabel, now: Millis) -> Result<DeviceRecord, QueueError> {
        for (names, what) in [
            (&r.add_tags, "tag"),
            (&r.remove_tags, "tag"),
            (&r.add_caps, "capability"),
            (&r.remove_caps, "capability"),
        ] {
            for n in names {
                check_name(n, what).map_err(|e| QueueError::BadRequest(e.to_string()))?;
            }
        }
        let d = self.enrolled(&r.device)?;
        let rec = self.devs[d as usize].record.as_mut().expect("enrolled");
        fn apply(list: &mut Vec<String>, add: &[String], remove: &[String]) {
            list.retain(|x| !remove.contains(x));
            for a in add {
                if !list.contains(a) {
                    list.push(a.clone());
                }
            }
            list.sort();
        }
        apply(&mut rec.tags, &r.add_tags, &r.remove_tags);
        apply(&mut rec.caps, &r.add_caps, &r.remove_caps);
        let rec = rec.clone();
        self.effects.device_writes.push(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.index_caps(d);
        self.pump(d, now);
        Ok(rec)
    }

    pub(super) fn dev(&mut self, id: &str) -> u32 {
        if let Some(&d) = self.dev_index.get(id) {
            return d;
        }
        let d = self.devs.len() as u32;
        self.devs.push(Dev::new(id.to_string()));
        self.dev_index.insert(id.to_string(), d);
        d
    }

    pub(super) fn origin(&mut self, o: &str) -> u32 {
        if let Some(&i) = self.origin_index.get(o) {
            return i;
        }
        let i = self.origins.len() as u32;
        self.origins.push(o.to_string());
        self.origin_index.insert(o.to_string(), i);
        i
    }
}
