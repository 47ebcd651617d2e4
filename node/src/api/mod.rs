//! What applications use: the OpenAI-compatible HTTP API (`openai`),
//! served by the daemon on the control API's address.

pub mod openai;
pub mod text;
