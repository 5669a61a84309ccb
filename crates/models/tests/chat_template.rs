//! Reading the chat template a model carries: SmolLM2's GGUF metadata (the `smollm2` asset) and a
//! Hugging Face folder's `tokenizer_config.json` or `chat_template.jinja`.

use kiln_models::chat_template;
use std::path::{Path, PathBuf};

#[test]
fn smollm2_gguf_carries_its_template() {
    let gguf = kiln_assets::ensure("smollm2").unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../engine/tests/fixtures/chat_smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let t = chat_template(&gguf).unwrap().expect("a template");
    assert_eq!(t, fx["template"].as_str().unwrap());
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-chat-template-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn hf_folder_templates() {
    // No template at all, and the random fixtures' folder has no tokenizer files.
    let random = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/random/llama");
    assert_eq!(chat_template(&random).unwrap(), None);
    let d = scratch("string");
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"chat_template": "{{ x }}"}"#,
    )
    .unwrap();
    assert_eq!(chat_template(&d).unwrap().as_deref(), Some("{{ x }}"));
    assert_eq!(
        chat_template(&d.join("config.json")).unwrap().as_deref(),
        Some("{{ x }}")
    );
    // A list of named templates: `default` wins.
    let d = scratch("list");
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    assert_eq!(chat_template(&d).unwrap().as_deref(), Some("D"));
    // chat_template.jinja takes precedence (newer transformers write it).
    std::fs::write(d.join("chat_template.jinja"), "J").unwrap();
    assert_eq!(chat_template(&d).unwrap().as_deref(), Some("J"));
    // A broken tokenizer_config.json is an error naming the file.
    let d = scratch("bad");
    std::fs::write(d.join("tokenizer_config.json"), "{").unwrap();
    let err = chat_template(&d).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}
