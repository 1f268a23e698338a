//! Placement: which worker a layer goes to. It needs the layer's platform (unless it runs
//! nothing) and a free slot; among those, a worker that holds the layer's base chain
//! wins (it need not fetch and unpack the base), then the least loaded one. The holders
//! of each chain are indexed ([`Holders`]), so a layer's base is looked up once, not
//! asked of every worker.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use farm_model::{ChainId, Job, Platform};

/// A worker as placement sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate<'a> {
    pub name: &'a str,
    pub platform: &'a Platform,
    pub chains: &'a HashSet<ChainId>,
    pub slots: u32,
    /// Assignments running on it, or picked for it and not yet sent.
    pub busy: u32,
    /// False while it has no usable pool, or after it missed heartbeats.
    pub accepting: bool,
}

impl Candidate<'_> {
    pub(super) fn free(&self) -> u32 {
        if !self.accepting {
            return 0;
        }
        self.slots.saturating_sub(self.busy)
    }

    /// Thousandths of its slots in use (workers of different sizes compare fairly).
    fn load(&self) -> u64 {
        u64::from(self.busy) * 1000 / u64::from(self.slots.max(1))
    }
}

/// What a layer asks of its worker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Need<'a> {
    /// `None`: any platform, for a layer that runs nothing (it only adds files and
    /// config).
    pub platform: Option<&'a Platform>,
    /// The chain the layer starts from, when its base is an image.
    pub base_chain: Option<&'a ChainId>,
}

impl<'a> Need<'a> {
    pub(super) fn of(job: &'a Job) -> Self {
        Need {
            platform: job.layer.runs_commands().then_some(&job.platform),
            base_chain: job.base_chain(),
        }
    }

    /// The same need, any worker's chains aside.
    fn without_base(self) -> Self {
        Need {
            base_chain: None,
            ..self
        }
    }
}

/// Which workers hold each chain.
#[derive(Debug, Default)]
pub(super) struct Holders(HashMap<ChainId, BTreeSet<String>>);

impl Holders {
    pub(super) fn add(&mut self, worker: &str, chain: &ChainId) {
        match self.0.get_mut(chain) {
            Some(names) => {
                if !names.contains(worker) {
                    names.insert(worker.to_string());
                }
            }
            None => {
                self.0
                    .insert(chain.clone(), BTreeSet::from([worker.to_string()]));
            }
        }
    }

    /// `worker`, which held `chains`, is gone.
    pub(super) fn remove(&mut self, worker: &str, chains: &HashSet<ChainId>) {
        for chain in chains {
            if let Some(names) = self.0.get_mut(chain) {
                names.remove(worker);
                if names.is_empty() {
                    self.0.remove(chain);
                }
            }
        }
    }

    /// The workers holding `chain`, by name.
    #[cfg(test)]
    pub(super) fn of(&self, chain: &ChainId) -> impl Iterator<Item = &str> {
        self.0.get(chain).into_iter().flatten().map(String::as_str)
    }

    /// The entries of `workers` (the scheduler's list, by name) that hold `chain`, in
    /// order of name. A few holders are looked up; many (a base that every worker
    /// holds) are found by walking both lists together: looking each up was most of
    /// placement's time with 200 workers holding one chain.
    pub(super) fn among<'a, W>(
        &'a self,
        chain: &ChainId,
        workers: &'a BTreeMap<String, W>,
    ) -> Box<dyn Iterator<Item = (&'a String, &'a W)> + 'a> {
        let Some(names) = self.0.get(chain) else {
            return Box::new(std::iter::empty());
        };
        if looks_up(names.len(), workers.len()) {
            return Box::new(names.iter().filter_map(|n| workers.get_key_value(n)));
        }
        let mut names = names.iter().peekable();
        Box::new(workers.iter().filter(move |(name, _)| {
            while names.next_if(|n| n < name).is_some() {}
            names.next_if(|n| n == name).is_some()
        }))
    }
}

/// Whether [`Holders::among`] looks `holders` up among `workers` rather than walking
/// both: a lookup costs about log2(workers) comparisons, the walk one per worker.
fn looks_up(holders: usize, workers: usize) -> bool {
    let lookup = (usize::BITS - workers.leading_zeros()) as usize;
    holders.saturating_mul(lookup) < workers
}

/// [`choose`] among `all` (every worker, by name), the base chain's holders (`holding`,
/// by name, from [`Holders`]) first: a holder that fits wins, as in `choose`, without
/// every worker's chains asked. Returns the worker and whether it holds the base chain.
pub(super) fn choose_indexed<'a>(
    all: impl IntoIterator<Item = Candidate<'a>>,
    holding: impl IntoIterator<Item = Candidate<'a>>,
    need: &Need<'_>,
) -> Option<(&'a str, bool)> {
    // Every holder holds the base: among them only the load counts (asking each
    // holder's chains again was a hash of the chain per worker per layer).
    if need.base_chain.is_some()
        && let Some(name) = choose(holding, &need.without_base())
    {
        return Some((name, true));
    }
    choose(all, &need.without_base()).map(|name| (name, false))
}

