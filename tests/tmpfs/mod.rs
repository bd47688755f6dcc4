//! A small tmpfs for the full-disk tests: mounted on a temporary directory
//! (root only; a test skips with the reason otherwise) and unmounted when
//! dropped, plus the helpers that fill it to a chosen free space.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `bytes`, or says why it cannot.
    pub fn mount(bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount did not run: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!("mount -t tmpfs failed ({}): {}", output.status, stderr.trim()));
        }
        Ok(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("umount {} failed: {status:?}", self.dir.path().display());
        }
    }
}

/// Bytes free for a writer on the file system of `path`.
pub fn available_bytes(path: &Path) -> u64 {
    let output = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().nth(1).expect("df prints a value").trim().parse().unwrap()
}

/// Fills `path` with `bytes` bytes of data, synced.
pub fn write_ballast(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xAB; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    file.sync_all().unwrap();
}
