//! A real coordinator for tests: `Farm::start` on a state dir with a local blob store,
//! served by `server::serve` on 127.0.0.1. It runs on a runtime of its own, so stopping
//! it ends everything it had open (its watch streams too), as a stopped process does;
//! starting it again on the same dir and port is how a restarted coordinator looks.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use farm_coordinator::farm::{Farm, FarmConfig, Submission};
use farm_coordinator::server::{ServerError, serve};
use farm_image::BlobStore;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) struct Coordinator {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub socket: SocketAddr,
    pub farm: Farm,
    pub store: BlobStore,
    runtime: Option<Runtime>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Coordinator {
    /// A coordinator on `dir` (state in `dir/state`, blobs in `dir/blobs`), any port.
    pub(crate) async fn start(dir: &Path) -> Coordinator {
        Coordinator::start_on(dir, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A coordinator on `dir` listening at `at` (waits for the port to be free).
    pub(crate) async fn start_on(dir: &Path, at: SocketAddr) -> Coordinator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = BlobStore::local(&dir.join("blobs")).unwrap();
        let config = FarmConfig::new(dir.join("state"), store.clone());
        let farm = runtime.spawn(Farm::start(config)).await.unwrap().unwrap();
        let listener = runtime
            .spawn(async move {
                let mut tries = 0;
                loop {
                    match tokio::net::TcpListener::bind(at).await {
                        Ok(l) => return l,
                        Err(e) if tries < 100 => {
                            tries += 1;
                            tracing::debug!("binding {at}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("binding {at}: {e}"),
                    }
                }
            })
            .await
            .unwrap();
        let socket = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = runtime.spawn(serve(listener, farm.clone(), async {
            let _ = stopped.await;
        }));
        Coordinator {
            addr: format!("http://{socket}"),
            socket,
            farm,
            store,
            runtime: Some(runtime),
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Run `f` on the coordinator's runtime (where its farm's tasks live).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> T {
        self.runtime.as_ref().unwrap().spawn(f).await.unwrap()
    }

    /// Submit the stackerfile at `file` (a path on this machine) straight to the farm;
    /// the build id.
    pub(crate) async fn submit(&self, file: PathBuf) -> String {
        let farm = self.farm.clone();
        let spec = Submission::new([file.to_string_lossy()]);
        self.run(async move { farm.submit(spec).await.unwrap().0 })
            .await
    }

    /// Stop: the shutdown future completes and the server gets 2 s to return (it waits
    /// for open watch streams), then the runtime ends as the process would exit.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The embedded farm (coordinator and a rootless worker in this process) served on a
/// local port: the set-up of tests that build for real through the client's remote path.
pub(crate) struct ServedEmbedded {
    /// `http://127.0.0.1:PORT`
    pub(crate) addr: String,
    pub(crate) embedded: crate::embedded::Embedded,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl ServedEmbedded {
    /// State and pool under `dir`; `None` (after saying why) when this machine cannot
    /// build rootless, so the calling test skips.
    pub(crate) async fn start(dir: &Path) -> Option<ServedEmbedded> {
        let layout =
            crate::common::Layout::new(Some(dir.join("state")), Some(dir.join("pool")), None);
        let embedded = match crate::embedded::Embedded::start(
            layout,
            crate::run_limits::RunLimitArgs::default()
                .engine_options(farm_worker::engine::BindPolicy::Unrestricted),
            2,
            Default::default(),
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("SKIPPED: no rootless worker on this machine ({e:#}); see `farm check`");
                return None;
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, embedded.farm.clone(), async {
            let _ = stopped.await;
        }));
        Some(ServedEmbedded {
            addr,
            embedded,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Stop serving and wait for the server to return.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}
