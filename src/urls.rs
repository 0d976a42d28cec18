//! The servers' URLs of the configuration, parsed once at start (a URL that cannot be parsed would
//! otherwise be retried for ever as a server that does not answer): below the configuration, which
//! checks them, and the adapters, which connect with them.

use sea_orm::sqlx::postgres::PgConnectOptions;

use crate::telemetry::redact_url;

/// The URLs of the hosts `url` names, one each, in order; the user, database and parameters of `url`
/// go with each. A URL of one host comes back as it is. The error says which part is wrong (the
/// password left out), for a message naming `database.url`.
pub fn postgres_hosts(url: &str) -> Result<Vec<String>, String> {
    let single = |one: &str| {
        one.parse::<PgConnectOptions>()
            .map(|_| one.to_owned())
            .map_err(|e| format!("`{}` cannot be parsed: {e}", redact_url(one)))
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not echoed: without its scheme, the password cannot be told from the rest.
        return Err("it is not a URL (postgres://user@host:port/database)".to_owned());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (user, list) = match authority.rsplit_once('@') {
        Some((user, list)) => (format!("{user}@"), list),
        None => (String::new(), authority),
    };
    let query = tail.split_once('?').map_or("", |(_, q)| q);
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if ["host", "hostaddr", "port"].contains(&key) && value.contains(',') {
            return Err(format!(
                "`?{key}=` lists several values: name the hosts in the URL itself \
                 (postgres://user@h1:5432,h2:5432/database)"
            ));
        }
    }
    if !list.contains(',') {
        return Ok(vec![single(url)?]);
    }
    list.split(',')
        .map(|host| {
            if host.is_empty() {
                return Err(format!("`{list}` has an empty host between commas"));
            }
            let port = match host.strip_prefix('[') {
                // `[::1]:5432`
                Some(v6) => v6
                    .split_once(']')
                    .map(|(_, after)| after)
                    .ok_or_else(|| format!("host `{host}`: an IPv6 address must end with `]`"))?,
                None => host.find(':').map_or("", |at| &host[at..]),
            };
            if let Some(port) = port.strip_prefix(':') {
                if port.parse::<u16>().is_err() {
                    return Err(format!("host `{host}`: the port `{port}` is not a number"));
                }
            } else if !port.is_empty() {
                return Err(format!("host `{host}` cannot be parsed"));
            }
            single(&format!("{scheme}://{user}{host}{tail}"))
        })
        .collect()
}

/// A Sentinel's address as `redis.sentinels` gives it (`host:port` or a `redis://` URL) as a URL.
pub fn sentinel_url(entry: &str) -> Result<String, String> {
    let entry = entry.trim();
    let url = if entry.contains("://") {
        entry.to_owned()
    } else {
        format!("redis://{entry}")
    };
    let parsed = redis::parse_redis_url(&url)
        .ok_or_else(|| format!("{entry:?} is not `host:port` nor a redis:// URL"))?;
    if parsed.port().is_none() {
        return Err(format!(
            "{entry:?} names no port (Sentinels listen on their own port, often 26379)"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::postgres_hosts as hosts;

    #[test]
    fn one_host_comes_back_as_it_is() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/gpu",
            "postgres://u:pw@db/gpu?sslmode=disable",
            "postgresql://localhost",
        ] {
            assert_eq!(hosts(url), Ok(vec![url.to_owned()]));
        }
    }

    #[test]
    fn several_hosts_become_one_url_each_with_the_rest_of_the_url() {
        assert_eq!(
            hosts("postgres://u:pw@h1:5432,h2:5433,h3/db?sslmode=disable").unwrap(),
            [
                "postgres://u:pw@h1:5432/db?sslmode=disable",
                "postgres://u:pw@h2:5433/db?sslmode=disable",
                "postgres://u:pw@h3/db?sslmode=disable",
            ]
        );
        assert_eq!(
            hosts("postgresql://[::1]:5432,127.0.0.1").unwrap(),
            ["postgresql://[::1]:5432", "postgresql://127.0.0.1"]
        );
    }

    #[test]
    fn a_bad_list_says_what_is_wrong_and_hides_the_password() {
        for (url, says) in [
            ("postgres://u:secretpw@h1:5432,,h2/db", "empty host"),
            (
                "postgres://u:secretpw@h1:5432,h2:54x2/db",
                "`54x2` is not a number",
            ),
            ("postgres://u:secretpw@h1,[::1/db", "must end with `]`"),
            ("postgres://u:secretpw@h1,h2:/db", "is not a number"),
            ("u:secretpw@h1,h2/db", "is not a URL"),
            ("postgres://u:secretpw@h1:99999/db", "cannot be parsed"),
            (
                "postgres://u:secretpw@/db?host=h1,h2",
                "`?host=` lists several",
            ),
        ] {
            let why = hosts(url).expect_err(url);
            assert!(why.contains(says), "{url}: {why}");
            assert!(!why.contains("secretpw"), "{url}: {why}");
        }
    }
}
