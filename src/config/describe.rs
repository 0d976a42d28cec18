//! Figment's errors as messages that name the key as the user wrote it, and where it came from.

use std::fmt::Write as _;

use figment::Source;

use super::ENV_SPLIT;

/// One line per figment error, naming the key as the user wrote it and where it came from (the file, or
/// the environment variable).
pub(super) fn describe(error: figment::Error, env_prefix: &str) -> String {
    use figment::error::Kind;

    let mut lines = Vec::new();
    for e in error {
        let mut path = e.path.clone();
        let what = match &e.kind {
            Kind::UnknownField(_, expected) => {
                let parent = display_key(&path[..path.len().saturating_sub(1)]);
                let known = if parent.is_empty() {
                    "known sections".to_owned()
                } else {
                    format!("known keys of `{parent}`")
                };
                format!("unknown key ({known}: {})", expected.join(", "))
            }
            Kind::MissingField(field) => {
                if path.last().map(String::as_str) != Some(field.as_ref()) {
                    path.push(field.to_string());
                }
                "missing key".to_owned()
            }
            kind => kind.to_string(),
        };
        let mut line = match e.metadata.as_ref().map(|md| (&md.source, md.name.as_ref())) {
            Some((Some(Source::File(file)), _)) => format!("{}: ", file.display()),
            Some((_, name)) if name.contains("environment") && !e.path.is_empty() => {
                let var = e
                    .path
                    .iter()
                    .map(|k| k.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(ENV_SPLIT);
                format!("environment variable {env_prefix}{var}: ")
            }
            Some((_, name)) => format!("{name}: "),
            None => String::new(),
        };
        let key = display_key(&path);
        if !key.is_empty() {
            let _ = write!(line, "`{key}`: ");
        }
        line.push_str(what.trim_end());
        lines.push(line);
    }
    lines.join("\n")
}

/// `gpus.0.vram_mb` as `gpus[0].vram_mb`, as the validation messages write it.
fn display_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) && !key.is_empty() {
            let _ = write!(key, "[{part}]");
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}
