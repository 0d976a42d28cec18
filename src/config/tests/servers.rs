//! `[nats]`, `[redis]` and `[database]`: their URLs, bounds, and secrets kept out of `Debug`.

use super::*;

#[test]
fn bad_nats_prefix() {
    for bad in ["a b", "", "gpu.", "a..b", "gpu>", "gpu.*"] {
        let msg = invalid(&format!("[nats]\nprefix = {bad:?}\n"), "prefix");
        assert!(msg.contains(&format!("nats.prefix {bad:?}")), "{msg}");
    }
}

#[test]
fn multi_token_prefix_is_valid() {
    let config = load_str("[nats]\nprefix = \"site-a.gpu\"\n", "prefixok").expect("valid");
    assert_eq!(config.nats.prefix, "site-a.gpu");
}

#[test]
fn empty_urls_are_rejected() {
    let msg = invalid(
        "[nats]\nurl = \"\"\n[redis]\nurl = \"\"\n[database]\nurl = \" \"\n",
        "urls",
    );
    for key in ["nats.url", "redis.url", "database.url"] {
        assert!(msg.contains(&format!("{key} must not be empty")), "{msg}");
    }
}

#[test]
fn a_nats_url_may_list_several_servers() {
    let config = load_str(
        "[nats]\nurl = \"nats://n1:4222, nats://u:pw@n2:4223,n3\"\nreplicas = 3\n",
        "natslist",
    )
    .expect("valid");
    assert_eq!(config.nats.replicas, 3);
    assert_eq!(Config::default().nats.replicas, 1);
}

#[test]
fn a_nats_url_that_cannot_be_parsed_is_refused_naming_the_key() {
    for bad in [
        "nats://n1:4222,nats://n2:42x2",
        "nats://n1:4222 nats://n2:4222",
        "nats://n1:4222,,nats://n2:4222",
        "http://n1:4222",
    ] {
        let msg = invalid(&format!("[nats]\nurl = {bad:?}\n"), "natsbad");
        assert!(msg.contains("nats.url: `"), "{bad}: {msg}");
        assert!(msg.contains("separated by commas"), "{bad}: {msg}");
    }
    let msg = invalid("[nats]\nurl = \"nats://u:secretpw@n1:42x2\"\n", "natsbadpw");
    assert!(!msg.contains("secretpw"), "{msg}");
}

#[test]
fn a_database_url_may_name_a_primary_and_its_standbys() {
    let config = load_str(
        "[database]\nurl = \"postgres://u:pw@pg1:5432,pg2:5433,[::1]/gpu?sslmode=disable\"\n",
        "pglist",
    )
    .expect("valid");
    assert!(config.database.url.contains("pg1:5432,pg2:5433"));
}

#[test]
fn a_database_url_whose_hosts_cannot_be_parsed_is_refused_naming_the_key() {
    for (bad, says) in [
        (
            "postgres://u:secretpw@pg1:5432,pg2:54x2/gpu",
            "not a number",
        ),
        ("postgres://u:secretpw@pg1:5432,,pg2/gpu", "empty host"),
        ("postgres://u:secretpw@/gpu?host=pg1,pg2", "several values"),
        ("pg1:5432,pg2:5432", "not a URL"),
    ] {
        let msg = invalid(&format!("[database]\nurl = {bad:?}\n"), "pgbad");
        assert!(msg.contains("database.url: "), "{bad}: {msg}");
        assert!(msg.contains(says), "{bad}: {msg}");
        assert!(msg.contains("separated by commas"), "{bad}: {msg}");
        assert!(!msg.contains("secretpw"), "{bad}: {msg}");
    }
}

#[test]
fn nats_replicas_are_one_to_five() {
    for bad in [0, 6] {
        let msg = invalid(&format!("[nats]\nreplicas = {bad}\n"), "replicas");
        assert!(
            msg.contains(&format!("nats.replicas ({bad}) must be 1 to 5")),
            "{msg}"
        );
    }
    load_str("[nats]\nreplicas = 5\n", "replicas5").expect("valid");
}

#[test]
fn redis_sentinels_name_a_master_in_place_of_redis_url() {
    let config = load_str(
        "[redis]\nsentinels = [\"s1:26379\", \"redis://:pw@s2:26380\"]\nmaster = \"leases\"\n",
        "sentinels",
    )
    .expect("valid");
    assert_eq!(config.redis.sentinels.len(), 2);
    assert_eq!(config.redis.master, "leases");
    assert!(!format!("{config:?}").contains(":pw@"), "{config:?}");
    // From the environment too, as a list.
    let p = prefix("sentinelsenv");
    std::env::set_var(
        format!("{p}REDIS__SENTINELS"),
        "[\"s1:26379\",\"s2:26379\"]",
    );
    std::env::set_var(format!("{p}REDIS__MASTER"), "m");
    let config = Config::load_with_env(None, &p).expect("valid");
    assert_eq!(config.redis.sentinels, ["s1:26379", "s2:26379"]);

    let msg = invalid(
        "[redis]\nurl = \"redis://r:6379\"\nsentinels = [\"s1:26379\"]\nmaster = \"m\"\n",
        "sentinelsboth",
    );
    assert!(
        msg.contains("redis.url and redis.sentinels are both set"),
        "{msg}"
    );
    let msg = invalid("[redis]\nsentinels = [\"s1:26379\"]\n", "sentinelsnomaster");
    assert!(msg.contains("redis.master must name the master"), "{msg}");
    let msg = invalid("[redis]\nmaster = \"m\"\n", "masteralone");
    assert!(
        msg.contains("redis.master (\"m\") is set without redis.sentinels"),
        "{msg}"
    );
    let msg = invalid(
        "[redis]\nsentinels = [\"s1:26379\", \"s2\", \"s3:2x\"]\nmaster = \"m\"\n",
        "sentinelsbad",
    );
    assert!(
        msg.contains("redis.sentinels[1]: \"s2\" names no port"),
        "{msg}"
    );
    assert!(msg.contains("redis.sentinels[2]: \"s3:2x\""), "{msg}");
    assert!(!msg.contains("redis.sentinels[0]"), "{msg}");
}

#[test]
fn debug_hides_the_secrets() {
    let config = load_str(
        "[nats]\nurl = \"nats://svc:natspw@h:4222,nats://tok3n@h2:4222\"\n\
         [redis]\nurl = \"redis://:redispw@h:6379/0\"\n\
         [database]\nurl = \"postgres://u:pgpw@h/db?password=querypw\"\n\
         [http.tokens]\nhttptok = \"chat\"\n",
        "debugsecrets",
    )
    .expect("valid");
    let text = format!("{config:?} {config:#?}");
    for secret in ["natspw", "tok3n", "redispw", "pgpw", "querypw", "httptok"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    for shown in [
        "svc:***@h:4222",
        "redis://h:6379/0",
        "postgres://u@h/db",
        "\"chat\"",
    ] {
        assert!(text.contains(shown), "{shown} not in {text}");
    }
}
