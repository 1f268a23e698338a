//! Identical layers (the same cache key) of concurrent builds are built once: the first
//! build to ask claims the key, the others wait for its result. A claim that ends
//! without a result (its build was cancelled, or stopped) passes to a waiting build.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use farm_model::{BuiltImage, LayerFailure, LayerOutcome};
use tokio::sync::watch;

use crate::state::BuildId;

/// A claimed key: the build that builds it, and where its result goes.
struct Claimed {
    owner: BuildId,
    result: watch::Sender<Option<LayerOutcome>>,
}

/// The cache keys being built, and the last ones built.
#[derive(Default)]
pub(super) struct Inflight {
    keys: Mutex<HashMap<String, Claimed>>,
    recent: Mutex<Recent>,
}

/// The results of the last [`RECENT`] claims that ended built, oldest first out.
#[derive(Default)]
struct Recent {
    built: HashMap<String, BuiltImage>,
    order: VecDeque<String>,
}

/// How many built keys [`Inflight::recently_built`] remembers: it answers for the
/// moment between a build's cache lookup and its claim, not for history.
const RECENT: usize = 4096;

/// How [`Inflight::join`] ended.
pub(super) enum Joined {
    /// This build builds the layer, and shares the result through the claim.
    Claimed(Claim),
    /// Another build built it (or failed to).
    Shared(LayerOutcome),
}

/// A build's claim on a cache key: [`Claim::finish`] hands the result to the builds
/// that wait; dropping it unfinished lets one of them claim the key instead.
pub(super) struct Claim {
    inflight: Arc<Inflight>,
    key: Option<String>,
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claimed>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a claim of `key` that ended lately built, if one did. A build whose cache
    /// lookup missed and that then claimed the key asks this instead of the action
    /// cache again: a claim of this process that ended in between put its result in
    /// the cache first and is remembered here (a second read of the cache per built
    /// layer was a database round trip each).
    pub(super) fn recently_built(&self, key: &str) -> Option<BuiltImage> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.built.get(key).cloned()
    }

    fn remember(&self, key: &str, image: &BuiltImage) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent
            .built
            .insert(key.to_string(), image.clone())
            .is_none()
        {
            recent.order.push_back(key.to_string());
        }
        while recent.order.len() > RECENT {
            if let Some(old) = recent.order.pop_front() {
                recent.built.remove(&old);
            }
        }
    }

    /// Claim `key` for `build`, or wait for the build that claimed it (`waiting` is
    /// told which, before each wait).
    pub(super) async fn join(
        self: &Arc<Self>,
        key: &str,
        build: &str,
        mut waiting: impl FnMut(&str),
    ) -> Joined {
        loop {
            let (owner, mut rx) = {
                let mut keys = self.lock();
                match keys.get(key) {
                    Some(claimed) => (claimed.owner.clone(), claimed.result.subscribe()),
                    None => {
                        let (result, _) = watch::channel(None);
                        let owner = build.to_string();
                        keys.insert(key.to_string(), Claimed { owner, result });
                        return Joined::Claimed(Claim {
                            inflight: self.clone(),
                            key: Some(key.to_string()),
                        });
                    }
                }
            };
            waiting(&owner);
            let result = match rx.wait_for(Option::is_some).await {
                Ok(r) => r.clone().unwrap_or_else(|| Err(LayerFailure::cancelled())),
                // The claim ended without a result.
                Err(_) => Err(LayerFailure::cancelled()),
            };
            match result {
                Ok(layer) => return Joined::Shared(Ok(layer)),
                // The other build was cancelled: build it here.
                Err(e) if e.is_cancelled() => continue,
                Err(e) => return Joined::Shared(Err(e.note(format_args!("(in build {owner})")))),
            }
        }
    }
}

impl Claim {
    /// The layer is done: the waiting builds get `result`.
    pub(super) fn finish(mut self, result: &LayerOutcome) {
        self.end(Some(result));
    }

