//! The machine as ringrun plans on it: packages, their cores, each core's PUs and NUMA nodes.
//!
//! Read with hwloc. A synthetic description or an XML file stands in for the real machine so that plans for a
//! 4-socket server can be made (and tested) on any box.

use std::ffi::CString;
use std::fmt;

use hwloc2::{ObjectType, Topology, TopologyObject};

/// One core: its hardware threads (PU OS indices) and the NUMA nodes local to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Core {
    /// OS indices of its PUs.
    pub pus: Vec<usize>,
    /// OS indices of the NUMA nodes local to it.
    pub numa: Vec<usize>,
}

/// One package (socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    /// Logical index.
    pub index: usize,
    /// Its cores in logical order.
    pub cores: Vec<Core>,
}

/// What was read and from where.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Packages in logical order.
    pub packages: Vec<Package>,
    /// "this machine", "synthetic:..." or the XML path.
    pub source: String,
    /// False when the topology describes another machine: binding cannot apply.
    pub is_this_system: bool,
}

/// Where the topology comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The machine ringrun runs on.
    ThisSystem,
    /// An hwloc synthetic description, e.g. "package:4 numa:2 core:28 pu:2".
    Synthetic(String),
    /// An hwloc XML export (lstopo --of xml).
    Xml(String),
}

impl Source {
    /// Parses the `--topology` argument.
    pub fn parse(arg: &str) -> Source {
        match arg.strip_prefix("synthetic:") {
            Some(desc) => Source::Synthetic(desc.trim().to_string()),
            None => Source::Xml(arg.to_string()),
        }
    }
}

/// Why a topology could not be read.
#[derive(Debug)]
pub struct TopoError(pub String);

impl fmt::Display for TopoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// hwloc2 cannot load from a synthetic description or XML, and hwloc's environment overrides fall back to the
// real machine on a bad description without a word. So the description is validated through the C API first.
#[repr(C)]
struct HwlocTopo {
    _private: [u8; 0],
}
extern "C" {
    fn hwloc_topology_init(t: *mut *mut HwlocTopo) -> i32;
    fn hwloc_topology_set_synthetic(t: *mut HwlocTopo, desc: *const libc::c_char) -> i32;
    fn hwloc_topology_set_xml(t: *mut HwlocTopo, path: *const libc::c_char) -> i32;
    fn hwloc_topology_load(t: *mut HwlocTopo) -> i32;
    fn hwloc_topology_destroy(t: *mut HwlocTopo);
}

fn validate(source: &Source) -> Result<(), TopoError> {
    let (arg, what) = match source {
        Source::ThisSystem => return Ok(()),
        Source::Synthetic(d) => (d.clone(), "synthetic description"),
        Source::Xml(p) => {
            std::fs::File::open(p)
                .map_err(|e| TopoError(format!("cannot read topology file {p}: {e}")))?;
            (p.clone(), "topology XML file")
        }
    };
    let c = CString::new(arg.clone())
        .map_err(|_| TopoError(format!("{what} {arg:?} contains a NUL byte")))?;
    unsafe {
        let mut t = std::ptr::null_mut();
        if hwloc_topology_init(&mut t) != 0 {
            return Err(TopoError("hwloc_topology_init failed".into()));
        }
        let set = match source {
            Source::Synthetic(_) => hwloc_topology_set_synthetic(t, c.as_ptr()),
            _ => hwloc_topology_set_xml(t, c.as_ptr()),
        };
        let ok = set == 0 && hwloc_topology_load(t) == 0;
        hwloc_topology_destroy(t);
        if !ok {
            return Err(TopoError(format!("hwloc cannot use the {what} {arg:?}")));
        }
    }
    Ok(())
}

fn bits(set: Option<hwloc2::Bitmap>) -> Vec<usize> {
    set.map(|s| s.into_iter().map(|b| b as usize).collect())
        .unwrap_or_default()
}

fn ancestor_package(obj: &TopologyObject) -> Option<u32> {
    let mut cur = obj.parent();
    while let Some(o) = cur {
        if o.object_type() == ObjectType::Package {
            return Some(o.logical_index());
        }
        cur = o.parent();
    }
    None
}

/// Reads the topology.
pub fn load(source: &Source) -> Result<Machine, TopoError> {
    validate(source)?;
    // hwloc reads these at load time; the launcher is single-threaded here.
    match source {
        Source::ThisSystem => {
            std::env::remove_var("HWLOC_SYNTHETIC");
            std::env::remove_var("HWLOC_XMLFILE");
        }
        Source::Synthetic(d) => std::env::set_var("HWLOC_SYNTHETIC", d),
        Source::Xml(p) => std::env::set_var("HWLOC_XMLFILE", p),
    }
    let topo =
        Topology::new().ok_or_else(|| TopoError("hwloc could not load the topology".into()))?;
    std::env::remove_var("HWLOC_SYNTHETIC");
    std::env::remove_var("HWLOC_XMLFILE");

    let cores = topo
        .objects_with_type(&ObjectType::Core)
        .map_err(|e| TopoError(format!("hwloc: no core level: {e:?}")))?;
    let npackages = topo
        .objects_with_type(&ObjectType::Package)
        .map(|p| p.len())
        .unwrap_or(0)
        .max(1);
    let mut packages: Vec<Package> = (0..npackages)
        .map(|index| Package {
            index,
            cores: Vec::new(),
        })
        .collect();
    for core in cores {
        let pkg = ancestor_package(core).unwrap_or(0) as usize;
        packages[pkg.min(npackages - 1)].cores.push(Core {
            pus: bits(core.cpuset()),
            numa: bits(core.nodeset()),
        });
    }
    packages.retain(|p| !p.cores.is_empty());
    if packages.is_empty() {
        return Err(TopoError("the topology has no cores".into()));
    }
    Ok(Machine {
        packages,
        source: match source {
            Source::ThisSystem => "this machine".into(),
            Source::Synthetic(d) => format!("synthetic:{d}"),
            Source::Xml(p) => p.clone(),
        },
        is_this_system: *source == Source::ThisSystem,
    })
}

impl Machine {
    /// All cores with their package index, in logical order.
    pub fn cores(&self) -> impl Iterator<Item = (usize, &Core)> {
        self.packages
            .iter()
            .flat_map(|p| p.cores.iter().map(move |c| (p.index, c)))
    }

    /// NUMA node OS indices present, sorted.
    pub fn numa_nodes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .cores()
            .flat_map(|(_, c)| c.numa.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Number of cores.
    pub fn core_count(&self) -> usize {
        self.packages.iter().map(|p| p.cores.len()).sum()
    }
}
