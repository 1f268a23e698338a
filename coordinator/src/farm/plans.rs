//! Plans of remote submissions, remembered by what they are made of. A remote
//! submission reads nothing but its uploaded context (content-addressed: its id is the
//! digest of its listing), the texts it sent inline and its substitutions; the
//! coordinator's built-ins and limits are fixed for the process. So an unchanged
//! resubmission (a CI retry, another pipeline on the same commit) has the same plan,
//! and parsing and planning it again was a quarter of a second of every 20,000-layer
//! resubmission's answer. A submission that may read the coordinator's own disk
//! (`LocalScope::Anywhere`) or a local one is never remembered: its files may change.

use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use farm_stackerfile::Plan;
use sha2::{Digest as _, Sha256};

use super::Submission;

/// What a plan is made of, hashed (see [`key`]).
pub(super) type Key = [u8; 32];

/// How much the remembered plans may hold together, in layers and in bytes of their
/// stackerfiles (a plan's layers are made of that text, so it bounds them too): two of
/// the scale bench's size, and a few submissions of big files. A plan over either alone
/// is not kept.
const MEMO_LAYERS: usize = if cfg!(test) { 5 } else { 40_000 };
const MEMO_BYTES: usize = if cfg!(test) { 1000 } else { 64 << 20 };
/// And how many plans: a lookup walks them.
const MEMO_PLANS: usize = if cfg!(test) { 3 } else { 64 };

/// What a plan holds, in layers and in bytes of its stackerfiles.
fn weight(plan: &Plan) -> (usize, usize) {
    let bytes = plan.files.iter().map(|f| f.substituted.len()).sum();
    (plan.layers.len(), bytes)
}

/// The plans of lately planned remote submissions, most recently used last.
#[derive(Default)]
pub(super) struct PlanMemo {
    plans: Mutex<VecDeque<(Key, Arc<Plan>)>>,
}

impl PlanMemo {
    pub(super) fn get(&self, key: &Key) -> Option<Arc<Plan>> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let at = plans.iter().position(|(k, _)| k == key)?;
        let entry = plans.remove(at)?;
        let plan = entry.1.clone();
        plans.push_back(entry);
        Some(plan)
    }

    /// Remember `plan`, dropping the least recently used ones beyond [`MEMO_LAYERS`],
    /// [`MEMO_BYTES`] or [`MEMO_PLANS`].
    pub(super) fn insert(&self, key: Key, plan: Arc<Plan>) {
        let (layers, bytes) = weight(&plan);
        if layers > MEMO_LAYERS || bytes > MEMO_BYTES {
            return;
        }
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.retain(|(k, _)| *k != key);
        plans.push_back((key, plan));
        let (mut layers, mut bytes) = plans
            .iter()
            .map(|(_, p)| weight(p))
            .fold((0, 0), |(l, b), (pl, pb)| (l + pl, b + pb));
        while layers > MEMO_LAYERS || bytes > MEMO_BYTES || plans.len() > MEMO_PLANS {
            let Some((_, dropped)) = plans.pop_front() else {
                break;
            };
            let (l, b) = weight(&dropped);
            (layers, bytes) = (layers - l, bytes - b);
        }
    }
}

