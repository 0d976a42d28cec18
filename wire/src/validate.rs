//! Decoding and validation of inputs: from a subject, a `Content-Type` and a payload to an [`Inbound`]
//! the scheduler can trust, or a [`Rejection`] that says, for a person, what to fix.
//!
//! The checks here are the contract's rules about a single message (ranges, ids, subjects). Rules that
//! need state (an unknown `request_id`, a stale fence) belong to the scheduler. Nothing here panics on
//! any input.

use crate::codec::{self, quote, Encoding, Node};
use crate::messages::{AckMsg, CancelMsg, ReleaseMsg, RenewMsg, RequestMsg};
use crate::subjects::{InputKind, Subjects};

/// The longest `request_id`, in characters.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The longest `gpu` id, in characters.
pub const MAX_GPU_ID_LEN: usize = 64;

/// A [`Rejection`] carries a `request_id` it read from a refused payload only up to this many
/// characters (so that an oversized id still reaches its sender, but not an unbounded one).
pub const MAX_ECHOED_REQUEST_ID_LEN: usize = 1024;

/// A decoded, valid input. `RequestMsg::request_id` and `service_id` are always `Some` here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Request(RequestMsg),
    Release(ReleaseMsg),
    Renew(RenewMsg),
    Ack(AckMsg),
    Cancel(CancelMsg),
}

impl Inbound {
    /// The kind of input this is.
    pub fn kind(&self) -> InputKind {
        match self {
            Inbound::Request(_) => InputKind::Request,
            Inbound::Release(_) => InputKind::Release,
            Inbound::Renew(_) => InputKind::Renew,
            Inbound::Ack(_) => InputKind::Ack,
            Inbound::Cancel(_) => InputKind::Cancel,
        }
    }

    /// The request the input is about (`None` for a release of everything the service holds).
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Inbound::Request(m) => m.request_id.as_deref(),
            Inbound::Release(m) => m.request_id.as_deref(),
            Inbound::Renew(m) => Some(&m.request_id),
            Inbound::Ack(m) => Some(&m.request_id),
            Inbound::Cancel(m) => Some(&m.request_id),
        }
    }
}

/// A decoded input with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The subject's `<svc>` (already checked: 1-64 of `[A-Za-z0-9_-]`).
    pub service: String,
    pub encoding: Encoding,
    pub input: Inbound,
}

/// An input that cannot be accepted, with what is known of it, so that a `rejected` reply and event can be
/// sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The service, when the subject names a valid one.
    pub service: Option<String>,
    pub encoding: Encoding,
    /// The request id, when it could be read: the payload's `request_id` when it is a string without
    /// control characters of at most [`MAX_ECHOED_REQUEST_ID_LEN`] characters, even if the rest of the
    /// payload is invalid; otherwise, for a request whose service is known, its default id
    /// `<svc>-<stream sequence>`.
    pub request_id: Option<String>,
    /// A sentence a person can act on: which field, what was expected, what came.
    pub error: String,
}

/// Decodes and validates one message of the input stream.
///
/// `subject` is the message's subject, `content_type` its `Content-Type` header, `stream_seq` its
/// sequence in the input stream (for the default `request_id` of a request, `<svc>-<stream_seq>`).
/// A valid request comes back with `request_id` and `service_id` filled in.
pub fn decode_input(
    subjects: &Subjects,
    subject: &str,
    content_type: Option<&str>,
    payload: &[u8],
    stream_seq: u64,
) -> Result<Decoded, Rejection> {
    let encoding = Encoding::from_content_type(content_type);
    let node = codec::decode_node(encoding, payload);
    let (kind, service) = match subjects.parse_input(subject) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Err(Rejection {
                service: subjects.service_of(subject),
                encoding,
                request_id: node.as_ref().ok().and_then(loose_request_id),
                error,
            })
        }
    };
    let reject = |request_id: Option<String>, error: String| {
        let request_id = request_id.or_else(|| {
            (kind == InputKind::Request).then(|| default_request_id(&service, stream_seq))
        });
        Rejection {
            service: Some(service.clone()),
            encoding,
            request_id,
            error,
        }
    };
    let node = node.map_err(|e| reject(None, e.0))?;
    let request_id = loose_request_id(&node);
    match check(subjects, kind, &service, &node, stream_seq) {
        Ok(input) => Ok(Decoded {
            service: service.clone(),
            encoding,
            input,
        }),
        Err(error) => Err(reject(request_id, error)),
    }
}

