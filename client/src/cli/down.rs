//! `burrow down`: stop a `burrow up` started in the background, and remove
//! whatever a killed one left behind.
//!
//! A running one gets SIGTERM (it removes its device, routes and state file
//! itself), then SIGKILL if it has not exited after [`TERM_TIMEOUT`]; in
//! every case what its state file still names is removed afterwards.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Global;
use crate::tunnel::netlink::Netlink;
use crate::tunnel::state::{self, Paths, Previous, State};
use crate::tunnel::tun::{DEFAULT_IFNAME, parse_ifname};

/// How long a `burrow up` gets to clean up after SIGTERM.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the process to vanish after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(3);

/// Stop the `burrow up` running on a device and remove what it left.
#[derive(Args, Debug)]
pub struct DownArgs {
    /// Name of the device `burrow up` created.
    #[arg(long, value_name = "IFNAME", default_value = DEFAULT_IFNAME, value_parser = parse_ifname)]
    name: String,
}

pub fn run(args: DownArgs, global: &Global) -> anyhow::Result<()> {
    crate::require_root("down", "it removes a TUN device and its routes")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(down(args, global))
}

async fn down(args: DownArgs, global: &Global) -> anyhow::Result<()> {
    let name = &args.name;
    let paths = Paths::new(&global.run_dir, name);
    let nl = Netlink::connect()?;
    match state::inspect(&paths)? {
        Previous::None => {
            println!(
                "no `burrow up` is running on {name} (no {})",
                paths.state.display()
            );
        }
        Previous::Unreadable(why) => println!("{}", state::clean_unreadable(&paths, &why)?),
        Previous::Stale(st) => println!("{}", state::clean_stale(&nl, &st, &paths).await?),
        Previous::Running(st) => {
            let how = stop(&st).await?;
            println!("stopped `burrow up` on {name} (pid {}, {how})", st.pid);
            // After a clean exit there is no state file any more.
            match state::inspect(&paths)? {
                Previous::None => {}
                Previous::Stale(st) => println!("{}", state::clean_stale(&nl, &st, &paths).await?),
                Previous::Unreadable(why) => {
                    println!("{}", state::clean_unreadable(&paths, &why)?)
                }
                Previous::Running(st) => anyhow::bail!(
                    "`burrow up` on {name} (pid {}) is still running after SIGKILL",
                    st.pid
                ),
            }
        }
    }
    Ok(())
}

/// SIGTERM, wait, SIGKILL, wait; says which ended it.
async fn stop(st: &State) -> anyhow::Result<&'static str> {
    let pid = Pid::from_raw(i32::try_from(st.pid).context("pid out of range")?);
    if signal(pid, Signal::SIGTERM)? && wait_gone(st, TERM_TIMEOUT).await {
        return Ok("SIGTERM");
    }
    tracing::warn!(
        pid = st.pid,
        "`burrow up` did not exit within {}s of SIGTERM; sending SIGKILL",
        TERM_TIMEOUT.as_secs()
    );
    signal(pid, Signal::SIGKILL)?;
    if wait_gone(st, KILL_TIMEOUT).await {
        Ok("SIGKILL after SIGTERM timed out")
    } else {
        anyhow::bail!("`burrow up` (pid {}) survived SIGKILL", st.pid)
    }
}

/// Send `sig`; `false` if the process is already gone.
fn signal(pid: Pid, sig: Signal) -> anyhow::Result<bool> {
    match kill(pid, sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot send {sig} to pid {pid}")),
    }
}

async fn wait_gone(st: &State, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while state::is_running(st) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}
