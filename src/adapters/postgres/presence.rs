//! A coordinator's presence on its host: a file it holds an exclusive `flock` on for as long as its
//! process lives, so that a coordinator of the same host that finds the file unlocked knows the holder
//! is gone (see [`PgLeadership`](super::PgLeadership)).

/// An exclusive `flock` on `<tmp>/gpu-coordinator-leaders/<holder>`, held while the process lives: the
/// kernel drops it when the process ends, however it ends.
pub(super) struct Presence {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl Presence {
    pub(super) fn dir() -> std::path::PathBuf {
        std::env::temp_dir().join("gpu-coordinator-leaders")
    }

    /// The file of `holder` (its name kept to letters, digits, `-`, `_` and `.`).
    pub(super) fn path(holder: &str) -> std::path::PathBuf {
        let name: String = holder
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Presence::dir().join(name)
    }

    /// Makes and locks the file of `holder`.
    pub(super) fn hold(holder: &str) -> std::io::Result<Presence> {
        std::fs::create_dir_all(Presence::dir())?;
        let path = Presence::path(holder);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.try_lock().map_err(std::io::Error::other)?;
        Ok(Presence { _file: file, path })
    }

    /// Whether `holder` is known to be gone: its file is here and nobody holds its lock. Unknown (a
    /// holder of another host, a file out of sight, an error) is not gone.
    pub(super) fn gone(holder: &str) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .open(Presence::path(holder))
        else {
            return false;
        };
        file.try_lock().is_ok()
    }

    /// Deletes the file of a holder that is gone.
    pub(super) fn remove(holder: &str) {
        let _ = std::fs::remove_file(Presence::path(holder));
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The file that tells the coordinators of this host that `holder` lives, while it is locked.
pub fn presence_file(holder: &str) -> std::path::PathBuf {
    Presence::path(holder)
}

#[cfg(test)]
mod tests {
    use super::Presence;

    fn unique_holder() -> String {
        format!("host-{}-{:08x}", std::process::id(), rand::random::<u32>())
    }

    #[test]
    fn a_live_holder_is_not_gone_nor_an_unknown_one() {
        let holder = unique_holder();
        assert!(!Presence::gone(&holder), "never seen: unknown, not gone");
        let presence = Presence::hold(&holder).expect("the presence file");
        assert!(!Presence::gone(&holder), "held by a live holder");
        drop(presence);
        assert!(
            !Presence::gone(&holder),
            "a graceful end takes the file away"
        );
    }

    #[test]
    fn a_lock_dropped_with_its_file_left_reads_as_gone() {
        // What a killed process leaves: its file, with nobody holding the lock.
        let holder = unique_holder();
        std::fs::create_dir_all(Presence::dir()).expect("the directory");
        let file = std::fs::File::create(Presence::path(&holder)).expect("the file");
        file.try_lock().expect("locked");
        assert!(!Presence::gone(&holder), "locked: alive");
        drop(file);
        assert!(Presence::gone(&holder));
        Presence::remove(&holder);
        assert!(!Presence::gone(&holder), "no file: unknown");
    }
}
