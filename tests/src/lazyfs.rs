//! A FUSE filesystem that loses, on a simulated power cut, every byte not
//! covered by `fsync`/`fdatasync` (the approach of the LazyFS research
//! tool): what a process writes lands in a volatile layer in memory, and
//! only an `fsync` of the file copies it to the backing folder. Unmounting
//! without a sync throws the volatile layer away, like the page cache of a
//! machine that lost power.
//!
//! Names (create, rename, link, unlink, mkdir) reach the backing folder at
//! once: this layer is strict about data and lenient about directory
//! entries. `sync_file_range` never reaches a FUSE filesystem, so it makes
//! nothing durable here, as on a real power cut with a volatile disk cache.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// Nothing is cached by the kernel: every lookup and attribute comes here.
const TTL: Duration = Duration::ZERO;

/// A file's content since its last sync, with the byte ranges to copy out.
struct Dirty {
    content: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    truncated: bool,
}

/// The filesystem: backing folder, inode table and volatile layer.
pub struct LazyFs {
    backing: PathBuf,
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_ino: u64,
    dirty: HashMap<u64, Dirty>,
}

impl LazyFs {
    /// A filesystem presenting `backing`.
    pub fn new(backing: &Path) -> Self {
        let mut fs = LazyFs {
            backing: backing.to_path_buf(),
            paths: HashMap::new(),
            inodes: HashMap::new(),
            next_ino: 2,
            dirty: HashMap::new(),
        };
        fs.paths.insert(1, PathBuf::new());
        fs.inodes.insert(PathBuf::new(), 1);
        fs
    }

    fn real(&self, ino: u64) -> Option<PathBuf> {
        self.paths.get(&ino).map(|p| self.backing.join(p))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.paths.get(&parent).map(|p| p.join(name))
    }

    fn ino_of(&mut self, relative: &Path) -> u64 {
        if let Some(ino) = self.inodes.get(relative) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(relative.to_path_buf(), ino);
        self.paths.insert(ino, relative.to_path_buf());
        ino
    }

