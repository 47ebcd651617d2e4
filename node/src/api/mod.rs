//! What applications and people use: the OpenAI-compatible HTTP API
//! (`openai`) and the web dashboard (`dashboard`), served by the daemon on
//! the control API's address.

pub mod dashboard;
pub mod openai;
pub mod text;

/// Whether the request's `Authorization: Bearer` key is `token`.
pub fn bearer_is(headers: &axum::http::HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
}

/// Compares a presented key with the token in time that does not depend
/// on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
