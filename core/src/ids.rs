//! The ids the core deals in, each its own type so that the compiler catches a request id passed where a
//! service or a GPU is meant. Each reads as a `str` (`Deref`, `Borrow<str>`, comparisons with strings), so
//! maps keyed by them are looked up by `&str`, and converts from `String` and `&str`.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned `String`.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name(s.clone())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == &other.0
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

id!(
    /// A request's id: the idempotency key a service chose (or `<svc>-<stream sequence>`).
    RequestId
);
id!(
    /// A service's id: the last token of its subjects.
    ServiceId
);
id!(
    /// A GPU's id: an NVML index or UUID, or a name from the configuration.
    GpuId
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ids_read_and_compare_as_text_and_look_up_by_str() {
        let id = RequestId::from("chat-1");
        assert_eq!(id, "chat-1");
        assert_eq!("chat-1", id);
        assert_eq!(id.to_string(), "chat-1");
        assert_eq!(format!("{id:?}"), "\"chat-1\"");
        let map: HashMap<RequestId, u8> = HashMap::from([(id.clone(), 1)]);
        assert_eq!(map.get("chat-1"), Some(&1));
        assert!(id.starts_with("chat"));
    }
}

/// Request ids are scoped to their service: two services may use the same `request_id`, and neither can
/// claim the other's. Inside the coordinator (the scheduler, the journal, the lease store) a request is
/// known as `<svc>` + [`SCOPE`] + `<request_id>`; the driver scopes every id that comes in and the
/// rendering takes the scope off every id and sentence that goes out. Ids on the wire cannot hold
/// control characters, so the scoped form is never ambiguous.
pub const SCOPE: char = '\u{1f}';

/// `request_id` of `service`, as the coordinator knows it inside.
pub fn scoped(service: &str, request_id: &str) -> String {
    format!("{service}{SCOPE}{request_id}")
}

/// The id as the service wrote it (a scoped id without its scope; any other unchanged).
pub fn unscoped(id: &str) -> &str {
    id.split_once(SCOPE).map_or(id, |(_, id)| id)
}

/// `text` with the scope taken off every scoped id in it (for sentences that name requests).
pub fn unscope_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(SCOPE) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.split(SCOPE).enumerate() {
        if i == 0 {
            out.push_str(part);
            continue;
        }
        // The service id just before the scope mark goes with it.
        let keep = out
            .trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            .len();
        out.truncate(keep);
        out.push_str(part);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn scoped_ids_come_back_as_written() {
        let id = scoped("chat", "job:1-a");
        assert_ne!(id, scoped("asr", "job:1-a"));
        assert_eq!(unscoped(&id), "job:1-a");
        assert_eq!(unscoped("plain"), "plain");
        let sentence = format!(
            "request `{}` is paused for `{}`",
            scoped("asr", "a-1"),
            scoped("chat-x", "c:1")
        );
        assert_eq!(unscope_text(&sentence), "request `a-1` is paused for `c:1`");
        assert_eq!(unscope_text("no ids here"), "no ids here");
    }
}
