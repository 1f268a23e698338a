//! Webhook signatures, checked on the raw body before anything parses it.

use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Does `header` (`sha256=<hex>` as GitHub sends it in `X-Hub-Signature-256`, or the bare
/// hex Gitea sends in `X-Gitea-Signature`) sign `body` with `secret`? Compared in constant
/// time; a malformed header is simply a wrong signature.
pub(crate) fn hmac_sha256_matches(secret: &[u8], body: &[u8], header: &str) -> bool {
    let hex_sig = header.trim();
    let hex_sig = hex_sig.strip_prefix("sha256=").unwrap_or(hex_sig);
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).is_ok()
}

/// GitLab's `X-Gitlab-Token`: the secret itself, compared in constant time.
pub(crate) fn token_matches(secret: &[u8], header: &str) -> bool {
    let given = header.as_bytes();
    // `ct_eq` on slices of different lengths is false (the length is not secret).
    bool::from(secret.ct_eq(given))
}

/// The hex HMAC-SHA256 of `body` with `secret` (what a provider sends; used by tests and
/// by nothing on the serving path).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented example ("Validating webhook deliveries").
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    const SIG: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_test_vector() {
        assert_eq!(sign(SECRET, BODY), SIG);
        assert!(hmac_sha256_matches(SECRET, BODY, &format!("sha256={SIG}")));
        // Gitea sends the bare hex.
        assert!(hmac_sha256_matches(SECRET, BODY, SIG));
    }

    #[test]
    fn a_wrong_secret_body_or_malformed_header_does_not_match() {
        assert!(!hmac_sha256_matches(b"another secret", BODY, SIG));
        assert!(!hmac_sha256_matches(SECRET, b"Hello, World?", SIG));
        assert!(!hmac_sha256_matches(SECRET, BODY, ""));
        assert!(!hmac_sha256_matches(SECRET, BODY, "sha256=zz"));
        assert!(!hmac_sha256_matches(SECRET, BODY, &SIG[..62]));
        let mut flipped = SIG.to_string();
        flipped.replace_range(0..1, "8");
        assert!(!hmac_sha256_matches(SECRET, BODY, &flipped));
    }

    #[test]
    fn gitlab_tokens_compare_whole() {
        assert!(token_matches(b"s3cret", "s3cret"));
        assert!(!token_matches(b"s3cret", "s3cre"));
        assert!(!token_matches(b"s3cret", "s3cret "));
        assert!(!token_matches(b"s3cret", ""));
    }
}
