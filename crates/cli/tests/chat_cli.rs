//! `kiln generate --chat`, `kiln generate --stop` and `kiln chat` (stdin piped) on SmolLM2 (the
//! `smollm2` asset). The chat prompt is checked against transformers' `apply_chat_template` ids in
//! `crates/engine/tests/fixtures/chat_smollm2.json`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn smollm2() -> String {
    kiln_assets::ensure("smollm2")
        .unwrap()
        .display()
        .to_string()
}

fn kiln(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn json_out(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn generate_chat_uses_the_template_and_stops_at_end_of_turn() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../engine/tests/fixtures/chat_smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let m = smollm2();
    let user = fx["generate_chat"]["user"].as_str().unwrap();
    let v = json_out(&kiln(
        &[
            "generate",
            "-m",
            &m,
            "-p",
            user,
            "--chat",
            "--json",
            "--max-tokens",
            "64",
        ],
        b"",
    ));
    assert_eq!(v["prompt_tokens"], fx["generate_chat"]["prompt_ids"]);
    // SmolLM2's end of turn, <|im_end|>, is its EOS (id 2): the reply ends there or at the budget.
    let stop = v["stop"].as_str().unwrap();
    assert!(stop == "stop_token:2" || stop == "max_tokens", "{stop}");
    assert!(!v["text"].as_str().unwrap().contains("<|im_end|>"));
}

#[test]
fn stop_strings_end_generation_without_printing_them() {
    let m = smollm2();
    let args = [
        "generate",
        "-m",
        &m,
        "-p",
        "Once upon a time",
        "--max-tokens",
        "24",
    ];
    let free = json_out(&kiln(&[&args[..], &["--json"]].concat(), b""));
    let text = free["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text, likely spanning tokens.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 30, "{text}");
    let stop: String = chars[15..22].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    let v = json_out(&kiln(
        &[
            &args[..],
            &["--json", "--stop=never-appears", &format!("--stop={stop}")],
        ]
        .concat(),
        b"",
    ));
    assert_eq!(v["text"].as_str().unwrap(), before);
    assert_eq!(v["stop"], "stop_string");
    // Streaming prints the same, and nothing of the stop string.
    let o = kiln(&[&args[..], &[&format!("--stop={stop}")]].concat(), b"");
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{before}\n"));
}

/// Two turns piped on stdin: two replies, and the second turn prefills only the new tokens.
#[test]
fn chat_keeps_the_conversation_in_the_kv_cache() {
    let m = smollm2();
    let o = kiln(
        &["chat", "-m", &m, "-v", "--max-tokens", "24"],
        b"What is the capital of France?\nAnd of Italy?\n",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let replies: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies.len() >= 2, "two replies expected: {out:?}");
    // "turn N: prompt P tokens, K reused from the KV cache, F prefilled; ..."
    let turn = |n: usize| -> (usize, usize, usize) {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("turn {n}: prompt")))
            .unwrap_or_else(|| panic!("no turn {n} line in {err}"));
        let tail = &line[line.find("prompt").unwrap()..];
        let nums: Vec<usize> = tail
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1], nums[2])
    };
    let (p1, k1, f1) = turn(1);
    assert_eq!((k1, f1), (0, p1));
    let (p2, k2, f2) = turn(2);
    assert!(k2 >= p1, "turn 2 reuses turn 1's prompt: {k2} < {p1}");
    assert_eq!(k2 + f2, p2);
    // The new turn is "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n" plus
    // at most the re-tokenized tail of the reply.
    assert!(f2 < 40, "turn 2 prefilled {f2} tokens");
}

#[test]
fn chat_reset_and_eof() {
    let m = smollm2();
    let o = kiln(
        &[
            "chat",
            "-m",
            &m,
            "-v",
            "--max-tokens",
            "4",
            "--system",
            "Be brief.",
        ],
        b"Hi\n/reset\nHi\n",
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let line = |n: usize| {
        err.lines()
            .find(|l| l.contains(&format!("turn {n}: prompt")))
            .map(|l| l[l.find("prompt").unwrap()..].to_string())
            .unwrap()
    };
    // After /reset the same first turn is rendered again: nothing is reused.
    assert!(line(2).contains(" 0 reused"), "{}", line(2));
    assert_eq!(
        line(1).split(';').next(),
        line(2).split(';').next(),
        "same prompt both times"
    );
}

#[test]
fn help_names_the_new_flags() {
    let o = kiln(&["chat", "--help"], b"");
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && help.contains("Usage: kiln chat"),
        "{help}"
    );
    for flag in ["--system", "--stop", "--temperature", "--max-tokens"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let o = kiln(&["generate", "--help"], b"");
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("--stop <STR>") && help.contains("--chat"),
        "{help}"
    );
}
