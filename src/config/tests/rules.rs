//! The rules the types alone do not enforce: bounds, GPUs, backends, the HTTP API.

use super::*;

#[test]
fn write_behind_needs_postgres_and_nats() {
    let msg = invalid(
        "[database]\nwrite_behind = true\n\n[backends]\nbus = \"embedded\"\n",
        "writebehind",
    );
    assert!(
        msg.contains("database.write_behind needs backends.journal = \"postgres\""),
        "{msg}"
    );
}

#[test]
fn sqlite_beside_a_server_needs_one_box() {
    let msg = invalid(
        "[backends]\njournal = \"sqlite\"\nleases = \"memory\"\nbus = \"nats\"\n",
        "onebox",
    );
    assert!(
        msg.contains("backends.journal = \"sqlite\" with backends.bus = \"nats\" (the same nats.prefix) is for one box only"),
        "{msg}"
    );
    assert!(msg.contains("grant the same GPUs twice"), "{msg}");
    assert!(msg.contains("backends.one_box = true"), "{msg}");
    let msg = invalid("[backends]\njournal = \"sqlite\"\n", "oneboxredis");
    assert!(
        msg.contains(
            "backends.bus = \"nats\" (the same nats.prefix) and backends.leases = \"redis\""
        ),
        "{msg}"
    );
    load_str(
        "[backends]\njournal = \"sqlite\"\nbus = \"nats\"\none_box = true\n",
        "oneboxset",
    )
    .expect("confirmed as one box");
    load_str(
        "[backends]\njournal = \"sqlite\"\nleases = \"memory\"\nbus = \"embedded\"\n",
        "oneboxembedded",
    )
    .expect("nothing shared");
}

#[test]
fn max_below_default_lease() {
    let msg = invalid("[lease]\nmax_ms = 1000\n", "maxlease");
    assert!(
        msg.contains("lease.max_ms (1000) must be >= lease.default_ms (30000)"),
        "{msg}"
    );
}

#[test]
fn zero_durations_are_rejected() {
    let msg = invalid(
        "[lease]\ndefault_ms = 0\n[preemption]\nack_deadline_ms = 0\n[request]\ndefault_timeout_ms = 0\n\
         [nats]\nmax_age_ms = 0\n[nvml]\nsample_ms = 0\n",
        "zeros",
    );
    for key in [
        "lease.default_ms",
        "preemption.ack_deadline_ms",
        "request.default_timeout_ms",
        "nats.max_age_ms",
        "nvml.sample_ms",
    ] {
        assert!(msg.contains(&format!("{key} must be > 0")), "{key}: {msg}");
    }
}

#[test]
fn duplicate_gpu_id() {
    let msg = invalid(
        "[[gpus]]\nid = \"0\"\nvram_mb = 1000\n[[gpus]]\nid = \"0\"\nvram_mb = 1000\n",
        "dupgpu",
    );
    assert!(msg.contains("gpus[1].id \"0\" is used twice"), "{msg}");
}

#[test]
fn gpu_without_vram() {
    let msg = invalid("[[gpus]]\nid = \"0\"\nvram_mb = 0\n", "gpuvram");
    assert!(msg.contains("gpus[0].vram_mb must be > 0"), "{msg}");
    let msg = invalid("[[gpus]]\nid = \"\"\nvram_mb = 10\n", "gpuid");
    assert!(msg.contains("gpus[0].id must not be empty"), "{msg}");
}

#[test]
fn bad_listen_address() {
    let msg = invalid("[http]\nlisten = \"x\"\n", "listen");
    assert!(
        msg.contains("http.listen \"x\" is not a socket address"),
        "{msg}"
    );
}

#[test]
fn zero_connection_limits_are_refused() {
    let msg = invalid(
        "[http]\nheader_read_timeout_ms = 0\nmax_connections = 0\n",
        "connlimits",
    );
    assert!(msg.contains("http.header_read_timeout_ms"), "{msg}");
    assert!(msg.contains("http.max_connections"), "{msg}");
}

#[test]
fn bad_token_service_id() {
    let msg = invalid("[http.tokens]\nt1 = \"chat bot\"\n", "tokens");
    assert!(msg.contains("http.tokens"), "{msg}");
    assert!(msg.contains("\"chat bot\""), "{msg}");
    let long = "a".repeat(65);
    let msg = invalid(&format!("[http.tokens]\nt1 = {long:?}\n"), "tokens");
    assert!(msg.contains("1-64 characters"), "{msg}");
}
