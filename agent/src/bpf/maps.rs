//! The map writer: the pinned maps the agent keeps up to date (the [`MapSink`] behind the
//! model in `state`), and what it reads back from them.
use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use rthooks_common::{
    pins, BinaryRules, ContainerPolicies, PolicySet, Settings, MAX_BINARIES, MAX_CONTAINERS,
};

use super::programs::Programs;
use crate::error::Error;
use crate::state::{MapContents, MapSink};

pub struct MapWriter {
    containers: BpfHashMap<MapData, u64, ContainerPolicies>,
    binaries: BpfHashMap<MapData, u64, BinaryRules>,
    settings: Array<MapData, Settings>,
    drops: PerCpuArray<MapData, u64>,
}

impl MapWriter {
    /// Takes the maps it writes, and the event ring buffer for the event reader, out of
    /// the loaded object.
    pub fn take(programs: &mut Programs) -> Result<(MapWriter, RingBuf<MapData>), Error> {
        let containers = BpfHashMap::try_from(programs.take_map(pins::CONTAINERS)?)
            .map_err(Error::map(pins::CONTAINERS))?;
        let binaries = BpfHashMap::try_from(programs.take_map(pins::BINARIES)?)
            .map_err(Error::map(pins::BINARIES))?;
        let settings = Array::try_from(programs.take_map(pins::SETTINGS)?)
            .map_err(Error::map(pins::SETTINGS))?;
        let drops = PerCpuArray::try_from(programs.take_map(pins::DROPS)?)
            .map_err(Error::map(pins::DROPS))?;
        let events = RingBuf::try_from(programs.take_map(pins::EVENTS)?)
            .map_err(Error::map(pins::EVENTS))?;
        Ok((
            MapWriter {
                containers,
                binaries,
                settings,
                drops,
            },
            events,
        ))
    }

    pub fn capacities() -> (u32, u32) {
        (MAX_CONTAINERS, MAX_BINARIES)
    }
}

impl MapSink for MapWriter {
    fn set_container(&mut self, cgroup_id: u64, policies: PolicySet) -> Result<(), Error> {
        self.containers
            .insert(cgroup_id, ContainerPolicies { policies }, 0)
            .map_err(Error::map("containers"))
    }

    fn remove_container(&mut self, cgroup_id: u64) -> Result<(), Error> {
        match self.containers.remove(&cgroup_id) {
            // Already gone: the cgroup_rmdir program removed it.
            Err(MapError::KeyNotFound) => Ok(()),
            r => r.map_err(Error::map("containers")),
        }
    }

    fn set_binary(&mut self, hash: u64, rules: BinaryRules) -> Result<(), Error> {
        self.binaries
            .insert(hash, rules, 0)
            .map_err(Error::map("binaries"))
    }

    fn remove_binary(&mut self, hash: u64) -> Result<(), Error> {
        match self.binaries.remove(&hash) {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r.map_err(Error::map("binaries")),
        }
    }

    fn set_cgroup_levels(&mut self, levels: u64) -> Result<(), Error> {
        self.settings
            .set(
                0,
                Settings {
                    cgroup_levels: levels,
                },
                0,
            )
            .map_err(Error::map("settings"))
    }

    fn contents(&self) -> MapContents {
        contents_of(&self.containers, &self.binaries, &self.settings)
    }

    fn ring_buffer_drops(&self) -> u64 {
        self.drops.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// What the containers, binaries and settings maps hold.
fn contents_of(
    containers: &BpfHashMap<MapData, u64, ContainerPolicies>,
    binaries: &BpfHashMap<MapData, u64, BinaryRules>,
    settings: &Array<MapData, Settings>,
) -> MapContents {
    let containers = containers
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k, v.policies))
        .collect();
    let binaries = binaries.iter().filter_map(Result::ok).collect();
    let levels = settings.get(&0, 0).map(|s| s.cgroup_levels).unwrap_or(0);
    (containers, binaries, levels)
}

/// What the maps an agent pinned under `pin_dir` hold, read from the kernel without the
/// agent (which may be down: its pinned programs go on enforcing what these say).
pub fn read_pinned(pin_dir: &Path) -> Result<MapContents, Error> {
    fn open(pin_dir: &Path, name: &'static str) -> Result<Map, Error> {
        MapData::from_pin(pin_dir.join(name))
            .and_then(Map::from_map_data)
            .map_err(Error::map(name))
    }
    let containers = BpfHashMap::try_from(open(pin_dir, pins::CONTAINERS)?)
        .map_err(Error::map(pins::CONTAINERS))?;
    let binaries =
        BpfHashMap::try_from(open(pin_dir, pins::BINARIES)?).map_err(Error::map(pins::BINARIES))?;
    let settings =
        Array::try_from(open(pin_dir, pins::SETTINGS)?).map_err(Error::map(pins::SETTINGS))?;
    Ok(contents_of(&containers, &binaries, &settings))
}
