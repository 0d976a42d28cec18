//! Subject and stream names under a prefix, and the parsing of input subjects.
//!
//! Every name the coordinator publishes on or listens to is built here, so that the prefix rules live in
//! one place. This module only builds and reads names; it does not talk to NATS.

use crate::messages::EventKind;

/// The prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "gpu";

/// The longest service id.
pub const MAX_SERVICE_ID_LEN: usize = 64;

/// Whether `s` is a service id: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn valid_service_id(s: &str) -> bool {
    (1..=MAX_SERVICE_ID_LEN).contains(&s.len()) && s.bytes().all(is_token_byte)
}

/// Whether `s` is a host name as node agents give it (the `<host>` of `<prefix>.node.<host>` and of
/// GPU ids `<host>/<id>`): the same characters as a service id.
pub fn valid_host(s: &str) -> bool {
    valid_service_id(s)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The kinds of input, the `<kind>` token of `<prefix>.<kind>.<svc>` on the input stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Request,
    Release,
    Renew,
    Ack,
    Cancel,
}

impl InputKind {
    /// Every kind, in the order of the contract.
    pub const ALL: [InputKind; 5] = [
        InputKind::Request,
        InputKind::Release,
        InputKind::Renew,
        InputKind::Ack,
        InputKind::Cancel,
    ];

    /// The subject token, e.g. `request`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Request => "request",
            InputKind::Release => "release",
            InputKind::Renew => "renew",
            InputKind::Ack => "ack",
            InputKind::Cancel => "cancel",
        }
    }

    /// The inverse of [`InputKind::as_str`].
    pub fn from_token(token: &str) -> Option<Self> {
        InputKind::ALL.into_iter().find(|k| k.as_str() == token)
    }
}

