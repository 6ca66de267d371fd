//! Which cores and NUMA nodes each rank gets: a pure function of the machine and the options.

use std::collections::BTreeSet;

use crate::topo::Machine;

/// The unit ranks are spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapBy {
    /// One rank per package by default; several ranks split a package's cores.
    Socket,
    /// One rank per NUMA node by default.
    Numa,
    /// One rank per core by default.
    Core,
}

/// What a rank's CPU binding covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BindTo {
    /// The whole package its cores are in.
    Socket,
    /// All cores of its NUMA node(s).
    Numa,
    /// Exactly its share of cores (the default).
    Core,
    /// No binding at all.
    None,
}

/// One rank's placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The rank.
    pub rank: usize,
    /// Package(s) of its cores.
    pub packages: Vec<usize>,
    /// Global logical indices of its share of cores.
    pub cores: Vec<usize>,
    /// OS indices of the PUs of its share.
    pub pus: Vec<usize>,
    /// NUMA nodes local to its share.
    pub numa: Vec<usize>,
    /// PUs it is bound to (None: unbound).
    pub cpu_bind: Option<Vec<usize>>,
    /// NUMA nodes its memory is bound to (None: unbound).
    pub mem_bind: Option<Vec<usize>>,
}

/// A whole job's plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// One entry per rank.
    pub ranks: Vec<Placement>,
    /// Ranks share cores (more ranks than cores in some unit).
    pub oversubscribed: bool,
}

/// Plans `np` ranks (default: one per unit of `map_by`).
pub fn plan(
    machine: &Machine,
    np: Option<usize>,
    map_by: MapBy,
    bind_to: BindTo,
) -> Result<Plan, String> {
    let cores: Vec<(usize, &crate::topo::Core)> = machine.cores().collect();
    // Units: lists of global core indices.
    let units: Vec<Vec<usize>> = match map_by {
        MapBy::Socket => {
            let mut start = 0;
            machine
                .packages
                .iter()
                .map(|p| {
                    let u: Vec<usize> = (start..start + p.cores.len()).collect();
                    start += p.cores.len();
                    u
                })
                .collect()
        }
        MapBy::Numa => {
            let nodes = machine.numa_nodes();
            if nodes.is_empty() {
                vec![(0..cores.len()).collect()]
            } else {
                // A core belongs to the first NUMA node local to it.
                nodes
                    .iter()
                    .map(|n| {
                        (0..cores.len())
                            .filter(|&i| cores[i].1.numa.first() == Some(n))
                            .collect::<Vec<_>>()
                    })
                    .filter(|u| !u.is_empty())
                    .collect()
            }
        }
        MapBy::Core => (0..cores.len()).map(|i| vec![i]).collect(),
    };
    let np = np.unwrap_or(units.len());
    if np == 0 {
        return Err("-np must be at least 1".into());
    }
    // Block distribution: the first np % units units take one rank more.
    let nunits = units.len();
    let mut ranks = Vec::with_capacity(np);
    let mut oversubscribed = false;
    let mut rank = 0;
    for (u, unit) in units.iter().enumerate() {
        let k = np / nunits + usize::from(u < np % nunits);
        if k > unit.len() {
            oversubscribed = true;
        }
        for j in 0..k {
            // Even split of the unit's cores; with more ranks than cores, ranks share one core each.
            let (lo, hi) = (j * unit.len() / k, (j + 1) * unit.len() / k);
            let share: Vec<usize> = if hi > lo {
                unit[lo..hi].to_vec()
            } else {
                vec![unit[lo.min(unit.len() - 1)]]
            };
            ranks.push(place(&cores, rank, share, bind_to));
            rank += 1;
        }
    }
    Ok(Plan {
        ranks,
        oversubscribed,
    })
}

