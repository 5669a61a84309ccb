//! `kiln data prepare` as a user runs it: a tokenizer trained by `kiln tokenizer train`, a small
//! corpus in nested folders, the files it writes, and clear errors.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .output()
        .expect("run kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

const DOCS: &[(&str, &str)] = &[
    ("a.txt", "To be, or not to be, that is the question.\n"),
    ("b.txt", "Whether 'tis nobler in the mind to suffer\n"),
    ("c.txt", "The slings and arrows of outrageous fortune,\n"),
    ("sub/d.txt", "Or to take arms against a sea of troubles\n"),
    (
        "sub/deeper/e.txt",
        "And by opposing end them. To die, to sleep;\n",
    ),
];

#[test]
fn prepare_writes_a_complete_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let corpus = root.join("corpus");
    for (name, text) in DOCS {
        let p = corpus.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    // Hidden files (an asset folder's manifest, editor files) are not corpus text.
    std::fs::write(corpus.join(".hidden"), "not a document").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let tok = root.join("tok.json");
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            &s(&corpus),
            "--vocab-size",
            "300",
            "--output",
            &s(&tok),
            "--special",
            "<|endoftext|>",
        ],
        root,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let data = root.join("data");
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "prepare",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--input",
            corpus.to_str().unwrap(),
            "--out",
            data.to_str().unwrap(),
            "--val-fraction",
            "0.2",
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        kiln(&args, root)
    };
    let out = prepare(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("prepared 5 documents (4 train, 1 val)"),
        "{}",
        stderr(&out)
    );

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format_version"], 1);
    assert_eq!(meta["train"]["n_docs"], 4);
    assert_eq!(meta["val"]["n_docs"], 1);
    assert_eq!(meta["seed"], 3);
    assert_eq!(meta["val_fraction"], 0.2);
    assert_eq!(meta["doc_split"], "file");
    assert_eq!(meta["tokenizer_file"], "tokenizer.json");
    assert_eq!(meta["tokenizer_sha256"].as_str().unwrap().len(), 64);
    let total_bytes: usize = DOCS.iter().map(|(_, t)| t.len()).sum();
    let n_bytes =
        meta["train"]["n_bytes"].as_u64().unwrap() + meta["val"]["n_bytes"].as_u64().unwrap();
    assert_eq!(n_bytes as usize, total_bytes);
    // Inputs: recursive, sorted by path, hidden files left out.
    let inputs: Vec<String> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = DOCS.iter().map(|(n, _)| s(&corpus.join(n))).collect();
    assert_eq!(inputs, want);
    assert_eq!(
        std::fs::read(data.join("tokenizer.json")).unwrap(),
        std::fs::read(&tok).unwrap()
    );

    // The eot id is the tokenizer's <|endoftext|>.
    let out = kiln(
        &[
            "tokenizer",
            "encode",
            "-t",
            &s(&tok),
            "--allow-special",
            "--text",
            "<|endoftext|>",
        ],
        root,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let eot: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(meta["eot_id"].as_u64(), Some(eot));

    // val.bin decodes (with the saved tokenizer) to one document and the separator.
    let shard = std::fs::read(data.join("val.bin")).unwrap();
    assert_eq!(&shard[..8], b"KILNTOKS");
    let n = u64::from_le_bytes(shard[16..24].try_into().unwrap()) as usize;
    let ids: Vec<String> = (0..n)
        .map(|i| u16::from_le_bytes([shard[32 + 2 * i], shard[33 + 2 * i]]).to_string())
        .collect();
    let mut args = vec!["tokenizer", "decode", "-t", data.to_str().unwrap()];
    args.extend(ids.iter().map(String::as_str));
    let out = kiln(&args, root);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let doc = text
        .strip_suffix("<|endoftext|>")
        .expect("ends with the separator");
    assert!(DOCS.iter().any(|(_, t)| *t == doc), "{text:?}");

    // A second run does not overwrite without --force, and does with it.
    assert_clean_error(&prepare(&[]), "pass --force to overwrite it");
    let out = prepare(&["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn prepare_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let corpus = root.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), "plain text, plain text, plain text\n").unwrap();
    std::fs::write(corpus.join("b.txt"), "more plain text and more\n").unwrap();
    let tok = root.join("tok.json");
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            &s(&corpus),
            "--vocab-size",
            "280",
            "--output",
            &s(&tok),
        ],
        root,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let data = s(&root.join("data"));
    // A tokenizer trained without a separator token.
    let out = kiln(
        &[
            "data",
            "prepare",
            "-t",
            &s(&tok),
            "-i",
            &s(&corpus),
            "-o",
            &data,
        ],
        root,
    );
    assert_clean_error(&out, "--special '<|endoftext|>'");

    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            &s(&corpus),
            "--vocab-size",
            "280",
            "--output",
            &s(&tok),
            "--special",
            "<|endoftext|>",
        ],
        root,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Invalid UTF-8: the file and the byte offset.
    let bad = corpus.join("c.txt");
    std::fs::write(&bad, b"ok\n\xfe").unwrap();
    let out = kiln(
        &[
            "data",
            "prepare",
            "-t",
            &s(&tok),
            "-i",
            &s(&corpus),
            "-o",
            &data,
        ],
        root,
    );
    assert_clean_error(
        &out,
        &format!("{}: not valid UTF-8 at byte offset 3", bad.display()),
    );
    // One document cannot make two splits.
    let out = kiln(
        &[
            "data",
            "prepare",
            "-t",
            &s(&tok),
            "-i",
            &s(&corpus.join("a.txt")),
            "-o",
            &data,
        ],
        root,
    );
    assert_clean_error(&out, "the corpus has 1 document");
    assert!(!root.join("data/meta.json").exists());
}
