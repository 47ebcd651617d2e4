//! What applications and people use: the OpenAI-compatible HTTP API
//! (`openai`) and the web dashboard (`dashboard`), served by the daemon on
//! the control API's address.

pub mod dashboard;
pub mod openai;
pub mod text;

/// Compares a presented key with the token in time that does not depend
/// on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