    fn forget_path(&mut self, relative: &Path) {
        if let Some(ino) = self.inodes.remove(relative) {
            self.paths.remove(&ino);
            self.dirty.remove(&ino);
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let path = self.real(ino).ok_or(libc::ENOENT)?;
        let meta = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
        let kind = if meta.is_dir() {
            FileType::Directory
        } else if meta.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let size = self
            .dirty
            .get(&ino)
            .map_or(meta.len(), |d| d.content.len() as u64);
        let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime()),
            mtime: time(meta.mtime()),
            ctime: time(meta.ctime()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm: (meta.permissions().mode() & 0o7777) as u16,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The volatile copy of `ino`, loaded from the backing file on first use.
    fn dirty(&mut self, ino: u64) -> Result<&mut Dirty, i32> {
        if !self.dirty.contains_key(&ino) {
            let path = self.real(ino).ok_or(libc::ENOENT)?;
            let content = std::fs::read(&path).map_err(|e| errno(&e))?;
            self.dirty.insert(
                ino,
                Dirty {
                    content,
                    ranges: Vec::new(),
                    truncated: false,
                },
            );
        }
        self.dirty.get_mut(&ino).ok_or(libc::EIO)
    }

    /// Copies the volatile layer of `ino` to its backing file. The copy in
    /// memory stays as a cache (it now equals the backing file).
    fn sync(&mut self, ino: u64) -> Result<(), i32> {
        let Some(dirty) = self.dirty.get_mut(&ino) else {
            return Ok(());
        };
        let ranges = std::mem::take(&mut dirty.ranges);
        let truncated = std::mem::take(&mut dirty.truncated);
        let Some(dirty) = self.dirty.get(&ino) else {
            return Ok(());
        };
        let path = self.real(ino).ok_or(libc::ENOENT)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| errno(&e))?;
        for (start, end) in &ranges {
            let end = (*end).min(dirty.content.len());
            if *start < end {
                file.write_all_at(&dirty.content[*start..end], *start as u64)
                    .map_err(|e| errno(&e))?;
            }
        }
        if truncated || file.metadata().map_err(|e| errno(&e))?.len() != dirty.content.len() as u64
        {
            file.set_len(dirty.content.len() as u64)
                .map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    fn entry(&mut self, relative: &Path, reply: ReplyEntry) {
        let ino = self.ino_of(relative);
        match self.attr(ino) {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(code) => {
                self.forget_path(relative);
                reply.error(code)
            }
        }
    }
}

impl LazyFs {
    fn reply_attr(&self, ino: u64, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(code) => reply.error(code),
        }
    }

    /// Removes the entry `name` of `parent` with `remove` (a file or an
    /// empty folder), at once, and forgets its inode.
    fn remove_entry(
        &mut self,
        parent: u64,
        name: &OsStr,
        remove: fn(&Path) -> std::io::Result<()>,
        reply: ReplyEmpty,
    ) {
        let Some(relative) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        match remove(&self.backing.join(&relative)) {
            Ok(()) => {
                self.forget_path(&relative);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn errno(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

impl Filesystem for LazyFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(relative) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if std::fs::symlink_metadata(self.backing.join(&relative)).is_err() {
            return reply.error(libc::ENOENT);
        }
        self.entry(&relative, reply);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.reply_attr(ino, reply);
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if let (Some(mode), Some(path)) = (mode, self.real(ino)) {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
        }
        if let Some(size) = size {
            match self.dirty(ino) {
                Ok(dirty) => {
                    dirty
                        .content
                        .resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
                    dirty.truncated = true;
                }
                Err(code) => return reply.error(code),
            }
        }
        self.reply_attr(ino, reply);
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(relative) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::create_dir(self.backing.join(&relative)) {
            return reply.error(errno(&e));
        }
        let _ = std::fs::set_permissions(
            self.backing.join(&relative),
            std::fs::Permissions::from_mode(mode),
        );
        self.entry(&relative, reply);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove_entry(parent, name, |path| std::fs::remove_file(path), reply);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove_entry(parent, name, |path| std::fs::remove_dir(path), reply);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::rename(self.backing.join(&from), self.backing.join(&to)) {
            return reply.error(errno(&e));
        }
        // The replaced file's volatile layer goes with it; the moved inode
        // (and anything under it) keeps its number and its layer.
        self.forget_path(&to);
        let moved: Vec<(PathBuf, u64)> = self
            .inodes
            .iter()
            .filter(|(path, _)| path.starts_with(&from))
            .map(|(path, ino)| (path.clone(), *ino))
            .collect();
        for (old, ino) in moved {
            let new = match old.strip_prefix(&from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.clone(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            self.inodes.remove(&old);
            self.inodes.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
        reply.ok();
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (Some(from), Some(to)) = (self.real(ino), self.child(newparent, newname)) else {
            return reply.error(libc::ENOENT);
        };
        // A link shares the data: make the source's volatile bytes visible
        // under the new name only as far as they are synced (stricter than
        // a real disk, never laxer).
        if let Err(e) = std::fs::hard_link(&from, self.backing.join(&to)) {
            return reply.error(errno(&e));
        }
        self.entry(&to, reply);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.real(ino) {
            Some(_) => reply.opened(0, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let offset = usize::try_from(offset).unwrap_or(0);
        if let Some(dirty) = self.dirty.get(&ino) {
            let end = (offset + size as usize).min(dirty.content.len());
            let start = offset.min(end);
            return reply.data(&dirty.content[start..end]);
        }
        let Some(path) = self.real(ino) else {
            return reply.error(libc::ENOENT);
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], (offset + got) as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let offset = usize::try_from(offset).unwrap_or(0);
        match self.dirty(ino) {
            Ok(dirty) => {
                let end = offset + data.len();
                if dirty.content.len() < end {
                    dirty.content.resize(end, 0);
                }
                dirty.content[offset..end].copy_from_slice(data);
                dirty.ranges.push((offset, end));
                reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
            }
            Err(code) => reply.error(code),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        // Closing a file makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.sync(ino) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(code),
        }
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names reach the backing folder at once.
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(relative) = self.paths.get(&ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        let entries = match std::fs::read_dir(self.backing.join(&relative)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all: Vec<(u64, FileType, std::ffi::OsString)> = vec![
            (ino, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        for entry in entries.flatten() {
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                _ => FileType::RegularFile,
            };
            let child = relative.join(entry.file_name());
            let child_ino = self.ino_of(&child);
            all.push((child_ino, kind, entry.file_name()));
        }
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(skip) {
            if reply.add(ino, i64::try_from(i + 1).unwrap_or(i64::MAX), kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 30, 1 << 29, 1 << 29, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(relative) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let created = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(flags & libc::O_TRUNC != 0)
            .mode(mode)
            .open(self.backing.join(&relative));
        if let Err(e) = created {
            return reply.error(errno(&e));
        }
        let ino = self.ino_of(&relative);
        match self.attr(ino) {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, 0),
            Err(code) => reply.error(code),
        }
    }
}

/// A mounted [`LazyFs`]; [`Mounted::power_cut`] unmounts it without syncing.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// Mounts a filesystem presenting `backing` at `mountpoint`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Self> {
        let options = [
            MountOption::FSName("trove-lazyfs".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount2(LazyFs::new(backing), mountpoint, &options)?;
        Ok(Mounted {
            session: Some(session),
        })
    }

    /// Throws away every byte not synced and unmounts. Stop every process
    /// using the mount first.
    pub fn power_cut(mut self) {
        if let Some(session) = self.session.take() {
            unmount(session);
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            unmount(session);
        }
    }
}

/// Unmounts and waits for the session's thread. A killed process's files
/// are released by the kernel after it is reaped, so a release can still
/// be in flight at the unmount; the kernel then aborts the connection and
/// the session ends with ECONNABORTED, which `fuser` turns into a panic.
/// The volatile layer is gone either way, as a power cut wants; any other
/// failure still fails the test.
fn unmount(session: fuser::BackgroundSession) {
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.join()));
    if let Err(panic) = joined {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if !message.contains("ConnectionAborted") {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Whether this machine can mount a FUSE filesystem here (root and
/// `/dev/fuse`).
pub fn available() -> bool {
    // The owner of /proc/self is the process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    Path::new("/dev/fuse").exists() && root
}