    fn end(&mut self, result: Option<&LayerOutcome>) {
        let Some(key) = self.key.take() else { return };
        if let Some(Ok(image)) = result {
            self.inflight.remember(&key, image);
        }
        let claimed = self.inflight.lock().remove(&key);
        if let (Some(claimed), Some(result)) = (claimed, result) {
            claimed.result.send_replace(Some(result.clone()));
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.end(None);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use farm_model::FailureKind;

    fn claimed(j: Joined) -> Claim {
        match j {
            Joined::Claimed(c) => c,
            Joined::Shared(r) => panic!("shared {r:?}, expected a claim"),
        }
    }

    /// Start `build` joining `key` in the background; returns whom it waited for and
    /// how it ended (`None`: it claimed the key).
    fn join_later(
        inflight: &std::sync::Arc<Inflight>,
        key: &'static str,
        build: &'static str,
    ) -> tokio::task::JoinHandle<(Vec<String>, Option<LayerOutcome>)> {
        let inflight = inflight.clone();
        tokio::spawn(async move {
            let mut owners = Vec::new();
            let joined = inflight
                .join(key, build, |o| owners.push(o.to_string()))
                .await;
            let shared = match joined {
                Joined::Shared(r) => Some(r),
                Joined::Claimed(_) => None,
            };
            (owners, shared)
        })
    }

    async fn until_waiting(inflight: &Inflight, key: &str) {
        for _ in 0..200 {
            if inflight
                .lock()
                .get(key)
                .is_some_and(|c| c.result.receiver_count() > 0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("nobody waited for {key}");
    }

    #[tokio::test]
    async fn the_second_build_waits_for_the_first_and_gets_its_failure_noted() {
        let inflight = std::sync::Arc::new(Inflight::default());
        let claim = claimed(inflight.join("k", "b1", |_| panic!("no wait")).await);
        // Another key is not held up.
        drop(claimed(
            inflight.join("other", "b2", |_| panic!("no wait")).await,
        ));
        let waiter = join_later(&inflight, "k", "b2");
        until_waiting(&inflight, "k").await;
        claim.finish(&Err(LayerFailure::new(FailureKind::RunFailed, "exit 1")));
        let (owners, shared) = waiter.await.unwrap();
        assert_eq!(owners, ["b1"]);
        let failure = shared.expect("shared").unwrap_err();
        assert_eq!(failure.kind, FailureKind::RunFailed);
        assert!(
            failure.message.contains("(in build b1)"),
            "{}",
            failure.message
        );
        // The key is free again.
        drop(claimed(
            inflight.join("k", "b3", |_| panic!("no wait")).await,
        ));
    }

    #[tokio::test]
    async fn a_cancelled_or_dropped_claim_passes_to_a_waiting_build() {
        let inflight = std::sync::Arc::new(Inflight::default());
        let claim = claimed(inflight.join("k", "b1", |_| ()).await);
        let waiter = join_later(&inflight, "k", "b2");
        until_waiting(&inflight, "k").await;
        claim.finish(&Err(LayerFailure::cancelled()));
        let (owners, shared) = waiter.await.unwrap();
        assert_eq!(owners, ["b1"]);
        assert!(shared.is_none(), "b2 claimed it after b1's cancel");

        let claim = claimed(inflight.join("j", "b1", |_| ()).await);
        let waiter = join_later(&inflight, "j", "b2");
        until_waiting(&inflight, "j").await;
        drop(claim);
        let (_, shared) = waiter.await.unwrap();
        assert!(shared.is_none(), "b2 claimed it after b1 stopped");
    }

    #[tokio::test]
    async fn claims_that_built_are_remembered_a_bounded_while_and_failures_not_at_all() {
        let inflight = Arc::new(Inflight::default());
        let image = |n: u64| BuiltImage {
            config_digest: format!("sha256:{n:064x}"),
            config_size: n,
            layers: vec![],
            chain_id: farm_model::ChainId::empty(),
        };
        claimed(inflight.join("built", "b1", |_| ()).await).finish(&Ok(image(1)));
        claimed(inflight.join("failed", "b1", |_| ()).await)
            .finish(&Err(LayerFailure::new(FailureKind::RunFailed, "exit 1")));
        drop(claimed(inflight.join("dropped", "b1", |_| ()).await));
        assert_eq!(inflight.recently_built("built"), Some(image(1)));
        assert_eq!(inflight.recently_built("failed"), None);
        assert_eq!(inflight.recently_built("dropped"), None);
        for n in 0..RECENT as u64 {
            claimed(inflight.join(&format!("k{n}"), "b2", |_| ()).await).finish(&Ok(image(n)));
        }
        assert_eq!(
            inflight.recently_built("built"),
            None,
            "the oldest went first"
        );
        assert_eq!(inflight.recently_built("k0"), Some(image(0)));
        assert_eq!(
            inflight.recently_built(&format!("k{}", RECENT - 1)),
            Some(image(RECENT as u64 - 1))
        );
    }
}
