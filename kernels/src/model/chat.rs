//! Chat templates: the model's Jinja template rendered with minijinja.

use serde::Serialize;

use crate::{Error, Result};

/// BitNet b1.58 2B4T's chat template, as its `tokenizer_config.json` has it:
/// `<|begin_of_text|>System: ...<|eot_id|>User: ...<|eot_id|>Assistant: `.
pub const BITNET_2B4T_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders `messages` with a Jinja chat template.
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_2b4t_format() {
        let m = [Message::new("system", "Be brief. "), Message::new("user", "Hi!")];
        let s = render(BITNET_2B4T_TEMPLATE, &m, true, "<|begin_of_text|>", "<|end_of_text|>").unwrap();
        assert_eq!(
            s,
            "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi!<|eot_id|>Assistant: "
        );
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(render("{% if %}", &[], false, "", "").is_err());
        let raising = "{{ raise_exception('no system role') }}";
        assert!(
            render(raising, &[], false, "", "")
                .unwrap_err()
                .to_string()
                .contains("no system role")
        );
    }
}