fn place(
    cores: &[(usize, &crate::topo::Core)],
    rank: usize,
    share: Vec<usize>,
    bind_to: BindTo,
) -> Placement {
    let collect =
        |idx: &mut dyn Iterator<Item = usize>, f: &dyn Fn(usize) -> Vec<usize>| -> Vec<usize> {
            idx.flat_map(f)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
    let pus = collect(&mut share.iter().copied(), &|i| cores[i].1.pus.clone());
    let numa = collect(&mut share.iter().copied(), &|i| cores[i].1.numa.clone());
    let packages = collect(&mut share.iter().copied(), &|i| vec![cores[i].0]);
    let bound: Option<Vec<usize>> = match bind_to {
        BindTo::None => None,
        BindTo::Core => Some(share.clone()),
        BindTo::Socket => Some(
            (0..cores.len())
                .filter(|&i| packages.contains(&cores[i].0))
                .collect(),
        ),
        BindTo::Numa => Some(
            (0..cores.len())
                .filter(|&i| cores[i].1.numa.iter().any(|n| numa.contains(n)))
                .collect(),
        ),
    };
    let cpu_bind = bound
        .as_ref()
        .map(|b| collect(&mut b.iter().copied(), &|i| cores[i].1.pus.clone()));
    let mem_bind = bound
        .as_ref()
        .map(|b| collect(&mut b.iter().copied(), &|i| cores[i].1.numa.clone()))
        .filter(|m| !m.is_empty());
    Placement {
        rank,
        packages,
        cores: share,
        pus,
        numa,
        cpu_bind,
        mem_bind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topo::{Core, Package};

    /// `packages` sockets × `numa` nodes each × `cores` cores per node, 2 PUs per core.
    fn machine(packages: usize, numa: usize, cores: usize) -> Machine {
        let mut pu = 0;
        let packages = (0..packages)
            .map(|p| Package {
                index: p,
                cores: (0..numa * cores)
                    .map(|c| {
                        pu += 2;
                        Core {
                            pus: vec![pu - 2, pu - 1],
                            numa: vec![p * numa + c / cores],
                        }
                    })
                    .collect(),
            })
            .collect();
        Machine {
            packages,
            source: "test".into(),
            is_this_system: false,
        }
    }

    #[test]
    fn default_is_one_rank_per_socket_with_its_numa_nodes() {
        let m = machine(4, 2, 28);
        let p = plan(&m, None, MapBy::Socket, BindTo::Core).unwrap();
        assert_eq!(p.ranks.len(), 4);
        for (r, pl) in p.ranks.iter().enumerate() {
            assert_eq!(pl.packages, vec![r]);
            assert_eq!(pl.cores.len(), 56);
            assert_eq!(pl.numa, vec![2 * r, 2 * r + 1]);
            assert_eq!(pl.mem_bind.as_deref(), Some(&[2 * r, 2 * r + 1][..]));
            assert_eq!(pl.cpu_bind.as_ref().unwrap().len(), 112);
        }
        assert!(!p.oversubscribed);
    }

    #[test]
    fn more_ranks_than_packages_split_cores_evenly() {
        let m = machine(1, 1, 2);
        let p = plan(&m, Some(2), MapBy::Socket, BindTo::Core).unwrap();
        assert_eq!(p.ranks[0].cores, vec![0]);
        assert_eq!(p.ranks[1].cores, vec![1]);
        let p = plan(&machine(2, 1, 4), Some(4), MapBy::Socket, BindTo::Core).unwrap();
        let cores: Vec<_> = p.ranks.iter().map(|r| r.cores.clone()).collect();
        assert_eq!(cores, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(p.ranks[2].packages, vec![1]);
    }

    #[test]
    fn oversubscription_is_flagged_and_ranks_still_get_a_core() {
        let p = plan(&machine(1, 1, 2), Some(4), MapBy::Socket, BindTo::Core).unwrap();
        assert!(p.oversubscribed);
        assert_eq!(p.ranks.len(), 4);
        assert!(p.ranks.iter().all(|r| r.cores.len() == 1));
    }

    #[test]
    fn numa_mapping_and_socket_binding() {
        let m = machine(2, 2, 4);
        let p = plan(&m, None, MapBy::Numa, BindTo::Core).unwrap();
        assert_eq!(p.ranks.len(), 4);
        assert_eq!(p.ranks[3].numa, vec![3]);
        let p = plan(&m, Some(2), MapBy::Numa, BindTo::Socket).unwrap();
        // Two ranks on the first two NUMA nodes, both in package 0, bound to the whole package.
        assert_eq!(p.ranks[1].packages, vec![0]);
        assert_eq!(p.ranks[1].cpu_bind.as_ref().unwrap().len(), 16);
        let p = plan(&m, Some(2), MapBy::Socket, BindTo::None).unwrap();
        assert_eq!(p.ranks[0].cpu_bind, None);
        assert_eq!(p.ranks[0].mem_bind, None);
    }

    #[test]
    fn zero_ranks_is_refused() {
        assert!(plan(&machine(1, 1, 2), Some(0), MapBy::Socket, BindTo::Core).is_err());
    }
}
