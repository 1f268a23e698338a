//! The ready queue, fair across builds: each build's ready layers wait in a lane of
//! their own (in the order they became ready), and dispatch serves lanes by start-time
//! fair queuing. A lane's virtual time grows by one for every layer it sends; a lane
//! that becomes non-empty starts at the virtual time of the last lane served, so a
//! build that arrives while another has thousands of ready layers gets the next free
//! slot, not the slot after those thousands. A higher per-build priority is served
//! first (strictly); equal priorities share the slots. Pushing and picking are
//! O(log lanes); a build's lane is dropped in O(1) when it is cancelled.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// What the queue needs to know of a waiting item.
pub(super) trait Laned {
    /// The build it belongs to (its lane).
    fn lane(&self) -> &str;
    /// Its build's priority: higher goes first.
    fn priority(&self) -> i32;
}

/// Where a lane stands: priority first, then virtual time, then age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    priority: Reverse<i32>,
    vtime: u64,
    order: u64,
}

struct Lane<T> {
    items: VecDeque<T>,
    key: Key,
}

/// The ready layers of every build.
pub(super) struct ReadyQueue<T> {
    lanes: HashMap<String, Lane<T>>,
    /// Non-empty lanes by the order they are served in.
    order: BTreeMap<Key, String>,
    /// The virtual time of the lane served last.
    vnow: u64,
    next_order: u64,
    len: usize,
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        ReadyQueue {
            lanes: HashMap::new(),
            order: BTreeMap::new(),
            vnow: 0,
            next_order: 0,
            len: 0,
        }
    }
}

impl<T: Laned> ReadyQueue<T> {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The lane of `item`'s build, entered into the serving order if it was empty.
    fn lane_for(&mut self, item: &T) -> &mut Lane<T> {
        let next_order = &mut self.next_order;
        let lane = self
            .lanes
            .entry(item.lane().to_string())
            .or_insert_with(|| {
                *next_order += 1;
                Lane {
                    items: VecDeque::new(),
                    key: Key {
                        priority: Reverse(item.priority()),
                        vtime: 0,
                        order: *next_order,
                    },
                }
            });
        if lane.items.is_empty() {
            lane.key.vtime = lane.key.vtime.max(self.vnow);
            self.order.insert(lane.key, item.lane().to_string());
        }
        lane
    }

    /// A layer became ready: it waits behind its build's earlier ones.
    pub(super) fn push_back(&mut self, item: T) {
        self.lane_for(&item).items.push_back(item);
        self.len += 1;
    }

    /// A layer goes back to the queue (a retry, a hand-back): first of its build's.
    pub(super) fn push_front(&mut self, item: T) {
        self.lane_for(&item).items.push_front(item);
        self.len += 1;
    }

    /// Every waiting layer of `build`, in order; its lane is gone.
    pub(super) fn remove_build(&mut self, build: &str) -> Vec<T> {
        let Some(lane) = self.lanes.remove(build) else {
            return Vec::new();
        };
        if !lane.items.is_empty() {
            self.order.remove(&lane.key);
        }
        self.len -= lane.items.len();
        lane.items.into()
    }

    /// Take items in serving order while `place` accepts them: `place` gets each lane's
    /// first item and answers `Some` (it is taken) or `None` (nothing fits it now; its
    /// lane waits until the next call). Stops when `room` says there is no room left.
    pub(super) fn take_while<R>(
        &mut self,
        mut room: impl FnMut() -> bool,
        mut place: impl FnMut(&T) -> Option<R>,
    ) -> Vec<(T, R)> {
        let mut taken = Vec::new();
        // Lanes whose first item fits nowhere now, put back at the end.
        let mut blocked: Vec<(Key, String)> = Vec::new();
        while room() {
            let Some((key, build)) = self.order.pop_first() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&build) else {
                continue;
            };
            let Some(first) = lane.items.front() else {
                continue;
            };
            let Some(r) = place(first) else {
                blocked.push((key, build));
                continue;
            };
            let item = lane.items.pop_front().expect("it has a first item");
            self.len -= 1;
            self.vnow = key.vtime;
            lane.key.vtime = key.vtime + 1;
            if lane.items.is_empty() {
                // An empty lane is forgotten; when its build has ready layers again it
                // starts at the virtual time then, like any lane that becomes busy.
                self.lanes.remove(&build);
            } else {
                self.order.insert(lane.key, build);
            }
            taken.push((item, r));
        }
        self.order.extend(blocked);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item(&'static str, i32, u32);

    impl Laned for Item {
        fn lane(&self) -> &str {
            self.0
        }
        fn priority(&self) -> i32 {
            self.1
        }
    }

    fn take(q: &mut ReadyQueue<Item>, n: usize) -> Vec<(&'static str, u32)> {
        let left = std::cell::Cell::new(n);
        q.take_while(
            || left.get() > 0,
            |_| {
                left.set(left.get() - 1);
                Some(())
            },
        )
        .into_iter()
        .map(|(i, ())| (i.0, i.2))
        .collect()
    }

    #[test]
    fn a_small_build_is_served_before_a_big_builds_remaining_layers() {
        let mut q = ReadyQueue::default();
        for i in 0..1000 {
            q.push_back(Item("big", 0, i));
        }
        assert_eq!(take(&mut q, 3), [("big", 0), ("big", 1), ("big", 2)]);
        q.push_back(Item("small", 0, 0));
        // At most one more of the big build's before the small one's.
        let next = take(&mut q, 2);
        assert!(next.contains(&("small", 0)), "{next:?}");
        assert_eq!(q.len(), 1000 - 3 - 1);
    }

    #[test]
    fn builds_of_equal_priority_share_and_a_higher_priority_goes_first() {
        let mut q = ReadyQueue::default();
        for i in 0..10 {
            q.push_back(Item("a", 0, i));
            q.push_back(Item("b", 0, i));
        }
        let got = take(&mut q, 6);
        let a = got.iter().filter(|(b, _)| *b == "a").count();
        assert_eq!(a, 3, "{got:?}");
        // In order within a build.
        let a_order: Vec<u32> = got.iter().filter(|(b, _)| *b == "a").map(|x| x.1).collect();
        assert_eq!(a_order, [0, 1, 2]);
        q.push_back(Item("urgent", 5, 0));
        q.push_back(Item("urgent", 5, 1));
        assert_eq!(take(&mut q, 2), [("urgent", 0), ("urgent", 1)]);
    }

    #[test]
    fn a_lane_that_fits_nowhere_does_not_hold_up_others_and_cancel_drops_a_lane() {
        let mut q = ReadyQueue::default();
        q.push_back(Item("arm", 0, 0));
        q.push_back(Item("amd", 0, 0));
        q.push_back(Item("amd", 0, 1));
        let got = q.take_while(|| true, |i| (i.0 == "amd").then_some(()));
        assert_eq!(got.len(), 2);
        assert_eq!(q.len(), 1);
        // A retry goes first in its lane.
        q.push_back(Item("x", 0, 1));
        q.push_front(Item("x", 0, 0));
        let gone = q.remove_build("x");
        assert_eq!(gone, [Item("x", 0, 0), Item("x", 0, 1)]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.remove_build("arm").len(), 1);
        assert_eq!(q.len(), 0);
        assert!(take(&mut q, 5).is_empty());
    }
}
