//! Connection options from a NATS URL: the credentials it carries, and an inbox prefix of the user's
//! own.
//!
//! `async-nats` ignores a user and password written in the URL (`nats://chat:secret@host:4222`), which
//! every other NATS client and the `nats` CLI accept; this reads them and sets them on the options.
//! A URL with a user only (`nats://TOKEN@host`) is a token.
//!
//! With a user, the inbox prefix is `_INBOX_<user>`: a server with per-user permissions (what
//! `gpu-coordinator nats-auth` writes) lets each user subscribe to its own inboxes only, so nobody
//! reads the answers meant for another (JetStream API answers, pulled messages, request-reply).

use async_nats::{ConnectOptions, ServerAddr};
use percent_encoding::percent_decode_str;

/// Who a NATS URL connects as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// The user, or the token when there is no password.
    pub user: Option<String>,
    pub password: Option<String>,
}

impl NatsAuth {
    /// The credentials of a URL, or of the first of a comma-separated list that has some.
    pub fn from_url(url: &str) -> Result<NatsAuth, String> {
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let addr: ServerAddr = one
                .parse()
                .map_err(|e| format!("`{}` is not a NATS URL: {e}", redact(one)))?;
            if let Some(user) = addr.username() {
                let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
                return Ok(NatsAuth {
                    user: Some(decode(user)),
                    password: addr.password().map(decode),
                });
            }
        }
        Ok(NatsAuth::default())
    }

    /// The inbox prefix a connection as this user uses.
    pub fn inbox_prefix(&self) -> String {
        match (&self.user, &self.password) {
            (Some(user), Some(_)) => inbox_prefix(user),
            _ => "_INBOX".to_owned(),
        }
    }

    /// `options` with these credentials and the inbox prefix that goes with them.
    pub fn apply(&self, options: ConnectOptions) -> ConnectOptions {
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => options
                .user_and_password(user.clone(), password.clone())
                .custom_inbox_prefix(inbox_prefix(user)),
            (Some(token), None) => options.token(token.clone()),
            _ => options,
        }
    }
}

/// The inbox prefix of `user`'s connections (`_INBOX_<user>`).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// Connection options for `url`: its credentials and inbox prefix (see the module docs).
pub fn connect_options(url: &str) -> Result<ConnectOptions, String> {
    Ok(NatsAuth::from_url(url)?.apply(ConnectOptions::new()))
}

/// The servers of `url`, a comma-separated list as the `nats` CLI's `--server` takes
/// (`nats://n1:4222,nats://n2:4222`; spaces around each are ignored), each without its user info, for
/// `async-nats`: it connects to one of them and, when that one goes, reconnects to another (and to
/// the servers the cluster announces). An entry that is not a NATS URL is an error naming it: handed
/// to the library as one string, a list would be one address with an "invalid port number", and a
/// connection that can never be made is retried for ever.
pub fn server_addrs(url: &str) -> Result<Vec<ServerAddr>, String> {
    let mut addrs = Vec::new();
    for one in url.split(',').map(str::trim) {
        if one.is_empty() {
            return Err(format!(
                "`{}` has an empty entry: separate the servers with single commas",
                redact(url)
            ));
        }
        let plain = without_credentials(one);
        let addr: ServerAddr = plain
            .parse()
            .map_err(|e| format!("`{}` is not a NATS URL: {e}", redact(one)))?;
        if addr.host().is_empty() {
            return Err(format!("`{}` is not a NATS URL: no host", redact(one)));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

/// `url` (each of a comma-separated list) without its user info, for `async-nats`: the credentials
/// go in the options ([`connect_options`]), and the library logs the addresses it connects to at
/// `debug`, user info and all.
pub fn without_credentials(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let start = one.find("://").map_or(0, |i| i + 3);
            let rest = &one[start..];
            let authority = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority].rfind('@') {
                Some(at) => format!("{}{}", &one[..start], &rest[at + 1..]),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let creds = &one[scheme + 3..at];
                match creds.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &one[..scheme + 3], &one[at..]),
                    None => format!("{}***{}", &one[..scheme + 3], &one[at..]),
                }
            }
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_and_password_from_the_url() {
        let auth = NatsAuth::from_url("nats://chat:s%40cret@127.0.0.1:4222").unwrap();
        assert_eq!(auth.user.as_deref(), Some("chat"));
        assert_eq!(auth.password.as_deref(), Some("s@cret"));
        assert_eq!(auth.inbox_prefix(), "_INBOX_chat");
    }

    #[test]
    fn a_url_without_credentials_has_none() {
        let auth = NatsAuth::from_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(auth, NatsAuth::default());
        assert_eq!(auth.inbox_prefix(), "_INBOX");
    }

    #[test]
    fn a_user_alone_is_a_token() {
        let auth = NatsAuth::from_url("nats://t0ken@127.0.0.1:4222").unwrap();
        assert_eq!(auth.user.as_deref(), Some("t0ken"));
        assert_eq!(auth.password, None);
        assert_eq!(auth.inbox_prefix(), "_INBOX");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("nats://chat:secret@h:4222,nats://t@h2"),
            "nats://chat:***@h:4222,nats://***@h2"
        );
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn the_address_handed_to_the_library_has_no_credentials() {
        assert_eq!(
            without_credentials("nats://chat:s%40cret@h:4222, nats://t0ken@h2/x@y,h3:4222"),
            "nats://h:4222, nats://h2/x@y,h3:4222"
        );
        assert_eq!(without_credentials("u:p@h:4222"), "h:4222");
    }

    #[test]
    fn a_comma_separated_list_is_several_servers_without_their_credentials() {
        let addrs = server_addrs("nats://chat:s%40cret@n1:4001, nats://n2:4002,n3").unwrap();
        let shown: Vec<String> = addrs
            .iter()
            .map(|a| a.clone().into_inner().to_string())
            .collect();
        assert_eq!(
            shown,
            ["nats://n1:4001", "nats://n2:4002", "nats://n3"],
            "the credentials go in the options, not in the addresses"
        );
        assert_eq!(addrs[2].port(), 4222, "the default port");
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
    }

    #[test]
    fn a_list_with_a_bad_entry_is_an_error_naming_it() {
        let err = server_addrs("nats://n1:4222,nats://u:pw@n2:42x2").unwrap_err();
        assert!(
            err.contains("`nats://u:***@n2:42x2` is not a NATS URL"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
        let err = server_addrs("nats://n1:4222,,nats://n2:4222").unwrap_err();
        assert!(err.contains("empty entry"), "{err}");
        let err = server_addrs("http://n1:4222").unwrap_err();
        assert!(err.contains("is not a NATS URL"), "{err}");
        let err = server_addrs("nats://n1:4222 nats://n2:4222").unwrap_err();
        assert!(err.contains("is not a NATS URL"), "{err}");
    }
}
