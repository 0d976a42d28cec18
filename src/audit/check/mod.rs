//! The rules a history must keep, checked one record at a time with no I/O: fed the output stream in
//! order (and which requests asked for a whole GPU, from the input stream), [`Checker`] answers the first
//! violation with the records that show it, or a summary.
//!
//! The rules:
//! - per GPU, at every instant, the holders' VRAM fits its capacity and a whole-GPU holder is alone
//!   (a holder asked to pause still holds until its `paused` or `revoked`);
//! - fences strictly increase over every `granted` and `resumed`;
//! - in particular, a grant or resume beside a holder that is pausing (neither ACKed nor revoked) fits
//!   with that holder's VRAM still counted: the room a pause makes is only used once it is made;
//! - every request ends at most once (`released`, `timed_out`, `cancelled`, `revoked`, or `rejected`
//!   after it was `requested`), and nothing happens to it after its end;
//! - every `granted` reply has its `granted` (or `resumed`) event, same request and fence, and every
//!   `granted` event its reply.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use gpu_coordinator_wire::{Control, ControlAction, Event, EventKind, Outcome, Reply};

/// How many records that touched a GPU or a request are kept to show with a violation.
const CONTEXT: usize = 8;

/// One message of the output stream, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reply(Reply),
    Control(Control),
    Event(Event),
}

/// A record of the history: where it is in the stream, and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The output stream's sequence.
    pub seq: u64,
    pub subject: String,
    pub output: Output,
}

impl Output {
    /// The output with its request id scoped to `service` (see [`gpu_coordinator_core::SCOPE`]): the
    /// checker tells the requests of two services apart by it, as the coordinator does.
    pub fn scoped(mut self, service: &str) -> Output {
        let scope = |id: &mut String| *id = gpu_coordinator_core::scoped(service, id);
        match &mut self {
            Output::Reply(r) => scope(&mut r.request_id),
            Output::Control(c) => scope(&mut c.request_id),
            Output::Event(e) => {
                if let Some(id) = &mut e.request_id {
                    scope(id)
                }
            }
        }
        self
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Shown as it was published.
        let unscope = |id: &str| gpu_coordinator_core::unscoped(id).to_owned();
        let body = match &self.output {
            Output::Reply(r) => serde_json::to_string(&Reply {
                request_id: unscope(&r.request_id),
                ..r.clone()
            }),
            Output::Control(c) => serde_json::to_string(&Control {
                request_id: unscope(&c.request_id),
                ..c.clone()
            }),
            Output::Event(e) => serde_json::to_string(&Event {
                request_id: e.request_id.as_deref().map(unscope),
                ..e.clone()
            }),
        }
        .unwrap_or_default();
        write!(f, "#{} {} {}", self.seq, self.subject, body)
    }
}

/// A broken rule, with the records that show it (oldest first, the offending one last).
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub rule: String,
    pub records: Vec<Record>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Request ids in the rule are shown as their services wrote them.
        writeln!(
            f,
            "VIOLATION: {}",
            gpu_coordinator_core::unscope_text(&self.rule)
        )?;
        for r in &self.records {
            writeln!(f, "  {r}")?;
        }
        Ok(())
    }
}

/// What a history held, when it kept every rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub requests: u64,
    pub grants: u64,
    pub resumes: u64,
    pub preemptions: u64,
    pub releases: u64,
    pub timeouts: u64,
    pub cancels: u64,
    pub rejections: u64,
    /// Revocations by cause: `expired`, `no pause ACK`, `refused by the lease store`, `other`.
    pub revocations: BTreeMap<String, u64>,
    /// Requests still live at the end of the history.
    pub live: u64,
    /// Requests stored in the input stream (acknowledged to their service) that no event mentions:
    /// not yet handled while the coordinator runs, lost if it stays so once it is idle.
    pub unheard: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "history: {} records", self.records)?;
        writeln!(
            f,
            "requests: {} ({} still live at the end)",
            self.requests, self.live
        )?;
        if self.unheard > 0 {
            writeln!(
                f,
                "stored but not yet answered: {} request(s) in the input stream that no event mentions",
                self.unheard
            )?;
        }
        writeln!(
            f,
            "grants: {}, resumes: {}, preemptions: {}",
            self.grants, self.resumes, self.preemptions
        )?;
        writeln!(
            f,
            "ends: {} released, {} timed out, {} cancelled, {} rejected, {} revoked",
            self.releases,
            self.timeouts,
            self.cancels,
            self.rejections,
            self.revocations.values().sum::<u64>()
        )?;
        for (cause, n) in &self.revocations {
            writeln!(f, "  revoked ({cause}): {n}")?;
        }
        write!(f, "every rule held")
    }
}

