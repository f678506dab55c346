//! The kernel side of the agent, in two halves that share nothing but the loaded object:
//! [`programs`] loads the eBPF object, attaches and pins its programs ([`mode`] chooses
//! the exec hook point), and [`maps`] is the map writer the model (`state`) drives.
//! [`fs`] mounts the pseudo file systems both need.
pub mod fs;
pub mod maps;
pub mod mode;
pub mod programs;

use std::path::Path;

use aya::maps::{MapData, RingBuf};

pub use maps::MapWriter;
pub use mode::{Mode, RequestedMode};
pub use programs::{unpin_all, Programs};

use crate::error::Error;

/// Everything [`load`] sets up.
pub struct Loaded {
    /// Keep alive as long as the agent runs.
    pub programs: Programs,
    pub maps: MapWriter,
    /// The kernel's event records, for the event reader.
    pub events: RingBuf<MapData>,
}

/// Loads and attaches the programs (in the best mode `requested` admits), then takes out
/// the maps the agent writes.
pub fn load(pin_dir: &Path, requested: RequestedMode) -> Result<Loaded, Error> {
    let mut programs = Programs::load(pin_dir, requested)?;
    let (maps, events) = MapWriter::take(&mut programs)?;
    Ok(Loaded {
        programs,
        maps,
        events,
    })
}