/// The names under one prefix (default `gpu`). Methods that take a service id do not check it: callers
/// pass ids that came through [`Subjects::parse_input`] or [`valid_service_id`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Subjects {
    /// The names under `prefix`: one or more non-empty tokens of `[A-Za-z0-9_-]` separated by `.`.
    pub fn new(prefix: &str) -> Result<Subjects, String> {
        if prefix.is_empty() {
            return Err(
                "the subject prefix is empty: expected tokens of A-Z, a-z, 0-9, `_` and `-` \
                        separated by `.`, e.g. `gpu`"
                    .to_owned(),
            );
        }
        for token in prefix.split('.') {
            if token.is_empty() {
                return Err(format!(
                    "the subject prefix {prefix:?} has an empty token: tokens are separated by a \
                     single `.`, with none at either end"
                ));
            }
            if let Some(bad) = token
                .chars()
                .find(|&c| !c.is_ascii() || !is_token_byte(c as u8))
            {
                return Err(format!(
                    "the subject prefix {prefix:?} holds {bad:?}: expected only A-Z, a-z, 0-9, `_` \
                     and `-` in tokens separated by `.`"
                ));
            }
        }
        Ok(Subjects {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix, e.g. `gpu`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.request.<svc>`
    pub fn request(&self, svc: &str) -> String {
        self.input(InputKind::Request, svc)
    }

    /// `<prefix>.release.<svc>`
    pub fn release(&self, svc: &str) -> String {
        self.input(InputKind::Release, svc)
    }

    /// `<prefix>.renew.<svc>`
    pub fn renew(&self, svc: &str) -> String {
        self.input(InputKind::Renew, svc)
    }

    /// `<prefix>.ack.<svc>`
    pub fn ack(&self, svc: &str) -> String {
        self.input(InputKind::Ack, svc)
    }

    /// `<prefix>.cancel.<svc>`
    pub fn cancel(&self, svc: &str) -> String {
        self.input(InputKind::Cancel, svc)
    }

    /// `<prefix>.<kind>.<svc>` for an input kind.
    pub fn input(&self, kind: InputKind, svc: &str) -> String {
        format!("{}.{}.{svc}", self.prefix, kind.as_str())
    }

    /// `<prefix>.reply.<svc>`
    pub fn reply(&self, svc: &str) -> String {
        format!("{}.reply.{svc}", self.prefix)
    }

    /// `<prefix>.control.<svc>`
    pub fn control(&self, svc: &str) -> String {
        format!("{}.control.{svc}", self.prefix)
    }

    /// `<prefix>.event.<kind>.<svc>`
    pub fn event(&self, kind: EventKind, svc: &str) -> String {
        format!("{}.event.{}.{svc}", self.prefix, kind.as_str())
    }

    /// `<prefix>.status` (request-reply, not stored).
    pub fn status(&self) -> String {
        format!("{}.status", self.prefix)
    }

    /// `<prefix>.node.<host>` (core NATS, not stored): a node agent's samples of its host's GPUs
    /// ([`NodeSample`](crate::NodeSample)).
    pub fn node(&self, host: &str) -> String {
        format!("{}.node.{host}", self.prefix)
    }

    /// `<prefix>.node.*`: every node agent's samples.
    pub fn nodes(&self) -> String {
        format!("{}.node.*", self.prefix)
    }

    /// The host of a node subject `<prefix>.node.<host>`, if `subject` is one.
    pub fn parse_node(&self, subject: &str) -> Option<String> {
        let host = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".node.")?;
        valid_host(host).then(|| host.to_owned())
    }

    /// `<prefix>.reader.<svc>` (request-reply, not stored): a service asks the coordinator to make it a
    /// pull consumer of its own replies or control orders ([`ReaderAsk`](crate::ReaderAsk)). Only the
    /// coordinator makes consumers when each service has its own NATS user: a consumer made by a
    /// service could carry a deliver subject, and nats-server would push the stream's messages there,
    /// onto another service's input or reply subject.
    pub fn reader(&self, svc: &str) -> String {
        format!("{}.reader.{svc}", self.prefix)
    }

    /// Whether `subject` is an inbox that a request-reply may be answered on: a first token `_INBOX`
    /// or `_INBOX_<user>`, at least one more token, no wildcard, and nothing under this prefix. A
    /// coordinator answers only there: an answer published on a subject a stream keeps (an input, a
    /// reply, a JetStream API call) would be taken for what that subject carries.
    pub fn is_inbox(&self, subject: &str) -> bool {
        let Some((first, rest)) = subject.split_once('.') else {
            return false;
        };
        let inbox = first == "_INBOX"
            || first
                .strip_prefix("_INBOX_")
                .is_some_and(|user| !user.is_empty());
        inbox
            && !rest.is_empty()
            && subject
                .split('.')
                .all(|t| !t.is_empty() && t != "*" && t != ">")
            && !subject.starts_with(&format!("{}.", self.prefix))
    }

    /// The input stream, e.g. `GPU_INPUT`.
    pub fn input_stream(&self) -> String {
        format!("{}_INPUT", self.stream_base())
    }

    /// The output stream, e.g. `GPU_OUTPUT`.
    pub fn output_stream(&self) -> String {
        format!("{}_OUTPUT", self.stream_base())
    }

    /// The journal stream of the write-behind mode, e.g. `GPU_JOURNAL`: the coordinator's own, not part
    /// of the wire contract.
    pub fn journal_stream(&self) -> String {
        format!("{}_JOURNAL", self.stream_base())
    }

    /// `<prefix>.journal`: the subject of [`Subjects::journal_stream`].
    pub fn journal(&self) -> String {
        format!("{}.journal", self.prefix)
    }

    /// The prefix upper-cased with `-` and `.` turned into `_`: stream names may not hold `.`.
    fn stream_base(&self) -> String {
        self.prefix
            .chars()
            .map(|c| match c {
                '-' | '.' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect()
    }

    /// The subjects of the input stream: `<prefix>.<kind>.*` for every input kind.
    pub fn input_subjects(&self) -> Vec<String> {
        InputKind::ALL
            .iter()
            .map(|kind| self.input(*kind, "*"))
            .collect()
    }

    /// The subjects of the output stream: `<prefix>.reply.*`, `<prefix>.control.*`,
    /// `<prefix>.event.*.*`.
    pub fn output_subjects(&self) -> Vec<String> {
        vec![self.reply("*"), self.control("*"), self.event_wildcard()]
    }

    fn event_wildcard(&self) -> String {
        format!("{}.event.*.*", self.prefix)
    }

    /// Reads an input subject `<prefix>.<kind>.<svc>` into its kind and service id, or says what is
    /// wrong with it.
    pub fn parse_input(&self, subject: &str) -> Result<(InputKind, String), String> {
        let shape = || {
            format!(
                "the subject {} is not an input subject: expected `{}.<kind>.<service id>` with \
                 <kind> one of request, release, renew, ack, cancel",
                crate::codec::quote(subject),
                self.prefix
            )
        };
        let (kind, svc) = self.split_input(subject).ok_or_else(shape)?;
        let Some(kind) = InputKind::from_token(kind) else {
            return Err(shape());
        };
        if !valid_service_id(svc) {
            return Err(format!(
                "the service id {} in the subject {} is not valid: expected 1 to 64 characters of \
                 A-Z, a-z, 0-9, `_` and `-`",
                crate::codec::quote(svc),
                crate::codec::quote(subject)
            ));
        }
        Ok((kind, svc.to_owned()))
    }

    /// The service id of a subject `<prefix>.<token>.<svc>` when `<svc>` is a valid one, whatever the
    /// token: where to send a `rejected` reply for a subject that [`Subjects::parse_input`] refuses.
    pub(crate) fn service_of(&self, subject: &str) -> Option<String> {
        let (_, svc) = self.split_input(subject)?;
        valid_service_id(svc).then(|| svc.to_owned())
    }

    /// `<prefix>.<a>.<b>` into `(a, b)`.
    fn split_input<'s>(&self, subject: &'s str) -> Option<(&'s str, &'s str)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?;
        let (kind, svc) = rest.split_once('.')?;
        (!svc.contains('.')).then_some((kind, svc))
    }
}
