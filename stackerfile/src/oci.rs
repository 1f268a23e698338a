//! Where a `type: oci` base names its image.

use std::path::{Path, PathBuf};

/// The `PATH` and `TAG` of a `type: oci` URL `PATH:TAG`, as stacker reads it: the layout's
/// directory and a tag. Split at the last `:` (a tag has no `:`, a path may); `None`
/// when either part is missing (stacker: "bad OCI tag").
pub fn oci_url_parts(url: &str) -> Option<(&str, &str)> {
    url.rsplit_once(':')
        .filter(|(path, tag)| !path.is_empty() && !tag.is_empty())
}

/// The layout directory (relative paths resolve against `dir`, the stackerfile's
/// directory) and tag of a `type: oci` URL; `None` as for [`oci_url_parts`] (the parser
/// rejects such URLs).
pub fn split_oci_url(dir: &Path, url: &str) -> Option<(PathBuf, String)> {
    oci_url_parts(url).map(|(path, tag)| (dir.join(path), tag.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_urls_are_path_colon_tag() {
        let d = Path::new("/ctx");
        // `oci:base` is the layout `oci` (next to the stackerfile), tag `base`: the
        // `oci:` is no transport prefix.
        assert_eq!(
            split_oci_url(d, "oci:base"),
            Some((PathBuf::from("/ctx/oci"), "base".to_string()))
        );
        assert_eq!(
            split_oci_url(d, "/abs/lay:out:v1"),
            Some((PathBuf::from("/abs/lay:out"), "v1".to_string()))
        );
        assert_eq!(
            split_oci_url(d, "plain:tag"),
            Some((PathBuf::from("/ctx/plain"), "tag".to_string()))
        );
        for bad in ["layout", "layout:", ":tag", ""] {
            assert_eq!(split_oci_url(d, bad), None, "{bad}");
        }
    }
}
