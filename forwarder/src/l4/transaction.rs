//! The one transaction every change to the L4 services goes through — the daemon's and the
//! tests' alike (`L4Services::apply` is this transaction without a state file).
//!
//! Order: the datapath's settings (a reload), then the services' maps ([`L4Services::sync`],
//! in its packet-safe order), then the state file. When a step fails, the maps are put back as
//! they were — settings and services — so a failed change leaves the datapath as it found it;
//! the error says whether putting it back worked too.

use std::path::Path;

use weir_common::{edge::EdgeSettings, l4::DatapathSettings};

use crate::{datapath::DatapathMaps, l4::L4Services, state::RuntimeState};

/// New datapath settings, with the ones in force to put back on failure.
#[derive(Debug, Clone, Copy)]
pub struct SettingsChange {
    pub next: (DatapathSettings, EdgeSettings),
    pub current: (DatapathSettings, EdgeSettings),
}

/// One change: from `current` services to `next`, with settings and a state file if any.
pub struct Change<'a> {
    pub current: &'a L4Services,
    pub next: &'a L4Services,
    pub settings: Option<SettingsChange>,
    /// The runtime state to save, and where, once the maps hold the change.
    pub state: Option<(&'a RuntimeState, &'a Path)>,
}

/// Why a change did not take effect.
#[derive(Debug, thiserror::Error)]
#[error("{failed}{}", match undone {
    Ok(()) => "; nothing was changed".to_string(),
    Err(undo) => format!("; undoing the partial change also failed: {undo}"),
})]
pub struct ChangeFailed {
    /// What failed.
    pub failed: String,
    /// Whether the maps were put back as they were (and if not, why).
    pub undone: Result<(), String>,
}

/// Writes `change` into `maps` (and its state file), or puts the maps back as they were.
pub fn write(maps: &mut DatapathMaps, change: Change<'_>) -> Result<(), ChangeFailed> {
    let Change {
        current,
        next,
        settings,
        state,
    } = change;
    let written = settings
        .map_or(Ok(()), |s| {
            maps.set_settings(s.next.0)
                .and_then(|()| maps.set_edge_settings(s.next.1))
        })
        .and_then(|()| next.sync(maps, Some(current)))
        .map_err(|err| err.to_string())
        .and_then(|()| {
            state.map_or(Ok(()), |(state, file)| {
                state.save(file).map_err(|err| err.to_string())
            })
        });
    let Err(failed) = written else {
        return Ok(());
    };
    let undone = settings
        .map_or(Ok(()), |s| {
            maps.set_settings(s.current.0)
                .and_then(|()| maps.set_edge_settings(s.current.1))
        })
        .and_then(|()| current.sync(maps, Some(next)))
        .map_err(|err| err.to_string());
    Err(ChangeFailed { failed, undone })
}