#[derive(Debug, Clone)]
struct Holder {
    fence: u64,
    vram_mb: u64,
    whole: bool,
    pausing: bool,
}

/// Checks a history record by record.
#[derive(Debug, Default)]
pub struct Checker {
    /// GPU id -> capacity in MB (a GPU not listed is checked for exclusivity only).
    capacity: HashMap<String, u64>,
    /// Requests that asked for a whole GPU.
    whole: HashSet<String>,
    /// Requests stored in the input stream, and those some event mentions.
    stored: HashSet<String>,
    mentioned: HashSet<String>,
    holders: BTreeMap<String, BTreeMap<String, Holder>>,
    /// The VRAM of each request's last grant (a resume holds as much again).
    held_mb: HashMap<String, u64>,
    last_fence: Option<(u64, Record)>,
    /// Requests that were `requested`, and those that ended (with the record that ended them).
    requested: HashSet<String>,
    ended: HashMap<String, Record>,
    /// Expired leases: their `revoked` that follows counts as an expiry.
    expired: HashSet<String>,
    /// `(request, fence)` of granted replies and events not yet matched by the other.
    replies_alone: BTreeMap<(String, u64), Record>,
    events_alone: BTreeMap<(String, u64), Record>,
    granted_events: HashSet<(String, u64)>,
    granted_replies: HashSet<(String, u64)>,
    /// Recent records per GPU and per request, shown with a violation.
    context: HashMap<String, VecDeque<Record>>,
    summary: Summary,
}

impl Checker {
    /// A checker for GPUs of these capacities, knowing which requests asked for a whole GPU.
    pub fn new(capacity: HashMap<String, u64>, whole: HashSet<String>) -> Checker {
        Checker {
            capacity,
            whole,
            ..Checker::default()
        }
    }

    /// Also counts the requests of `stored` (ids stored in the input stream) that no event mentions
    /// ([`Summary::unheard`]).
    pub fn with_stored(mut self, stored: HashSet<String>) -> Checker {
        self.stored = stored;
        self
    }

    /// Checks one more record.
    pub fn feed(&mut self, record: Record) -> Result<(), Violation> {
        self.summary.records += 1;
        match &record.output {
            Output::Reply(reply) => self.on_reply(reply.clone(), &record),
            Output::Control(control) => {
                if control.action == ControlAction::Resume {
                    self.remember(&format!("req:{}", control.request_id), &record);
                }
                Ok(())
            }
            Output::Event(event) => self.on_event(event.clone(), &record),
        }
    }

    /// The summary, once the whole history was fed, or the unmatched grant that breaks the last rule.
    pub fn finish(mut self) -> Result<Summary, Violation> {
        if let Some((_, record)) = self.replies_alone.into_iter().next() {
            return Err(Violation {
                rule: "a `granted` reply has no `granted` event".into(),
                records: vec![record],
            });
        }
        if let Some((_, record)) = self.events_alone.into_iter().next() {
            return Err(Violation {
                rule: "a `granted` event has no `granted` reply".into(),
                records: vec![record],
            });
        }
        self.summary.live = self
            .requested
            .iter()
            .filter(|r| !self.ended.contains_key(*r))
            .count() as u64;
        self.summary.unheard = self
            .stored
            .iter()
            .filter(|r| !self.mentioned.contains(*r))
            .count() as u64;
        Ok(self.summary)
    }

