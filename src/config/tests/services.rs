//! `[services]`: the sections over `[services.default]`, their problems, and the engines they limit.

use super::*;

#[test]
fn services_sections_take_the_default_sections_keys() {
    let config = load_str(
        r#"
        [services]
        allow_unknown = false
        [services.default]
        max_priority = 2
        min_hold_ms = 500
        [services.chat]
        max_priority = 0
        default_priority = 0
        max_vram_mb = 20000
        guaranteed_vram_mb = 16000
        [services.batch]
        clamp_priority = true
        default_vram_mb = 4000
        default_lease_ms = 60000
        preemptible = false
        "#,
        "services",
    )
    .expect("valid");
    let policies = config.sched_config().services;
    let chat = policies.get("chat").expect("a section");
    assert_eq!(
        (chat.max_priority, chat.default_priority, chat.max_vram_mb),
        (Some(0), Some(0), Some(20_000))
    );
    assert_eq!(
        (chat.guaranteed_vram_mb, chat.min_hold_ms),
        (16_000, Some(500))
    );
    assert!(chat.preemptible && !chat.clamp_priority);
    let batch = policies.get("batch").expect("a section");
    assert_eq!(batch.max_priority, Some(2), "from [services.default]");
    assert!(batch.clamp_priority && !batch.preemptible);
    assert_eq!(
        (batch.default_vram_mb, batch.default_lease_ms),
        (Some(4_000), Some(60_000))
    );
    assert!(policies.get("stranger").is_none(), "allow_unknown is false");
    // Without [services], every service is served as today.
    let policies = Config::default().sched_config().services;
    assert_eq!(
        policies.get("anyone"),
        Some(&gpu_coordinator_core::ServicePolicy::default())
    );
}

#[test]
fn services_keys_can_come_from_the_environment() {
    let p = prefix("servicesenv");
    std::env::set_var(format!("{p}SERVICES__CHAT__MAX_PRIORITY"), "1");
    std::env::set_var(format!("{p}SERVICES__ALLOW_UNKNOWN"), "false");
    let config = Config::load_with_env(None, &p).expect("valid");
    assert_eq!(config.services.named["chat"].max_priority, Some(1));
    assert!(!config.services.allow_unknown);
}

#[test]
fn services_unknown_key_names_it() {
    let msg = parse_error("[services.chat]\nmax_prio = 1\n", "servicesunknown");
    assert!(
        msg.contains("`services.chat.max_prio`: unknown key"),
        "{msg}"
    );
    let msg = parse_error("[services.chat]\nmax_priority = 300\n", "servicesrange");
    assert!(msg.contains("`services.chat.max_priority`"), "{msg}");
}

#[test]
fn services_problems_name_the_key() {
    let msg = invalid(
        r#"
        [lease]
        max_ms = 60000
        [[gpus]]
        id = "0"
        vram_mb = 24000
        [services.default]
        guaranteed_vram_mb = 1000
        [services.chat]
        max_priority = 1
        default_priority = 0
        max_vram_mb = 8000
        guaranteed_vram_mb = 9000
        default_vram_mb = 0
        [services.asr]
        guaranteed_vram_mb = 20000
        default_lease_ms = 90000
        clamp_priority = true
        [services."a b"]
        "#,
        "servicesbad",
    );
    for want in [
        "services.default.guaranteed_vram_mb: a guarantee is given per named service",
        "services.chat.default_priority (0) is more urgent than services.chat.max_priority (1)",
        "services.chat.guaranteed_vram_mb (9000) is above services.chat.max_vram_mb (8000)",
        "services.chat.default_vram_mb must be > 0",
        "services.asr.default_lease_ms (90000) is above lease.max_ms (60000)",
        "services.asr.clamp_priority is set but services.asr.max_priority is not",
        "the guarantees add up to 29000 MB, more than the [[gpus]] have (24000 MB)",
        "[services.a b]: \"a b\" is not a service id",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let msg = invalid("[services]\nallow_unknown = false\n", "servicesnone");
    assert!(msg.contains("every request would be rejected"), "{msg}");
}

#[test]
fn an_engine_must_pass_its_services_limits() {
    let engine = "[[engines]]\nservice = \"chat\"\nkind = \"vllm\"\nlisten = \"127.0.0.1:9001\"\n\
                  upstream = \"http://127.0.0.1:8001\"\npriority = 0\n";
    let msg = invalid(
        &format!("{engine}[services.chat]\nmax_priority = 1\n"),
        "enginelimits",
    );
    assert!(
        msg.contains("engines[0].priority (0) is more urgent than services.chat.max_priority (1)"),
        "{msg}"
    );
    let msg = invalid(
        &format!("{engine}[services]\nallow_unknown = false\n[services.asr]\n"),
        "engineunknown",
    );
    assert!(
        msg.contains("engines[0].service \"chat\" has no [services.chat] section"),
        "{msg}"
    );
    load_str(
        &format!("{engine}[services.chat]\nmax_priority = 1\nclamp_priority = true\n"),
        "engineclamp",
    )
    .expect("a clamped priority passes");
}