/// `<svc>-<stream sequence>`, the id of a request that does not name one.
pub fn default_request_id(svc: &str, stream_seq: u64) -> String {
    format!("{svc}-{stream_seq}")
}

fn check(
    subjects: &Subjects,
    kind: InputKind,
    svc: &str,
    node: &Node,
    stream_seq: u64,
) -> Result<Inbound, String> {
    check_service_id(subjects, kind, svc, node)?;
    let decode_err = |e: codec::DecodeError| e.0;
    match kind {
        InputKind::Request => {
            let mut msg: RequestMsg = codec::from_node(node).map_err(decode_err)?;
            if let Some(id) = &msg.request_id {
                check_request_id(id)?;
            }
            check_positive("lease_ms", msg.lease_ms, LEASE_HINT)?;
            check_positive("vram_mb", msg.vram_mb, VRAM_HINT)?;
            check_at_most("lease_ms", msg.lease_ms, MAX_DURATION_MS, "a year")?;
            check_at_most("timeout_ms", msg.timeout_ms, MAX_DURATION_MS, "a year")?;
            check_at_most("vram_mb", msg.vram_mb, MAX_VRAM_MB, "a petabyte")?;
            check_at_most("pause_ms", msg.pause_ms, MAX_PAUSE_MS, "an hour")?;
            if let Some(gpu) = &msg.gpu {
                check_gpu(gpu)?;
            }
            if let Some(host) = &msg.host {
                check_host(host, msg.gpu.as_deref())?;
            }
            msg.request_id
                .get_or_insert_with(|| default_request_id(svc, stream_seq));
            msg.service_id.get_or_insert_with(|| svc.to_owned());
            Ok(Inbound::Request(msg))
        }
        InputKind::Release => {
            let msg: ReleaseMsg = codec::from_node(node).map_err(decode_err)?;
            if let Some(id) = &msg.request_id {
                check_request_id(id)?;
            }
            Ok(Inbound::Release(msg))
        }
        InputKind::Renew => {
            let msg: RenewMsg = codec::from_node(node).map_err(decode_err)?;
            check_request_id(&msg.request_id)?;
            check_positive("lease_ms", msg.lease_ms, RENEW_HINT)?;
            check_at_most("lease_ms", msg.lease_ms, MAX_DURATION_MS, "a year")?;
            Ok(Inbound::Renew(msg))
        }
        InputKind::Ack => {
            let msg: AckMsg = codec::from_node(node).map_err(decode_err)?;
            check_request_id(&msg.request_id)?;
            Ok(Inbound::Ack(msg))
        }
        InputKind::Cancel => {
            let msg: CancelMsg = codec::from_node(node).map_err(decode_err)?;
            check_request_id(&msg.request_id)?;
            Ok(Inbound::Cancel(msg))
        }
    }
}

/// `service_id` names the subject's service when present, on every kind of input (only a request
/// declares it, but a mismatch anywhere means a confused sender).
fn check_service_id(
    subjects: &Subjects,
    kind: InputKind,
    svc: &str,
    node: &Node,
) -> Result<(), String> {
    match node.get("service_id") {
        None | Some(Node::Null) => Ok(()),
        Some(Node::Str(s)) if s == svc => Ok(()),
        Some(Node::Str(s)) => {
            let fix = if crate::subjects::valid_service_id(s) {
                format!(
                    "publish on `{}` or leave `service_id` out",
                    subjects.input(kind, s)
                )
            } else {
                format!("leave `service_id` out or set it to {}", quote(svc))
            };
            Err(format!(
                "field `service_id` is {} but the subject names the service {}: {fix}",
                quote(s),
                quote(svc),
            ))
        }
        Some(other) => Err(format!(
            "field `service_id`: expected a string, got {}",
            other.describe()
        )),
    }
}

