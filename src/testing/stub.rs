//! The HTTP stub `http` processors call under `keyflow test`: a local server on a free port that
//! answers each call with the next answer the test file gives for the current message (the last
//! one repeating; 200 with an empty body when it gives none) and records every request.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::file::Answer;

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Script {
    answers: Vec<Answer>,
    calls: Vec<Call>,
}

/// A running stub; the server task ends when this is dropped.
pub struct Stub {
    pub addr: std::net::SocketAddr,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    pub async fn start() -> std::io::Result<Stub> {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Stub { addr, script, task })
    }

    /// The next message's answers; forgets the calls recorded so far.
    pub fn script(&self, answers: &[Answer]) {
        let mut s = self.script.lock().unwrap_or_else(|p| p.into_inner());
        s.answers = answers.to_vec();
        s.calls.clear();
    }

    /// The calls received since [`Self::script`].
    pub fn calls(&self) -> Vec<Call> {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .calls
            .clone()
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = script.lock().unwrap_or_else(|p| p.into_inner());
    let n = s.calls.len();
    s.calls.push(Call {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |p| p.to_string()),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    });
    let a = s.answers.get(n).or(s.answers.last());
    let (status, text) = a.map_or((200, String::new()), |a| (a.status, a.body.clone()));
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        text,
    )
        .into_response()
}