/// The worker for a layer that needs `need`, `None` when no candidate fits now. Ties go
/// to the last candidate (by name, in the scheduler's order).
pub(super) fn choose<'a>(
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    need: &Need<'_>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| need.platform.is_none_or(|p| c.platform == p) && c.free() > 0)
        .max_by_key(|c| {
            let has_base = need.base_chain.is_some_and(|b| c.chains.contains(b));
            (has_base, Reverse(c.load()))
        })
        .map(|c| c.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u8) -> ChainId {
        ChainId::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    struct W {
        name: &'static str,
        platform: Platform,
        chains: HashSet<ChainId>,
        slots: u32,
        busy: u32,
        accepting: bool,
    }

    fn worker(name: &'static str, slots: u32, busy: u32) -> W {
        W {
            name,
            platform: "linux/amd64".parse().unwrap(),
            chains: HashSet::new(),
            slots,
            busy,
            accepting: true,
        }
    }

    fn pick<'a>(workers: &'a [W], need: Need<'_>) -> Option<&'a str> {
        choose(workers.iter().map(candidate), &need)
    }

    #[test]
    fn a_worker_holding_the_base_chain_wins_over_a_less_loaded_one() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let base = chain(1);
        let mut holder = worker("b-holder", 4, 3);
        holder.chains.insert(base.clone());
        let workers = [worker("a-idle", 4, 0), holder, worker("c-idle", 4, 0)];
        let need = Need {
            platform: Some(&amd64),
            base_chain: Some(&base),
        };
        assert_eq!(pick(&workers, need), Some("b-holder"));
        // Another base: the holder is just the busiest.
        let other = chain(2);
        let need = Need {
            base_chain: Some(&other),
            ..need
        };
        assert_ne!(pick(&workers, need), Some("b-holder"));
    }

    #[test]
    fn the_least_loaded_worker_wins_by_share_of_its_slots() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let need = Need {
            platform: Some(&amd64),
            base_chain: None,
        };
        // 3 of 8 busy is a smaller share than 1 of 2, though more layers.
        let workers = [
            worker("small", 2, 1),
            worker("big", 8, 3),
            worker("third", 3, 2),
        ];
        assert_eq!(pick(&workers, need), Some("big"));
        let workers = [worker("small", 2, 1), worker("big", 8, 5)];
        assert_eq!(pick(&workers, need), Some("small"));
    }

    #[test]
    fn only_workers_with_a_free_slot_that_accept_work_are_candidates() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let base = chain(1);
        let need = Need {
            platform: Some(&amd64),
            base_chain: Some(&base),
        };
        let mut full = worker("full", 2, 2);
        full.chains.insert(base.clone());
        let mut stale = worker("stale", 2, 0);
        stale.accepting = false;
        stale.chains.insert(base.clone());
        assert_eq!(pick(&[full, stale], need), None);
        let mut stale = worker("stale", 2, 0);
        stale.accepting = false;
        assert_eq!(pick(&[stale, worker("busy", 8, 7)], need), Some("busy"));
    }

    #[test]
    fn a_layer_that_runs_commands_needs_its_platform_and_one_that_runs_nothing_does_not() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let mut arm = worker("arm", 4, 0);
        arm.platform = "linux/arm64/v8".parse().unwrap();
        let workers = [arm];
        let runs = Need {
            platform: Some(&amd64),
            base_chain: None,
        };
        assert_eq!(pick(&workers, runs), None);
        let adds_files = Need {
            platform: None,
            base_chain: None,
        };
        assert_eq!(pick(&workers, adds_files), Some("arm"));
    }

    #[test]
    fn the_need_of_a_job_follows_what_it_runs_and_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.yaml");
        std::fs::write(
            &file,
            "runs:\n  from: {type: scratch}\n  run: echo\n\
             adds:\n  from: {type: scratch}\n",
        )
        .unwrap();
        let plan =
            farm_stackerfile::Plan::load(&file, &Default::default(), &farm_stackerfile::LocalFiles)
                .unwrap();
        let job = |i: usize| crate::build::scratch_job(&plan.layers[i].layer, "linux/s390x");
        let (runs, adds) = (job(0), job(1));
        assert_eq!(
            Need::of(&runs).platform.map(|p| p.to_string()).as_deref(),
            Some("linux/s390x")
        );
        assert!(Need::of(&adds).platform.is_none());
        assert!(Need::of(&runs).base_chain.is_none());
    }
    /// Pseudo-random numbers below `n`, the same from the same seed.
    fn numbers(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        }
    }

    fn candidate(w: &W) -> Candidate<'_> {
        Candidate {
            name: w.name,
            platform: &w.platform,
            chains: &w.chains,
            slots: w.slots,
            busy: w.busy,
            accepting: w.accepting,
        }
    }

    /// The indexed choice is the scan's: over many pseudo-random farms (platforms, sizes,
    /// loads, chains held, workers not accepting) and needs, `choose_indexed` with the
    /// holders of each chain picks the worker `choose` picks over every worker.
    #[test]
    fn the_index_of_holders_picks_what_a_scan_of_every_worker_picks() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm64: Platform = "linux/arm64/v8".parse().unwrap();
        let chains: Vec<ChainId> = (1..=4).map(chain).collect();
        let names: Vec<&'static str> = (0..12)
            .map(|i| &*Box::leak(format!("w{i:02}").into_boxed_str()))
            .collect();
        let mut next = numbers(0x9e37_79b9_7f4a_7c15);
        let mut with_base = 0;
        for _ in 0..2000 {
            let mut workers = Vec::new();
            let mut holders = Holders::default();
            for &name in names.iter().take(1 + next(12) as usize) {
                let slots = 1 + next(4) as u32;
                let mut w = worker(name, slots, next(u64::from(slots) + 1) as u32);
                if next(2) == 0 {
                    w.platform = arm64.clone();
                }
                w.accepting = next(8) != 0;
                for c in &chains[..3] {
                    if next(3) == 0 {
                        w.chains.insert(c.clone());
                        holders.add(name, c);
                    }
                }
                workers.push(w);
            }
            let base =
                [None, Some(&chains[0]), Some(&chains[1]), Some(&chains[3])][next(4) as usize];
            let platform = [None, Some(&amd64), Some(&arm64)][next(3) as usize];
            let need = Need {
                platform,
                base_chain: base,
            };
            let holding = base
                .into_iter()
                .flat_map(|c| holders.of(c))
                .filter_map(|n| workers.iter().find(|w| w.name == n))
                .map(candidate);
            let indexed = choose_indexed(workers.iter().map(candidate), holding, &need);
            assert_eq!(indexed.map(|(n, _)| n), pick(&workers, need));
            if let Some((name, has_base)) = indexed {
                let w = workers.iter().find(|w| w.name == name).unwrap();
                assert_eq!(has_base, base.is_some_and(|b| w.chains.contains(b)));
                with_base += usize::from(has_base);
            }
        }
        assert!(
            with_base > 100,
            "the holders' path was taken {with_base} times"
        );
    }

    /// Holders found among the workers by walking both lists are the ones looked up,
    /// in the same order, whether few or most workers hold the chain and whether or
    /// not every holder is on the list.
    #[test]
    fn holders_among_workers_walked_or_looked_up_are_the_same() {
        let c = chain(1);
        let mut next = numbers(0x2545_f491_4f6c_dd1d);
        let (mut walked, mut looked_up) = (0, 0);
        for _ in 0..500 {
            let mut workers = BTreeMap::new();
            let mut holders = Holders::default();
            let n = 1 + next(40);
            let share = 1 + next(4);
            for i in 0..n {
                let name = format!("w{i:03}");
                if next(share) == 0 {
                    holders.add(&name, &c);
                }
                // Some holders have left the list (the index is a step behind).
                if next(10) != 0 {
                    workers.insert(name, i);
                }
            }
            let expected: Vec<(&String, &u64)> = holders
                .of(&c)
                .filter_map(|n| workers.get_key_value(n))
                .collect();
            let got: Vec<(&String, &u64)> = holders.among(&c, &workers).collect();
            assert_eq!(got, expected);
            if looks_up(holders.of(&c).count(), workers.len()) {
                looked_up += 1;
            } else {
                walked += 1;
            }
        }
        assert!(
            walked > 50 && looked_up > 50,
            "{walked} walked, {looked_up} looked up"
        );
        let workers = BTreeMap::from([("w".to_string(), 1)]);
        assert_eq!(Holders::default().among(&c, &workers).count(), 0);
    }

    #[test]
    fn holders_forget_a_worker_that_left() {
        let (a, b) = (chain(1), chain(2));
        let mut holders = Holders::default();
        holders.add("w1", &a);
        holders.add("w1", &a);
        holders.add("w2", &a);
        holders.add("w1", &b);
        assert_eq!(holders.of(&a).collect::<Vec<_>>(), ["w1", "w2"]);
        holders.remove("w1", &HashSet::from([a.clone(), b.clone()]));
        assert_eq!(holders.of(&a).collect::<Vec<_>>(), ["w2"]);
        assert_eq!(holders.of(&b).count(), 0);
        assert!(!holders.0.contains_key(&b), "no empty entries kept");
    }
}
