//! A small disk of a test's own, to fill: a tmpfs mounted on a fresh directory (it needs root, or
//! CAP_SYS_ADMIN).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use crate::unique;

/// A tmpfs of a given size mounted on a fresh directory, unmounted when dropped (lazily, so that a
/// test that failed with a server's files still open leaves no mount behind), then the directory
/// removed.
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`6m`, `64m`) on a new directory named after `tag`.
    pub fn mount(tag: &str, size: &str) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!("gpu-it-{}", unique(tag)));
        std::fs::create_dir_all(&dir).expect("the mount point can be made");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        if !mounted.success() {
            let _ = std::fs::remove_dir(&dir);
            panic!(
                "cannot mount a {size} tmpfs on {}: this test fills a disk of its own and needs \
                 the right to mount one (root, or CAP_SYS_ADMIN)",
                dir.display()
            );
        }
        SmallDisk { dir }
    }

    /// Writes zeros into `filler` until the disk refuses more, then gives `margin` bytes back, so that
    /// a store runs out of space while it works; returns the filler's path.
    pub fn fill(&self, margin: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("the filler can be made");
        // Large blocks first, then smaller ones into what is left, down to single bytes.
        for block in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
            let zeros = vec![0u8; block];
            while file.write_all(&zeros).is_ok() {}
        }
        let len = file.metadata().expect("the filler's size").len();
        file.set_len(len.saturating_sub(margin))
            .expect("the filler gives the margin back");
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
