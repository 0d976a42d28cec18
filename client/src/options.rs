//! What a request asks for, and the ids the client makes up: request ids and `Nats-Msg-Id`s.
//!
//! Pure: builds messages and names, sends nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use gpu_coordinator_wire::RequestMsg;

/// What to ask the coordinator for. Every field but `priority` is optional; a `None` takes the
/// coordinator's default (see the wire contract).
///
/// ```
/// use gpu_coordinator_client::RequestOptions;
///
/// // A background job that needs 4 GB on any GPU, holding 60 s leases, waiting at most 10 minutes,
/// // whose engine takes about 1.2 s to free its VRAM when paused.
/// let options = RequestOptions::new(2)
///     .vram_mb(4_000)
///     .lease_ms(60_000)
///     .timeout_ms(600_000)
///     .pause_ms(1_200);
/// assert_eq!(options.priority, 2);
/// assert_eq!(options.preemptible, None); // the coordinator's default: preemptible
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// 0 to 255, lower is more urgent: 0 critical (chat), 1 high (voice command), 2 background. The
    /// derived `Default` is 0; prefer [`RequestOptions::new`], which makes the priority explicit.
    pub priority: u8,
    /// VRAM the holder needs, in MB; `None`: the whole GPU.
    pub vram_mb: Option<u64>,
    /// The GPU id to use (`<host>/<id>` with node agents); `None`: any GPU that fits.
    pub gpu: Option<String>,
    /// With node agents: the host whose GPUs to use; `None`: any host.
    pub host: Option<String>,
    /// Lease length after a grant, in milliseconds; `None`: the coordinator's `lease.default_ms`.
    pub lease_ms: Option<u64>,
    /// Longest wait for a grant, in milliseconds; `None`: the coordinator's
    /// `request.default_timeout_ms`, and the client waits for the coordinator's answer however long
    /// it takes (bound it with `tokio::time::timeout` if needed: dropping the future withdraws the
    /// request).
    pub timeout_ms: Option<u64>,
    /// `Some(false)`: never paused. `None`: the coordinator's default, preemptible.
    pub preemptible: Option<bool>,
    /// How long this holder takes to pause (finish its unit of work and free its VRAM), in
    /// milliseconds, as measured; at most 3,600,000. A hint: among holders the coordinator would
    /// pause alike, it pauses the one that frees its VRAM soonest. `None`: unknown, taken as slower
    /// than any known value.
    pub pause_ms: Option<u64>,
    /// The idempotency key; `None`: a unique id made up by [`generate_request_id`].
    pub request_id: Option<String>,
}

impl RequestOptions {
    /// Options with this priority and every other field left to its default.
    pub fn new(priority: u8) -> Self {
        RequestOptions {
            priority,
            ..RequestOptions::default()
        }
    }

    /// Sets [`RequestOptions::vram_mb`].
    pub fn vram_mb(mut self, vram_mb: u64) -> Self {
        self.vram_mb = Some(vram_mb);
        self
    }

    /// Sets [`RequestOptions::gpu`].
    pub fn gpu(mut self, gpu: impl Into<String>) -> Self {
        self.gpu = Some(gpu.into());
        self
    }

    /// Sets [`RequestOptions::host`].
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets [`RequestOptions::lease_ms`].
    pub fn lease_ms(mut self, lease_ms: u64) -> Self {
        self.lease_ms = Some(lease_ms);
        self
    }

    /// Sets [`RequestOptions::timeout_ms`].
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// Sets [`RequestOptions::preemptible`].
    pub fn preemptible(mut self, preemptible: bool) -> Self {
        self.preemptible = Some(preemptible);
        self
    }

    /// Sets [`RequestOptions::pause_ms`].
    pub fn pause_ms(mut self, pause_ms: u64) -> Self {
        self.pause_ms = Some(pause_ms);
        self
    }

    /// Sets [`RequestOptions::request_id`].
    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// The `request` message for `service_id`, under the request id the caller settled on.
    pub fn to_message(&self, service_id: &str, request_id: &str) -> RequestMsg {
        RequestMsg {
            host: self.host.clone(),
            request_id: Some(request_id.to_owned()),
            service_id: Some(service_id.to_owned()),
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            lease_ms: self.lease_ms,
            vram_mb: self.vram_mb,
            gpu: self.gpu.clone(),
            preemptible: self.preemptible,
            pause_ms: self.pause_ms,
        }
    }
}

/// A request id that no other request will have: `<service_id>-<ms since the epoch, hex>-<64 random
/// bits, hex>`, at most 93 characters of `[A-Za-z0-9_-]`.
pub fn generate_request_id(service_id: &str) -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{service_id}-{ms:x}-{:016x}", random_u64())
}

