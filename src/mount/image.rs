//! Cache image files: attached to a free loop device through the loop ioctls (no `losetup`),
//! mounted as ext4, and grown online.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::MountError;

const LOOP_CONTROL: &str = "/dev/loop-control";
// From <linux/loop.h>.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
// _IOW('f', 16, __u64) from <linux/ext4.h>: grow a mounted ext4 to this many blocks.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn image_err(op: &'static str, path: &Path, source: io::Error) -> MountError {
    MountError::Image { op, path: path.to_path_buf(), source }
}

/// Attaches `file` to a free loop device and returns the device's path. The device detaches
/// itself when its last user (the mount) goes (autoclear), so an unmount leaves nothing behind
/// and a crashed process leaks no device.
fn attach(file: &Path) -> Result<(File, PathBuf), MountError> {
    let backing = File::options().read(true).write(true).open(file).map_err(|e| image_err("open", file, e))?;
    let control = File::options()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(|e| image_err("open", Path::new(LOOP_CONTROL), e))?;
    // Another process may take the device between GET_FREE and CONFIGURE: then ask again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(image_err("find a free loop device", Path::new(LOOP_CONTROL), io::Error::last_os_error()));
        }
        let dev_path = PathBuf::from(format!("/dev/loop{number}"));
        let dev = match File::options().read(true).write(true).open(&dev_path) {
            Ok(dev) => dev,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(image_err("open", &dev_path, e)),
        };
        let mut config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let n = name.len().min(63);
        config.info.lo_file_name[..n].copy_from_slice(&name[..n]);
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is laid out as.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
        if rc == 0 {
            return Ok((dev, dev_path));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(image_err("attach a loop device to", file, err));
        }
    }
    Err(image_err("attach a loop device to", file, io::Error::from_raw_os_error(libc::EBUSY)))
}

/// Mounts the ext4 image `file` on `target` (nosuid, nodev: it only holds layers and uppers).
/// `discard` punches freed blocks out of the sparse file, so a dropped upper or a collected
/// layer gives its space back to the node, not only to the cache.
pub fn mount(file: &Path, target: &Path) -> Result<(), MountError> {
    let (dev, dev_path) = attach(file)?;
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    let mounted = nix::mount::mount(Some(&dev_path), target, Some("ext4"), flags, Some("errors=remount-ro,discard"));
    // With autoclear the device goes away once neither the mount nor this fd holds it: on
    // failure, dropping the fd is what detaches it.
    drop(dev);
    mounted.map_err(|e| image_err("mount image on", target, e.into()))
}

/// Grows the filesystem mounted at `target` from the loop device `device` to the size its
/// backing file now has (the caller extended it): the device re-reads the file's size, then
/// ext4 grows online.
pub fn grow(device: &Path, target: &Path, bytes: u64) -> Result<(), MountError> {
    let dev = File::options().read(true).write(true).open(device).map_err(|e| image_err("open", device, e))?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(image_err("update the capacity of", device, io::Error::last_os_error()));
    }
    let block = nix::sys::statvfs::statvfs(target).map_err(|e| image_err("statvfs", target, e.into()))?.fragment_size();
    let blocks: u64 = bytes / block.max(1);
    let root = File::open(target).map_err(|e| image_err("open", target, e))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 block count.
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) } != 0 {
        return Err(image_err("grow the filesystem at", target, io::Error::last_os_error()));
    }
    Ok(())
}
