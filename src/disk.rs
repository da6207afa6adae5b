//! Free space on a filesystem, and making what was written to it durable:
//! shared by the box (its reserve, its chunk store) and the device library
//! (room for an artifact, its chunk cache), so it lives below both.

use std::path::Path;

/// Make everything written to the filesystem holding `dir` durable (data,
/// names and folders): `syncfs(2)`. One call for a batch of files costs
/// about what one `fsync` does, where a file-and-folder fsync each costs
/// two per file (a 64 MiB artifact is ~850 chunk files).
pub fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// (total, available) bytes of the filesystem holding `dir`.
pub fn fs_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// [`fs_space`] of `dir`, or of its nearest existing ancestor when `dir`
/// is not created yet (the filesystem it will be created on).
pub fn fs_space_of(dir: &Path) -> std::io::Result<(u64, u64)> {
    let mut at = dir;
    loop {
        match fs_space(at) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => return fs_space(Path::new(".")),
            },
            r => return r,
        }
    }
}
