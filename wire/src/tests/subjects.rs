use super::*;
use crate::messages::EventKind;
use crate::subjects::valid_service_id;

#[test]
fn names_under_the_default_prefix() {
    let s = subjects();
    assert_eq!(s.prefix(), "gpu");
    assert_eq!(s.request("a"), "gpu.request.a");
    assert_eq!(s.release("a"), "gpu.release.a");
    assert_eq!(s.renew("a"), "gpu.renew.a");
    assert_eq!(s.ack("a"), "gpu.ack.a");
    assert_eq!(s.cancel("a"), "gpu.cancel.a");
    assert_eq!(s.reply("a"), "gpu.reply.a");
    assert_eq!(s.control("a"), "gpu.control.a");
    assert_eq!(s.event(EventKind::TimedOut, "a"), "gpu.event.timed_out.a");
    assert_eq!(s.status(), "gpu.status");
    assert_eq!(s.input_stream(), "GPU_INPUT");
    assert_eq!(s.output_stream(), "GPU_OUTPUT");
    assert_eq!(
        s.input_subjects(),
        [
            "gpu.request.*",
            "gpu.release.*",
            "gpu.renew.*",
            "gpu.ack.*",
            "gpu.cancel.*"
        ]
    );
    assert_eq!(
        s.output_subjects(),
        ["gpu.reply.*", "gpu.control.*", "gpu.event.*.*"]
    );
    assert_eq!(Subjects::default(), s);
}

#[test]
fn stream_names_of_a_dotted_prefix() {
    let s = Subjects::new("test-7.gpu").unwrap();
    assert_eq!(s.request("svc"), "test-7.gpu.request.svc");
    assert_eq!(s.input_stream(), "TEST_7_GPU_INPUT");
    assert_eq!(s.output_stream(), "TEST_7_GPU_OUTPUT");
    assert_eq!(
        s.parse_input("test-7.gpu.ack.svc"),
        Ok((InputKind::Ack, "svc".to_owned()))
    );
}

#[test]
fn bad_prefixes_are_refused_with_a_reason() {
    for (prefix, part) in [
        ("", "empty"),
        ("gpu.", "empty token"),
        (".gpu", "empty token"),
        ("a..b", "empty token"),
        ("gpu.*", "'*'"),
        ("gpu.>", "'>'"),
        ("g pu", "' '"),
        ("gpü", "'ü'"),
    ] {
        let error = Subjects::new(prefix).expect_err(prefix);
        assert_mentions(&error, &["prefix", part]);
    }
}

#[test]
fn parses_every_input_kind() {
    let s = subjects();
    for kind in InputKind::ALL {
        assert_eq!(InputKind::from_token(kind.as_str()), Some(kind));
        assert_eq!(
            s.parse_input(&s.input(kind, "svc_1-A")),
            Ok((kind, "svc_1-A".to_owned()))
        );
    }
}

#[test]
fn refuses_subjects_that_are_not_inputs() {
    let s = subjects();
    for subject in [
        "gpu.reply.svc",
        "gpu.request",
        "gpu.request.svc.extra",
        "gpux.request.svc",
        "other.request.svc",
        "gpu..svc",
        "",
    ] {
        let error = s.parse_input(subject).expect_err(subject);
        assert_mentions(&error, &["not an input subject", "gpu.<kind>.<service id>"]);
    }
}

#[test]
fn service_ids() {
    assert!(valid_service_id("a"));
    assert!(valid_service_id("Chat_1-x"));
    assert!(valid_service_id(&"a".repeat(64)));
    assert!(!valid_service_id(""));
    assert!(!valid_service_id(&"a".repeat(65)));
    assert!(!valid_service_id("a.b"));
    assert!(!valid_service_id("a*"));
    assert!(!valid_service_id("é"));
    let error = subjects().parse_input("gpu.request.bad!").unwrap_err();
    assert_mentions(&error, &["service id \"bad!\"", "1 to 64 characters"]);
}

#[test]
fn answers_go_to_inboxes_only() {
    let s = Subjects::new("gpu").unwrap();
    for inbox in ["_INBOX.abc", "_INBOX_chat.abc.def", "_INBOX_a.1"] {
        assert!(s.is_inbox(inbox), "{inbox}");
    }
    for not in [
        "gpu.release.chat",
        "$JS.API.STREAM.PURGE.GPU_INPUT",
        "_INBOX",
        "_INBOX.",
        "_INBOX_.x",
        "_INBOXchat.x",
        "_INBOX.*",
        "_INBOX.>",
        "_INBOX..x",
        "x._INBOX.y",
    ] {
        assert!(!s.is_inbox(not), "{not}");
    }
    // A prefix that looks like an inbox keeps its own subjects out.
    let odd = Subjects::new("_INBOX.gpu").unwrap();
    assert!(!odd.is_inbox("_INBOX.gpu.release.chat"));
    assert!(odd.is_inbox("_INBOX.other"));
}