fn check_request_id(id: &str) -> Result<(), String> {
    let len = id.chars().count();
    if len == 0 {
        return Err(format!(
            "field `request_id` must be 1 to {MAX_REQUEST_ID_LEN} characters, got an empty string"
        ));
    }
    if len > MAX_REQUEST_ID_LEN {
        return Err(format!(
            "field `request_id` must be 1 to {MAX_REQUEST_ID_LEN} characters, got {len} characters: {}",
            quote(id)
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!(
            "field `request_id` must not contain control characters, got {}",
            quote(id)
        ));
    }
    Ok(())
}

const LEASE_HINT: &str = "milliseconds; leave it out for the configured lease length";
const RENEW_HINT: &str = "milliseconds; leave it out to renew for the lease's own length";
const VRAM_HINT: &str = "megabytes; leave it out to ask for the whole GPU";

/// The longest duration an input may name, in milliseconds (365 days): far beyond any real wait or lease,
/// and far from where instants overflow.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3_600 * 1_000;

/// The longest `pause_ms` a request may name, in milliseconds (an hour): a hint of how long a holder
/// takes to pause, which no engine that frees its VRAM within a pause deadline comes near.
pub const MAX_PAUSE_MS: u64 = 3_600_000;

/// The most VRAM a request may name, in MB (a petabyte).
pub const MAX_VRAM_MB: u64 = 1 << 30;

fn check_at_most(field: &str, value: Option<u64>, max: u64, what: &str) -> Result<(), String> {
    match value {
        Some(v) if v > max => Err(format!("field `{field}`: at most {max} ({what}), got {v}")),
        _ => Ok(()),
    }
}

fn check_positive(field: &str, value: Option<u64>, hint: &str) -> Result<(), String> {
    match value {
        Some(0) => Err(format!(
            "field `{field}` must be greater than 0, got 0 ({hint})"
        )),
        _ => Ok(()),
    }
}

fn check_gpu(gpu: &str) -> Result<(), String> {
    let len = gpu.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '/');
    if (1..=MAX_GPU_ID_LEN).contains(&len) && gpu.chars().all(allowed) {
        Ok(())
    } else {
        Err(format!(
            "field `gpu` must be 1 to {MAX_GPU_ID_LEN} characters of A-Z, a-z, 0-9, `_`, `-`, `:`, \
             `.` and `/`, got {}; leave it out for any GPU that fits",
            quote(gpu)
        ))
    }
}

/// A request's `host`: a host name as node agents give it, and the host of its `gpu` if it names one.
fn check_host(host: &str, gpu: Option<&str>) -> Result<(), String> {
    if !crate::subjects::valid_host(host) {
        return Err(format!(
            "field `host` must be 1 to {} characters of A-Z, a-z, 0-9, `_` and `-`, got {}; leave \
             it out for any host",
            crate::subjects::MAX_SERVICE_ID_LEN,
            quote(host)
        ));
    }
    match gpu.map(|g| g.split_once('/')) {
        Some(Some((on, _))) if on != host => Err(format!(
            "field `gpu`: {} is on host {}, not on {} as field `host` says; give one of them",
            quote(gpu.unwrap_or_default()),
            quote(on),
            quote(host)
        )),
        Some(None) => Err(format!(
            "field `gpu`: {} names no host (GPU ids are `<host>/<id>` with node agents), while \
             field `host` names {}; give `<host>/<id>`, or leave `gpu` out",
            quote(gpu.unwrap_or_default()),
            quote(host)
        )),
        _ => Ok(()),
    }
}

/// The payload's `request_id`, read without trusting the rest, for the rejection of an invalid input.
fn loose_request_id(node: &Node) -> Option<String> {
    match node.get("request_id") {
        Some(Node::Str(s))
            if !s.is_empty()
                && s.chars().count() <= MAX_ECHOED_REQUEST_ID_LEN
                && !s.chars().any(char::is_control) =>
        {
            Some(s.clone())
        }
        _ => None,
    }
}