/// 16 hex digits that no other call returns, for `Nats-Msg-Id`s.
pub(crate) fn nonce() -> String {
    format!("{:016x}", random_u64())
}

/// 64 bits that are unpredictable across processes and distinct within one: std's randomly keyed
/// SipHash over a process-wide counter, the process id and the clock. Good enough for ids; no crate
/// needed.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}

/// The `Nats-Msg-Id` of one input: `<request_id>:<kind>[:<fence>]:<nonce>`.
///
/// The input stream drops a message whose id it saw within its duplicate window (2 minutes), so the
/// id must be the same for every retry of one publish (a retry after a lost PubAck is then harmless)
/// and different for every new input. The request id and the kind alone would not do: a lease renews
/// every few seconds with the same request id, kind and fence, and a service that reuses a request
/// id on purpose (an idempotency key after a crash) must reach the coordinator to learn the request's
/// state. So the caller makes a fresh `nonce` per input and reuses it for that input's retries.
pub(crate) fn msg_id(request_id: &str, kind: &str, fence: Option<u64>, nonce: &str) -> String {
    match fence {
        Some(fence) => format!("{request_id}:{kind}:{fence}:{nonce}"),
        None => format!("{request_id}:{kind}:{nonce}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator_wire::codec::{self, Encoding};
    use gpu_coordinator_wire::{decode_input, Inbound, Subjects};

    #[test]
    fn defaults_leave_everything_to_the_coordinator() {
        let options = RequestOptions::new(1);
        assert_eq!(
            options,
            RequestOptions {
                host: None,
                priority: 1,
                vram_mb: None,
                gpu: None,
                lease_ms: None,
                timeout_ms: None,
                preemptible: None,
                pause_ms: None,
                request_id: None,
            }
        );
        let json = serde_json::to_value(options.to_message("chat", "chat-1")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"request_id": "chat-1", "service_id": "chat", "priority": 1})
        );
    }

    #[test]
    fn builder_sets_every_field() {
        let options = RequestOptions::new(2)
            .vram_mb(4_000)
            .gpu("gpu0")
            .lease_ms(60_000)
            .timeout_ms(5_000)
            .preemptible(false)
            .pause_ms(1_200)
            .request_id("job-7");
        let msg = options.to_message("transcriber", "job-7");
        assert_eq!(msg.priority, 2);
        assert_eq!(msg.vram_mb, Some(4_000));
        assert_eq!(msg.gpu.as_deref(), Some("gpu0"));
        assert_eq!(msg.lease_ms, Some(60_000));
        assert_eq!(msg.timeout_ms, Some(5_000));
        assert_eq!(msg.preemptible, Some(false));
        assert_eq!(msg.pause_ms, Some(1_200));
        assert_eq!(msg.request_id.as_deref(), Some("job-7"));
        assert_eq!(msg.service_id.as_deref(), Some("transcriber"));
    }

    #[test]
    fn the_message_passes_the_coordinators_own_validation() {
        let subjects = Subjects::new("gpu").unwrap();
        let options = RequestOptions::new(0)
            .vram_mb(100)
            .gpu("gpu0")
            .pause_ms(800);
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let payload = codec::encode(encoding, &options.to_message("chat", "chat-1"));
            let decoded = decode_input(
                &subjects,
                &subjects.request("chat"),
                encoding.content_type(),
                &payload,
                1,
            )
            .expect("valid request");
            assert!(matches!(
                decoded.input,
                Inbound::Request(m) if m.priority == 0 && m.pause_ms == Some(800)
            ));
        }
    }

    #[test]
    fn generated_ids_are_unique_and_valid() {
        let subjects = Subjects::new("gpu").unwrap();
        let svc = "s".repeat(64);
        let a = generate_request_id(&svc);
        let b = generate_request_id(&svc);
        assert_ne!(a, b);
        assert!(a.len() <= 128, "{a}");
        assert!(a.starts_with(&format!("{svc}-")));
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
        let payload = codec::encode(Encoding::Json, &RequestOptions::new(0).to_message(&svc, &a));
        decode_input(&subjects, &subjects.request(&svc), None, &payload, 1)
            .expect("a generated id is a valid request id");
    }

    #[test]
    fn msg_ids_differ_per_input_but_not_per_retry() {
        let n1 = nonce();
        let n2 = nonce();
        assert_ne!(n1, n2);
        assert_eq!(
            msg_id("job-7", "renew", Some(12), &n1),
            format!("job-7:renew:12:{n1}")
        );
        assert_eq!(
            msg_id("job-7", "request", None, &n1),
            format!("job-7:request:{n1}")
        );
        assert_ne!(
            msg_id("job-7", "renew", Some(12), &n1),
            msg_id("job-7", "renew", Some(12), &n2)
        );
    }
}
