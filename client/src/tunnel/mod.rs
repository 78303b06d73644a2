//! The laptop's end of the tunnel, shared by `burrow up` and the daemon:
//! the TUN device ([`tun`]), links, addresses and routes ([`netlink`]),
//! the data path ([`datapath`], with the TUN offloads of [`offload`] and the
//! framed transport's [`links`]), the
//! crash-safety state file ([`state`]) and, for `up`, the plan from a
//! WireGuard configuration ([`plan`]).
//!
//! Bring-up and teardown are one sequence for both ([`Device`]): refuse
//! first, while nothing is changed yet ([`check_free`]); write the state
//! file before any change; create the device, record its index, give it
//! its MTU, addresses and routes; and on the way out remove what is still
//! there, then the state file.

use std::path::PathBuf;

use anyhow::Context as _;
use ipnet::IpNet;

pub mod datapath;
pub mod links;
pub mod netlink;
pub mod offload;
pub mod plan;
pub mod state;
pub mod tun;

use netlink::{KernelRoute, Netlink, find_conflict};
use state::{Paths, State};
use tun::Tun;

/// Why a device cannot be brought up; each caller says it in its own
/// terms (which flag or file to change).
#[derive(Debug)]
pub enum Refusal {
    /// A link with the device's name exists.
    NameInUse,
    /// One of our routes overlaps an existing route.
    Overlap { ours: IpNet, theirs: KernelRoute },
}

/// Whether device `name` with `routes` could be brought up; changes
/// nothing.
pub async fn check_free(
    nl: &Netlink,
    name: &str,
    routes: &[IpNet],
) -> anyhow::Result<Option<Refusal>> {
    if nl.link_index(name).await?.is_some() {
        return Ok(Some(Refusal::NameInUse));
    }
    let existing = nl.routes().await?;
    Ok(
        find_conflict(routes, &existing, None).map(|(ours, theirs)| Refusal::Overlap {
            ours,
            theirs: theirs.clone(),
        }),
    )
}

/// What the device is given.
pub struct Layout<'a> {
    pub name: &'a str,
    pub mtu: u16,
    pub addresses: &'a [IpNet],
    pub routes: &'a [IpNet],
    /// What the state file names as the configuration (`up`'s file, the
    /// daemon's key).
    pub config: PathBuf,
}

/// A TUN device this process brought up, as its state file records it.
pub struct Device {
    state: State,
    paths: Paths,
    index: u32,
}

impl Device {
    /// Writes the state file, then creates the device and gives it its
    /// MTU, addresses and routes. On error, what was done is undone.
    pub async fn bring_up(
        nl: &Netlink,
        paths: &Paths,
        layout: Layout<'_>,
    ) -> anyhow::Result<(Self, Tun)> {
        let mut state =
            State::for_this_process(layout.name, layout.routes.to_vec(), layout.config.clone())?;
        state.create(paths)?;
        match configure(nl, &mut state, paths, &layout).await {
            Ok((tun, index)) => Ok((
                Self {
                    state,
                    paths: paths.clone(),
                    index,
                },
                tun,
            )),
            Err(e) => Err(match tear_down(nl, &state, paths).await {
                Ok(()) => e,
                Err(c) => anyhow::anyhow!("{e:#}; and cleaning up failed too: {c:#}"),
            }),
        }
    }

    /// The device's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Records that the tunnel is up and passing traffic.
    pub fn set_ready(&mut self) -> anyhow::Result<()> {
        self.state.ready = true;
        self.state.update(&self.paths)
    }

    /// Removes what this process added (what is still there: a closed
    /// device takes its routes with it) and the state file.
    pub async fn tear_down(&self, nl: &Netlink) -> anyhow::Result<()> {
        tear_down(nl, &self.state, &self.paths).await
    }
}

/// Creates the device, records its index, sets MTU, addresses and routes.
async fn configure(
    nl: &Netlink,
    state: &mut State,
    paths: &Paths,
    layout: &Layout<'_>,
) -> anyhow::Result<(Tun, u32)> {
    let name = layout.name;
    let tun = Tun::create(name)?;
    let index = nl
        .link_index(name)
        .await?
        .with_context(|| format!("device {name} vanished right after it was created"))?;
    state.ifindex = Some(index);
    state.update(paths)?;
    nl.set_up(index, name, layout.mtu).await?;
    for net in layout.addresses {
        nl.add_address(index, name, *net).await?;
    }
    for net in layout.routes {
        if let Err(e) = nl.add_route(index, name, *net).await {
            // The kernel's own route for an address like 10.8.0.2/24 is
            // already what we want.
            if !nl.has_route(index, *net).await? {
                return Err(e);
            }
        }
    }
    Ok((tun, index))
}

/// Removes what `state` names and is still there, then the state file.
async fn tear_down(nl: &Netlink, state: &State, paths: &Paths) -> anyhow::Result<()> {
    if let Some(index) = state.ifindex {
        for net in &state.routes {
            nl.del_route(index, *net).await?;
        }
        if nl.link_name(index).await?.as_deref() == Some(state.ifname.as_str()) {
            nl.del_link(index).await?;
        }
    }
    state::remove(paths)
}
