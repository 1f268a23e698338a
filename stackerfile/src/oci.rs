//! Where a `type: oci` base or layout names its image.

use std::path::{Path, PathBuf};

/// `path:tag` of an OCI layout: split at the first `:` after which the path exists
/// (the tag itself may contain `:`); relative paths resolve against `dir`.
pub fn split_oci_url(dir: &Path, url: &str) -> (PathBuf, String) {
    let url = url.strip_prefix("oci:").unwrap_or(url);
    for (i, _) in url.match_indices(':') {
        let path = dir.join(&url[..i]);
        if path.join("index.json").exists() {
            return (path, url[i + 1..].to_string());
        }
    }
    match url.split_once(':') {
        Some((p, t)) => (dir.join(p), t.to_string()),
        None => (dir.join(url), "latest".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_urls_split_where_the_layout_exists() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lay:out")).unwrap();
        std::fs::write(d.path().join("lay:out/index.json"), "{}").unwrap();
        assert_eq!(
            split_oci_url(d.path(), "lay:out:v1:2"),
            (d.path().join("lay:out"), "v1:2".to_string())
        );
        assert_eq!(
            split_oci_url(d.path(), "plain:tag"),
            (d.path().join("plain"), "tag".to_string())
        );
    }
}
