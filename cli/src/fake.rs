//! A stand-in coordinator for the client's tests: the real `Blobs` service over an
//! in-memory store, and a `Farm` service that answers from scripted state and records
//! what it was asked. It can break a watch stream once, like a coordinator restarting.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use farm_coordinator::grpc::BlobService;
use farm_image::BlobStore;
use farm_proto::v1::farm_server::{Farm, FarmServer};
use farm_proto::v1::{
    BuildEvent, BuildStatus, CancelRequest, CancelResponse, ListRequest, ListResponse, LogLine,
    LogsRequest, StatusRequest, SubmitRequest, SubmitResponse, WatchRequest, WorkersRequest,
    WorkersResponse,
};
use futures::Stream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// What the fake answers and what it saw.
#[derive(Debug, Default)]
pub struct Script {
    /// The one build it knows.
    pub status: BuildStatus,
    pub events: Vec<BuildEvent>,
    /// Break the first watch stream after the event with this seq.
    pub break_after: Option<u64>,
    pub logs: Vec<LogLine>,
    /// `after_seq` of every Watch call.
    pub watched_from: Vec<u64>,
    pub submitted: Vec<SubmitRequest>,
}

#[derive(Clone)]
struct FakeFarm(Arc<Mutex<Script>>);

type Events = Pin<Box<dyn Stream<Item = Result<BuildEvent, Status>> + Send>>;
type Lines = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

impl FakeFarm {
    fn known(&self, id: &str) -> Result<(), Status> {
        if self.0.lock().unwrap().status.id == id {
            Ok(())
        } else {
            Err(Status::not_found(format!("no build {id}")))
        }
    }
}

#[tonic::async_trait]
impl Farm for FakeFarm {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let mut s = self.0.lock().unwrap();
        s.submitted.push(request.into_inner());
        Ok(Response::new(SubmitResponse {
            id: s.status.id.clone(),
            layers: s.status.layers.iter().map(|l| l.name.clone()).collect(),
        }))
    }

    type WatchStream = Events;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        self.known(&r.id)?;
        let mut s = self.0.lock().unwrap();
        s.watched_from.push(r.after_seq);
        let mut out: Vec<Result<BuildEvent, Status>> = Vec::new();
        let break_after = s.break_after.take();
        for ev in s.events.iter().filter(|e| e.seq > r.after_seq) {
            out.push(Ok(ev.clone()));
            if Some(ev.seq) == break_after {
                out.push(Err(Status::unavailable("coordinator restarting")));
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(out))))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<BuildStatus>, Status> {
        self.known(&request.get_ref().id)?;
        Ok(Response::new(self.0.lock().unwrap().status.clone()))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse {
            builds: vec![self.0.lock().unwrap().status.clone()],
        }))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        self.known(&request.get_ref().id)?;
        Ok(Response::new(CancelResponse {
            state: self.0.lock().unwrap().status.state,
        }))
    }

    type LogsStream = Lines;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<Lines>, Status> {
        let r = request.into_inner();
        self.known(&r.id)?;
        let lines: Vec<Result<LogLine, Status>> = self
            .0
            .lock()
            .unwrap()
            .logs
            .iter()
            .filter(|l| r.layer.is_empty() || l.layer == r.layer)
            .cloned()
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(lines))))
    }

    async fn workers(
        &self,
        _: Request<WorkersRequest>,
    ) -> Result<Response<WorkersResponse>, Status> {
        Ok(Response::new(WorkersResponse::default()))
    }
}

/// A running fake; stops when dropped.
pub struct Fake {
    pub addr: String,
    pub store: BlobStore,
    pub script: Arc<Mutex<Script>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    pub async fn start(script: Script) -> Fake {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr: SocketAddr = incoming.local_addr().unwrap();
        let store = BlobStore::in_memory();
        let script = Arc::new(Mutex::new(script));
        let farm = FakeFarm(script.clone());
        let blobs = BlobService::new(store.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(FarmServer::new(farm))
                .add_service(blobs.into_server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Fake {
            addr: format!("http://{addr}"),
            store,
            script,
            shutdown: Some(tx),
            task,
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}
