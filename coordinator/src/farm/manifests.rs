//! The image manifests a build's end stores, one per image layer. A resubmission's are
//! mostly the ones made before (the same result, the same annotations): they are
//! remembered by what they are made of ([`ManifestMemo`]), so the end checks the blob
//! store for them instead of serialising, escaping and hashing each again. Each carries
//! its whole stackerfile (stacker's `stacker_yaml` annotation): at 20,000 layers making
//! them was about half a second of every build's end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use farm_image::Digest;
use farm_stackerfile::Plan;
use sha2::{Digest as _, Sha256};

/// What a manifest is made of, hashed (see [`key`]).
pub(super) type Key = [u8; 32];

/// How many manifests each of the memo's two generations holds: one big build's
/// worth, a few MB.
const GENERATION: usize = if cfg!(test) { 4 } else { 32 * 1024 };

/// Manifests made lately, by what they are made of: two generations, the older
/// dropped when the newer is full (a lookup moves an entry to the newer), so the memo
/// stays bounded and keeps what is used.
#[derive(Default)]
pub(super) struct ManifestMemo {
    generations: Mutex<[HashMap<Key, Digest>; 2]>,
}

impl ManifestMemo {
    pub(super) fn get(&self, key: &Key) -> Option<Digest> {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g[0].get(key) {
            return Some(d.clone());
        }
        let d = g[1].remove(key)?;
        Self::put(&mut g, *key, d.clone());
        Some(d)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g[0].len() + g[1].len()
    }

    pub(super) fn insert(&self, key: Key, manifest: Digest) {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        Self::put(&mut g, key, manifest);
    }

    fn put(g: &mut [HashMap<Key, Digest>; 2], key: Key, manifest: Digest) {
        if g[0].len() >= GENERATION {
            g[1] = std::mem::take(&mut g[0]);
        }
        g[0].insert(key, manifest);
    }
}

/// The hash of each of `plan`'s stackerfiles as substituted (the `stacker_yaml`
/// annotation of its layers' manifests), by file index.
pub(super) fn file_hashes(plan: &Plan) -> Vec<Key> {
    plan.files
        .iter()
        .map(|f| Sha256::digest(f.substituted.as_bytes()).into())
        .collect()
}

/// The key of the manifest of a layer whose result is recorded as `result_json` (every
/// field the manifest takes from the result is in it) with `annotations`; the value of
/// `file_key` (the stackerfile's text) counts by its hash, `file_hash`. Every part is
/// length-prefixed, so no two different inputs feed the same bytes.
pub(super) fn key(
    result_json: &str,
    annotations: &BTreeMap<String, String>,
    file_key: &str,
    file_hash: &Key,
) -> Key {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(result_json.as_bytes());
    for (k, v) in annotations {
        part(k.as_bytes());
        if k == file_key {
            part(file_hash);
        } else {
            part(v.as_bytes());
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn the_memo_keeps_what_is_used_within_two_generations() {
        let memo = ManifestMemo::default();
        for n in 0..GENERATION as u8 {
            memo.insert([n; 32], digest(n));
        }
        // Full: the next entry starts a new generation; the first ones are still there.
        memo.insert([100; 32], digest(100));
        assert_eq!(memo.get(&[0; 32]), Some(digest(0)), "moved to the newer");
        for n in 101..101 + GENERATION as u8 {
            memo.insert([n; 32], digest(n));
        }
        assert_eq!(memo.get(&[0; 32]), Some(digest(0)), "used, so kept");
        assert_eq!(memo.get(&[1; 32]), None, "not used for two generations");
        let held = memo.generations.lock().unwrap();
        assert!(held[0].len() + held[1].len() <= 2 * GENERATION);
    }

    #[test]
    fn the_key_follows_every_input_and_the_file_only_by_its_hash() {
        let annotations = |yaml: &str, extra: &str| {
            BTreeMap::from([
                ("a".to_string(), extra.to_string()),
                ("ns.stacker_yaml".to_string(), yaml.to_string()),
            ])
        };
        let (h1, h2) = ([1; 32], [2; 32]);
        let base = key("{}", &annotations("x", "1"), "ns.stacker_yaml", &h1);
        assert_eq!(
            base,
            key(
                "{}",
                &annotations("other text", "1"),
                "ns.stacker_yaml",
                &h1
            ),
            "the file counts by its hash"
        );
        assert_ne!(
            base,
            key("{}", &annotations("x", "1"), "ns.stacker_yaml", &h2)
        );
        assert_ne!(
            base,
            key("{ }", &annotations("x", "1"), "ns.stacker_yaml", &h1)
        );
        assert_ne!(
            base,
            key("{}", &annotations("x", "2"), "ns.stacker_yaml", &h1)
        );
        // Parts cannot run into each other.
        let split = |a: &str, b: &str| {
            key(
                a,
                &BTreeMap::from([(b.to_string(), String::new())]),
                "none",
                &h1,
            )
        };
        assert_ne!(split("ab", "c"), split("a", "bc"));
    }
}