/// The key of the plan of remote submission `spec` whose uploaded context is written at
/// `context` (`contexts/<its id>`, the id a digest of its listing): everything planning
/// reads that may differ between submissions. Every part is length-prefixed (and every
/// list counted), so no two different inputs feed the same bytes.
pub(super) fn key(context: &Path, spec: &Submission) -> Key {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(context.as_os_str().as_bytes());
    part(&(spec.stackerfiles.len() as u64).to_le_bytes());
    for f in &spec.stackerfiles {
        part(f.as_bytes());
    }
    let subst = &spec.substitutions;
    for pairs in [&subst.cli, &subst.file] {
        part(&(pairs.len() as u64).to_le_bytes());
        for (k, v) in pairs {
            part(k.as_bytes());
            part(v.as_bytes());
        }
    }
    part(&(spec.inline.len() as u64).to_le_bytes());
    for (k, v) in &spec.inline {
        part(k.as_bytes());
        part(v.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(layers: usize) -> Arc<Plan> {
        let text: String = (0..layers)
            .map(|i| format!("l{i}:\n  from: {{type: scratch}}\n"))
            .collect();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.yaml");
        std::fs::write(&f, text).unwrap();
        let plan = Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
        Arc::new(plan)
    }

    #[test]
    fn the_memo_keeps_the_recently_used_plans_within_its_layers() {
        let memo = PlanMemo::default();
        let (a, b, c) = (plan(2), plan(2), plan(2));
        memo.insert([1; 32], a.clone());
        memo.insert([2; 32], b.clone());
        assert!(
            Arc::ptr_eq(&memo.get(&[1; 32]).unwrap(), &a),
            "used: now the newest"
        );
        // 6 layers > 5: the least recently used (2) goes.
        memo.insert([3; 32], c.clone());
        assert!(memo.get(&[2; 32]).is_none());
        assert!(Arc::ptr_eq(&memo.get(&[1; 32]).unwrap(), &a));
        assert!(Arc::ptr_eq(&memo.get(&[3; 32]).unwrap(), &c));
        memo.insert([4; 32], plan(6));
        assert!(
            memo.get(&[4; 32]).is_none(),
            "bigger than the memo: not kept"
        );
        assert!(memo.get(&[3; 32]).is_some(), "and nothing dropped for it");
        // Small plans count too: at most three are kept.
        for n in 5..9 {
            memo.insert([n; 32], plan(1));
        }
        assert!(
            memo.get(&[5; 32]).is_none(),
            "the fourth small plan drops the first"
        );
        assert!((6..9).all(|n| memo.get(&[n; 32]).is_some()));
    }

    /// Few layers of big files count by their bytes: a submitter cannot make the memo
    /// hold file after file of text.
    #[test]
    fn the_memo_is_bounded_by_the_bytes_of_its_files_too() {
        let memo = PlanMemo::default();
        let big = |name: &str| {
            let d = tempfile::tempdir().unwrap();
            let f = d.path().join("s.yaml");
            // One layer, about 600 bytes of file.
            std::fs::write(
                &f,
                format!(
                    "{name}:\n  from: {{type: scratch}}\n# {}\n",
                    "x".repeat(560)
                ),
            )
            .unwrap();
            Arc::new(Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles).unwrap())
        };
        let (a, b) = (big("a"), big("b"));
        assert_eq!(weight(&a).0, 1);
        assert!((501..=1000).contains(&weight(&a).1), "{:?}", weight(&a));
        memo.insert([1; 32], a);
        memo.insert([2; 32], b);
        assert!(memo.get(&[1; 32]).is_none(), "two files are over the bytes");
        assert!(memo.get(&[2; 32]).is_some());
    }

    #[test]
    fn every_input_of_planning_changes_the_key() {
        let base = Submission::new(["s.yaml"]);
        let k = |s: &Submission| key(Path::new("ctx"), s);
        let mut seen = std::collections::HashSet::from([k(&base)]);
        assert_ne!(key(Path::new("other"), &base), k(&base), "the context");
        type Change = Box<dyn Fn(&mut Submission)>;
        let variants: Vec<Change> = vec![
            Box::new(|s| s.stackerfiles.push("t.yaml".into())),
            Box::new(|s| s.stackerfiles = vec!["s.yam".into(), "l".into()]),
            Box::new(|s| s.substitutions.cli.push(("A".into(), "1".into()))),
            Box::new(|s| s.substitutions.file.push(("A".into(), "1".into()))),
            Box::new(|s| s.substitutions.cli.push(("A".into(), "2".into()))),
            Box::new(|s| {
                s.inline.insert("https://x/s.yaml".into(), "a: {}".into());
            }),
        ];
        for change in variants {
            let mut s = base.clone();
            change(&mut s);
            assert!(seen.insert(k(&s)), "a change that does not change the key");
        }
        // What planning does not read leaves it alone.
        let mut s = base.clone();
        s.environment.push(("X".into(), "1".into()));
        s.no_cache = true;
        s.priority = 3;
        assert_eq!(k(&s), k(&base));
    }
}
