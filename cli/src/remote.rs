//! Stackerfiles given as http(s) URLs (stacker accepts them): fetched once, then read
//! like local files. Prerequisites of a fetched file resolve against its URL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use farm_stackerfile::{FileSource, LocalFiles, url_of};

/// Reads local paths from disk and `http(s)://` paths over the network.
pub(crate) struct Files {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    fetched: Mutex<HashMap<String, String>>,
}

impl Files {
    /// Must be used from a thread where blocking is allowed (not an async task), while
    /// `runtime` runs.
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Self {
        Files {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            runtime,
            fetched: Mutex::new(HashMap::new()),
        }
    }
}

/// Every stackerfile this process fetched, by URL: the embedded farm gets the same
/// texts instead of fetching them again.
static FETCHED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// The fetched texts of `plan`'s files that are URLs, by URL.
pub(crate) fn inline_texts(
    plan: &farm_stackerfile::Plan,
) -> std::collections::BTreeMap<String, String> {
    let fetched = FETCHED.lock().ok();
    let Some(map) = fetched.as_ref().and_then(|m| m.as_ref()) else {
        return Default::default();
    };
    plan.files
        .iter()
        .filter_map(|f| {
            let url = url_of(&f.path)?;
            Some((url.clone(), map.get(&url)?.clone()))
        })
        .collect()
}

impl FileSource for Files {
    fn read_limited(&self, path: &Path, limit: u64) -> std::io::Result<String> {
        if url_of(path).is_none() {
            return LocalFiles.read_limited(path, limit);
        }
        let text = self.read(path)?;
        if text.len() as u64 > limit {
            return Err(farm_stackerfile::too_large(text.len() as u64, limit));
        }
        Ok(text)
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        let Some(url) = url_of(path) else {
            return LocalFiles.read(path);
        };
        if let Some(text) = self.fetched.lock().ok().and_then(|m| m.get(&url).cloned()) {
            return Ok(text);
        }
        let client = self.client.clone();
        let u = url.clone();
        let text = self.runtime.block_on(async move {
            let resp = client.get(&u).send().await.map_err(std::io::Error::other)?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{u}: 404 Not Found"),
                ));
            }
            if !status.is_success() {
                return Err(std::io::Error::other(format!("{u}: HTTP {status}")));
            }
            resp.text().await.map_err(std::io::Error::other)
        })?;
        if let Ok(mut m) = self.fetched.lock() {
            m.insert(url.clone(), text.clone());
        }
        if let Ok(mut m) = FETCHED.lock() {
            m.get_or_insert_with(HashMap::new).insert(url, text.clone());
        }
        Ok(text)
    }

    fn identity(&self, path: &Path) -> PathBuf {
        match url_of(path) {
            Some(u) => PathBuf::from(u),
            None => LocalFiles.identity(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-file-per-path HTTP server on 127.0.0.1, for `requests` requests.
    fn serve(files: &'static [(&'static str, &'static str)], requests: usize) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut s = stream.unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let reply = match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_string()
                    }
                };
                let _ = s.write_all(reply.as_bytes());
            }
        });
        port
    }

    #[test]
    fn url_stackerfile_with_relative_prerequisite() {
        static FILES: &[(&str, &str)] = &[
            (
                "/images/app/stacker.yaml",
                "config:\n  prerequisites: [../base/stacker.yaml]\napp:\n  from: {type: built, tag: base}\n",
            ),
            (
                "/images/base/stacker.yaml",
                "base:\n  from: {type: scratch}\n",
            ),
        ];
        let port = serve(FILES, 2);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let files = Files::new(rt.handle().clone());
        let url = format!("http://127.0.0.1:{port}/images/app/stacker.yaml");
        let plan = std::thread::scope(|s| {
            s.spawn(|| farm_stackerfile::Plan::load(Path::new(&url), &Default::default(), &files))
                .join()
                .unwrap()
        })
        .unwrap();
        let names: Vec<&str> = plan.layers.iter().map(|l| l.layer.name.as_str()).collect();
        assert_eq!(names, vec!["base", "app"]);
    }

    #[test]
    fn missing_url_is_a_clear_error() {
        static FILES: &[(&str, &str)] = &[];
        let port = serve(FILES, 1);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let files = Files::new(rt.handle().clone());
        let url = format!("http://127.0.0.1:{port}/nope.yaml");
        let e = std::thread::scope(|s| {
            s.spawn(|| farm_stackerfile::Plan::load(Path::new(&url), &Default::default(), &files))
                .join()
                .unwrap()
        })
        .unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
    }
}
