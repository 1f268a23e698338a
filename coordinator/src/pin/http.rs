//! http(s) inputs: downloaded into the blob store by the farm's [`Fetcher`] (which
//! remembers URLs, so an unchanged one is not downloaded again); the content's digest
//! pins them.

use crate::fetch::{FetchError, Fetcher};

/// Download an import (checked against its `hash:`, when given); returns its digest.
pub async fn fetch_import(
    fetcher: &Fetcher,
    url: &str,
    hash: Option<&str>,
) -> Result<String, FetchError> {
    Ok(fetcher.fetch(url, hash).await?.digest.to_string())
}

/// Download a `tar` base (the language gives it no `hash:`); returns its digest.
pub async fn fetch_tarball(fetcher: &Fetcher, url: &str) -> Result<String, FetchError> {
    Ok(fetcher.fetch_unpinnable(url).await?.digest.to_string())
}

/// The file name a download is imported under: the URL's last path segment.
pub fn download_name(url: &str) -> &str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .trim_end_matches('/');
    path.rsplit('/').next().unwrap_or("download")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_is_named_after_its_last_path_segment() {
        assert_eq!(download_name("https://h/a/b.tar.gz?x=1#f"), "b.tar.gz");
        assert_eq!(download_name("https://h/a/dir/"), "dir");
        assert_eq!(download_name("https://h/file#frag"), "file");
    }
}
