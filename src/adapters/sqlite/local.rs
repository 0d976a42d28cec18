//! The data directory must be on a local filesystem. On a network one (NFS, SMB, ...) neither guard of
//! the embedded store holds: `flock`, which lets one coordinator at a time lead, may be local to each
//! client (`local_lock`, `localflock`) or dropped while its holder still writes, and SQLite's write-ahead
//! log wants every process that opens the database on one host. Two coordinators could then write one
//! database. Checked from the filesystem's type (`statfs`), before the lock is taken.

use std::path::Path;

use super::SqliteError;

/// The network filesystems refused, by their `statfs` type (`f_type`, from `linux/magic.h`).
const NETWORK: &[(u32, &str)] = &[
    (0x0000_6969, "NFS"),
    (0x0000_517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x5346_414F, "AFS"),
    (0x6B41_4653, "AFS"),
    (0x00C3_6400, "CephFS"),
    (0x0BD0_0BD0, "Lustre"),
];

/// The name of the network filesystem of type `f_type`, if it is one.
pub fn network_filesystem(f_type: u32) -> Option<&'static str> {
    NETWORK
        .iter()
        .find(|(magic, _)| *magic == f_type)
        .map(|(_, name)| *name)
}

/// Refuses the data directory `dir` (which exists) when it is on a network filesystem.
pub fn check_local(dir: &Path) -> Result<(), SqliteError> {
    match filesystem_type(dir) {
        Some(f_type) => refuse_network(dir, f_type),
        None => Ok(()),
    }
}

/// The error for `dir` on a filesystem of type `f_type`, if that is a network one.
pub fn refuse_network(dir: &Path, f_type: u32) -> Result<(), SqliteError> {
    match network_filesystem(f_type) {
        Some(filesystem) => Err(SqliteError::NetworkFilesystem {
            dir: dir.to_owned(),
            filesystem,
        }),
        None => Ok(()),
    }
}

/// The `statfs` type of the filesystem `dir` is on; `None` where it cannot be read (then nothing is
/// refused: opening the database reports what is wrong with the directory).
#[cfg(target_os = "linux")]
fn filesystem_type(dir: &Path) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt as _;

    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the size `statfs` writes.
    let done = unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) };
    if done != 0 {
        return None;
    }
    // SAFETY: `statfs` succeeded, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // The magic numbers fit in 32 bits; `f_type` is wider on some targets, and signed on some.
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_type as u32)
}

#[cfg(not(target_os = "linux"))]
fn filesystem_type(_dir: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_named_and_local_ones_are_not() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0xFF53_4D42), Some("CIFS"));
        assert_eq!(network_filesystem(0xFE53_4D42), Some("SMB2"));
        // ext4, XFS, Btrfs, tmpfs, overlayfs
        for local in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x794C_7630] {
            assert_eq!(network_filesystem(local), None, "{local:#x}");
        }
    }

    #[test]
    fn a_data_directory_on_nfs_is_refused_by_name() {
        let dir = Path::new("/mnt/shared/gpu-coordinator");
        let err = refuse_network(dir, 0x6969).expect_err("NFS is refused");
        let msg = err.to_string();
        assert!(msg.contains("/mnt/shared/gpu-coordinator"), "{msg}");
        assert!(msg.contains("NFS"), "{msg}");
        assert!(msg.contains("local disk"), "{msg}");
        refuse_network(dir, 0xEF53).expect("ext4 is local");
    }

    #[test]
    fn a_local_directory_passes() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(filesystem_type(dir.path()).is_some() || cfg!(not(target_os = "linux")));
        check_local(dir.path()).expect("the temporary directory is local");
    }
}