    fn remember(&mut self, key: &str, record: &Record) {
        let recent = self.context.entry(key.to_owned()).or_default();
        recent.push_back(record.clone());
        if recent.len() > CONTEXT {
            recent.pop_front();
        }
    }

    fn violation(&self, rule: String, keys: &[String], record: &Record) -> Violation {
        let mut records: Vec<Record> = keys
            .iter()
            .filter_map(|k| self.context.get(k))
            .flatten()
            .filter(|r| r.seq != record.seq)
            .cloned()
            .collect();
        records.sort_by_key(|r| r.seq);
        records.dedup_by_key(|r| r.seq);
        records.push(record.clone());
        Violation { rule, records }
    }

    fn on_reply(&mut self, reply: Reply, record: &Record) -> Result<(), Violation> {
        if reply.outcome != Outcome::Granted {
            return Ok(());
        }
        let Some(fence) = reply.fence else {
            return Ok(());
        };
        if let Some(mb) = reply.vram_mb {
            self.held_mb.insert(reply.request_id.clone(), mb);
        }
        let key = (reply.request_id.clone(), fence);
        self.remember(&format!("req:{}", reply.request_id), record);
        if self.granted_replies.insert(key.clone()) {
            self.events_alone.remove(&key);
            if !self.granted_events.contains(&key) {
                self.replies_alone.insert(key, record.clone());
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event, record: &Record) -> Result<(), Violation> {
        let Some(id) = event.request_id.clone() else {
            if event.kind == EventKind::Rejected {
                self.summary.rejections += 1;
            }
            return Ok(());
        };
        if !self.mentioned.contains(&id) {
            self.mentioned.insert(id.clone());
        }
        let req_key = format!("req:{id}");
        self.remember(&req_key, record);
        if let Some(gpu) = &event.gpu {
            self.remember(&format!("gpu:{gpu}"), record);
        }
        let ends = match event.kind {
            EventKind::Released
            | EventKind::TimedOut
            | EventKind::Cancelled
            | EventKind::Revoked => true,
            // A rejected input about a live request carries no priority; a rejected request does.
            EventKind::Rejected => event.priority.is_some(),
            _ => false,
        };
        if let Some(end) = self.ended.get(&id) {
            if ends || event.kind != EventKind::Rejected {
                let rule = format!(
                    "request `{id}` has a `{}` event after it ended (#{})",
                    event.kind.as_str(),
                    end.seq
                );
                return Err(self.violation(rule, &[req_key], record));
            }
        }
        match event.kind {
            EventKind::Requested => {
                self.summary.requests += 1;
                self.requested.insert(id.clone());
            }
            EventKind::Granted | EventKind::Resumed => self.on_grant(&event, id.clone(), record)?,
            EventKind::Preempting => {
                self.summary.preemptions += 1;
                if let Some(h) = self.holder_mut(&event, &id) {
                    h.pausing = true;
                }
            }
            EventKind::Paused => self.drop_holder(&event, &id),
            EventKind::Expired => {
                self.expired.insert(id.clone());
                self.drop_holder(&event, &id);
            }
            EventKind::Released => self.summary.releases += 1,
            EventKind::TimedOut => self.summary.timeouts += 1,
            EventKind::Cancelled => self.summary.cancels += 1,
            EventKind::Rejected => self.summary.rejections += 1,
            EventKind::Revoked => {
                let detail = event.detail.as_deref().unwrap_or_default();
                let cause = if self.expired.remove(&id) {
                    "expired"
                } else if detail.contains("ACK") {
                    "no pause ACK"
                } else if detail.contains("lease store") || detail.contains("Redis") {
                    "refused by the lease store"
                } else {
                    "other"
                };
                *self.summary.revocations.entry(cause.into()).or_default() += 1;
            }
            EventKind::Queued | EventKind::Renewed => {}
        }
        if ends {
            self.drop_holder(&event, &id);
            self.ended.insert(id, record.clone());
        }
        Ok(())
    }

    fn holder_mut(&mut self, event: &Event, id: &str) -> Option<&mut Holder> {
        let gpu = event.gpu.as_ref()?;
        self.holders.get_mut(gpu)?.get_mut(id)
    }

    fn drop_holder(&mut self, event: &Event, id: &str) {
        match &event.gpu {
            Some(gpu) => {
                if let Some(on) = self.holders.get_mut(gpu) {
                    on.remove(id);
                }
            }
            None => self.holders.values_mut().for_each(|on| {
                on.remove(id);
            }),
        }
    }

    fn on_grant(&mut self, event: &Event, id: String, record: &Record) -> Result<(), Violation> {
        let req_key = format!("req:{id}");
        let (Some(gpu), Some(fence)) = (event.gpu.clone(), event.fence) else {
            let rule = format!("`{}` of `{id}` names no GPU or fence", event.kind.as_str());
            return Err(self.violation(rule, &[req_key], record));
        };
        let gpu_key = format!("gpu:{gpu}");
        if let Some((last, at)) = &self.last_fence {
            if fence <= *last {
                let rule = format!(
                    "fence {fence} of `{id}` does not rise above fence {last} (#{})",
                    at.seq
                );
                let mut v = self.violation(rule, &[req_key], record);
                v.records.insert(0, at.clone());
                return Err(v);
            }
        }
        self.last_fence = Some((fence, record.clone()));
        let key = (id.clone(), fence);
        self.granted_events.insert(key.clone());
        let replied =
            self.replies_alone.remove(&key).is_some() || self.granted_replies.contains(&key);
        if event.kind == EventKind::Granted {
            self.summary.grants += 1;
            if !replied {
                self.events_alone.insert(key, record.clone());
            }
        } else {
            // A resume is ordered by `resume`, not replied to; a `granted` reply under its fence (the
            // answer to a repeated request) is matched by it all the same.
            self.summary.resumes += 1;
        }
        // The event says the GPU's capacity (with node agents, the only place the history has it).
        if let Some(capacity) = event.capacity_mb {
            self.capacity.insert(gpu.clone(), capacity);
        }
        let on = self.holders.entry(gpu.clone()).or_default();
        let whole = self.whole.contains(&id);
        let capacity = self.capacity.get(&gpu).copied();
        // A whole-GPU lease holds the GPU it is on (a resume may move it to another size of GPU).
        let vram_mb = if whole { capacity } else { None }
            .or_else(|| self.held_mb.get(&id).copied())
            .unwrap_or(0);
        on.insert(
            id.clone(),
            Holder {
                fence,
                vram_mb,
                whole,
                pausing: false,
            },
        );
        self.check_gpu(&gpu, capacity, [gpu_key, req_key], record)
    }

    /// The holders of `gpu` now: a whole-GPU holder alone, and within `capacity` when known.
    fn check_gpu(
        &self,
        gpu: &str,
        capacity: Option<u64>,
        keys: [String; 2],
        record: &Record,
    ) -> Result<(), Violation> {
        let Some(on) = self.holders.get(gpu) else {
            return Ok(());
        };
        let used: u64 = on.values().map(|h| h.vram_mb).sum();
        let holders: Vec<String> = on
            .iter()
            .map(|(r, h)| {
                let pausing = if h.pausing {
                    ", still pausing: no ACK, no revoke"
                } else {
                    ""
                };
                format!("`{r}` (fence {}, {} MB{pausing})", h.fence, h.vram_mb)
            })
            .collect();
        if on.len() > 1 && on.values().any(|h| h.whole) {
            let rule = format!(
                "GPU {gpu} has a whole-GPU holder beside others: {}",
                holders.join(", ")
            );
            return Err(self.violation(rule, &keys, record));
        }
        if let Some(capacity) = capacity {
            if used > capacity {
                let rule = format!(
                    "GPU {gpu} holds {used} MB of {capacity} MB: {}",
                    holders.join(", ")
                );
                return Err(self.violation(rule, &keys, record));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
