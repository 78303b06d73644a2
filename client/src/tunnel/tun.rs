//! The TUN device: created with the `tun` crate (layer 3, no packet
//! information header, not persistent, so the kernel removes it, and every
//! route through it, when the last descriptor closes, even after SIGKILL).
//! Addresses, MTU and routes are set over netlink by the caller, not by the
//! crate's ioctls.
//!
//! The device is driven through tokio's [`AsyncFd`] directly rather than the
//! crate's `AsyncDevice`, so the data path can read every packet that is
//! ready in one wake-up ([`Tun::try_recv`]) and write without waiting.
//!
//! Offloads: the device is opened with `IFF_VNET_HDR`, so every read and
//! write carries a `virtio_net_hdr` ([`crate::tunnel::offload`]), and asks for
//! checksum + TSO offload (`TUNSETOFFLOAD`), so a read can be a TCP segment
//! of up to 64 KiB that the data path splits. When the kernel refuses the
//! offload, reads are single packets with an empty header (logged).
//! Writes carry a zero header for a plain packet, or a GSO header for a run
//! of one flow's segments that [`crate::tunnel::offload::Coalescer`] joined.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const TUN_CONTROL: &str = "/dev/net/tun";

/// The device `burrow up` creates unless told otherwise.
pub const DEFAULT_IFNAME: &str = "burrow0";

/// A Linux interface name: 1 to 15 bytes, no `/`, `:`, whitespace, not `.`
/// or `..` (clap value parser for `--name`).
pub fn parse_ifname(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() < libc::IFNAMSIZ
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a valid interface name (1 to {} characters, no `/`, `:` or spaces)",
            libc::IFNAMSIZ - 1
        ))
    }
}

/// Why the device could not be created, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(
        "{TUN_CONTROL} is missing: this kernel offers no TUN devices here \
         (load the module with `modprobe tun`, or in a container pass the device through)"
    )]
    NoTunSupport,
    #[error("device name {0} is in use by another interface; choose another with --name")]
    NameInUse(String),
    #[error("creating a TUN device needs root (CAP_NET_ADMIN): run `sudo burrow up ...`")]
    NotPermitted,
    #[error("cannot create TUN device {name}: {source}")]
    Other {
        name: String,
        #[source]
        source: tun::Error,
    },
}

/// A TUN device, non-blocking, registered with the tokio reactor.
pub struct Tun {
    fd: AsyncFd<tun::Device>,
    /// The kernel took checksum + TSO offload: reads may be TSO segments and
    /// writes may be GSO packets.
    offload: bool,
}

impl Tun {
    pub fn create(name: &str) -> Result<Self, TunError> {
        if !Path::new(TUN_CONTROL).exists() {
            return Err(TunError::NoTunSupport);
        }
        let mut config = tun::Configuration::default();
        config.tun_name(name).platform_config(|p| {
            // Leave addresses, MTU and link state to netlink.
            p.ensure_root_privileges(false);
            p.vnet_hdr(true);
        });
        let device = tun::create(&config).map_err(|e| classify(name, e))?;
        device.set_nonblock().map_err(|e| TunError::Other {
            name: name.to_owned(),
            source: e.into(),
        })?;
        // SAFETY: `tun::Device` owns its descriptor: it stays open, and
        // `as_raw_fd` returns it, until the device is dropped, which only
        // happens through the `AsyncFd`.
        let fd = unsafe { AsyncFd::register_with_interest(device, Interest::READABLE) }.map_err(
            |e| TunError::Other {
                name: name.to_owned(),
                source: e.into_parts().1.into(),
            },
        )?;
        let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; the descriptor is
        // the TUN device's, open for as long as `fd` lives.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offload),
            )
        };
        if r == 0 {
            tracing::info!(
                device = name,
                "TUN offload on: checksum + TSO, segmented in userspace"
            );
        } else {
            tracing::info!(
                device = name,
                error = %io::Error::last_os_error(),
                "TUN offload refused by the kernel: one packet per read"
            );
        }
        Ok(Self {
            fd,
            offload: r == 0,
        })
    }

    /// Whether GSO packets may be written ([`Tun::send_parts`]).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Wait until a packet may be ready to read.
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Readiness is cleared by `try_recv` when a read would block.
        guard.retain_ready();
        Ok(())
    }

    /// Read one vnet header + packet (or TSO segment) if one is ready:
    /// `Ok(None)` when none is.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.fd.try_io(Interest::READABLE, |d| d.recv(buf)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write a vnet header and a packet (a GSO packet when the header says
    /// so) as one TUN write, without waiting: a TUN write only blocks when
    /// the kernel's queue is full, and then the packet is dropped, as a
    /// router would.
    pub fn send_parts(&self, hdr: &[u8], packet: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths
        // that the kernel only reads.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn classify(name: &str, e: tun::Error) -> TunError {
    match &e {
        tun::Error::NameTooLong | tun::Error::InvalidName => TunError::Other {
            name: name.to_owned(),
            source: e,
        },
        tun::Error::Io(io) => match io.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TunError::NoTunSupport,
            // TUNSETIFF on a name held by a device that is not a free TUN.
            Some(libc::EBUSY | libc::EEXIST | libc::EINVAL) => TunError::NameInUse(name.to_owned()),
            Some(libc::EPERM | libc::EACCES) => TunError::NotPermitted,
            _ => TunError::Other {
                name: name.to_owned(),
                source: e,
            },
        },
        _ => TunError::Other {
            name: name.to_owned(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["burrow0", "wg-dev", "a", "fifteen-chars-x"] {
            assert_eq!(parse_ifname(ok).as_deref(), Ok(ok));
        }
        for bad in ["", ".", "..", "a/b", "a:1", "has space", "sixteen-chars-xx"] {
            assert!(parse_ifname(bad).is_err(), "{bad}");
        }
    }
}
