//! `kiln speedrun` and `kiln train` as a user runs them, on a tiny corpus: the speedrun writes its
//! report, curve and a model that `kiln generate` runs; a training process killed with SIGKILL
//! at arbitrary moments or stopped with Ctrl-C resumes to exactly the losses of an uninterrupted
//! run; bad input gets a one-line error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn ok(args: &[&str]) -> Output {
    let o = kiln(args);
    assert!(
        o.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn err(args: &[&str]) -> String {
    let o = kiln(args);
    assert!(!o.status.success(), "kiln {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("internal error"), "kiln {args:?} panicked: {e}");
    e
}

const WORDS: &[&str] = &[
    "the", "king", "queen", "of", "and", "a", "sword", "crown", "speaks", "to", "his", "her",
    "lord", "lady", "castle", "night", "day", "love", "war", "peace", "shall", "thou", "art",
];

/// A folder of 30 small documents.
fn corpus(root: &Path) -> PathBuf {
    let dir = root.join("corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut state = 11u64;
    for d in 0..30 {
        let mut s = format!("ACT {d}.\n");
        for _ in 0..80 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
            s.push(if (state >> 20).is_multiple_of(8) {
                '\n'
            } else {
                ' '
            });
        }
        std::fs::write(dir.join(format!("{d:02}.txt")), s).unwrap();
    }
    dir
}

const TINY: &[&str] = &[
    "--depth",
    "1",
    "--seq-len",
    "16",
    "--batch",
    "2",
    "--eval-windows",
    "4",
];

#[test]
fn speedrun_writes_report_curve_and_a_usable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let out = tmp.path().join("sr");
    let mut args = vec![
        "speedrun",
        "--out",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--steps",
        "6",
        "--eval-every",
        "3",
    ];
    args.extend_from_slice(TINY);
    ok(&args);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("bits per byte"), "{report}");
    assert!(
        report.contains("| 6 |"),
        "the final eval row is missing: {report}"
    );
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let metrics = std::fs::read_to_string(out.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["step", "loss", "lr", "tokens_per_s"] {
            assert!(v.get(key).is_some(), "{key} missing in {line}");
        }
    }
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["val_bpb"].as_f64().unwrap() > 0.0);
    // `--precision auto`, the speedrun's default, took bf16 exactly where the CPU has it, and the
    // run and the report say which.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run/run.json")).unwrap()).unwrap();
    let bf16 = kiln_nn::fused::bf16_available();
    assert_eq!(run["precision"], if bf16 { "bf16" } else { "f32" });
    let row = if bf16 {
        "| precision | bf16"
    } else {
        "| precision | f32"
    };
    assert!(report.contains(row), "{report}");
    // The trained model generates through the inference path.
    let model = out.join("run/model");
    let g = ok(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "the king",
        "--max-tokens",
        "5",
    ]);
    assert!(!g.stdout.is_empty());
}

fn prepare(tmp: &Path) -> PathBuf {
    let data = corpus(tmp);
    let tok = tmp.join("tok.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        data.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--special",
        "<|endoftext|>",
        "--output",
        tok.to_str().unwrap(),
    ]);
    let ds = tmp.join("ds");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
        "--val-fraction",
        "0.2",
    ]);
    ds
}

fn train_args<'a>(ds: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--data",
        ds,
        "--out",
        out,
        "--steps",
        steps,
        "--eval-every",
        "5",
        "--checkpoint-every",
        "2",
        "--quiet",
    ];
    a.extend_from_slice(TINY);
    a
}

fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // The loss as printed (shortest round-trip form) identifies its bits.
            (
                v["step"].as_u64().unwrap(),
                format!("{}|{}", v["loss"], v["val_loss"]),
            )
        })
        .collect()
}

/// Starts training and kills it with SIGKILL once `LATEST` has moved past `after` checkpoints
/// (or the run ends), returning whether it was killed before finishing.
fn run_and_kill(args: &[&str], run: &Path, wait_for_ckpts: usize, extra: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen = 0;
    let mut last = String::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "training failed");
            return false;
        }
        if let Ok(l) = std::fs::read_to_string(run.join("checkpoints/LATEST")) {
            if l != last {
                last = l;
                seen += 1;
            }
        }
        if seen >= wait_for_ckpts {
            std::thread::sleep(extra);
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigkill_at_any_moment_then_resume_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = prepare(tmp.path());
    let ds = ds.to_str().unwrap();
    let whole = tmp.path().join("whole");
    ok(&train_args(ds, whole.to_str().unwrap(), "80"));
    let reference = losses(&whole);
    assert_eq!(reference.len(), 80);

    let pieces = tmp.path().join("pieces");
    let p = pieces.to_str().unwrap();
    let mut args = train_args(ds, p, "80");
    // First start, then kills at different points in the checkpoint cycle, then resumes.
    let mut resume = false;
    let mut kills = 0;
    for (i, extra_ms) in [0u64, 3, 17, 41].iter().enumerate() {
        let mut a = args.clone();
        if resume {
            a.push("--resume");
        }
        let killed = run_and_kill(&a, &pieces, 1 + i % 2, Duration::from_millis(*extra_ms));
        resume = true;
        if !killed {
            break;
        }
        kills += 1;
    }
    assert!(
        kills >= 1,
        "the run finished before it could be killed once"
    );
    args.push("--resume");
    let o = kiln(&args);
    let e = String::from_utf8_lossy(&o.stderr);
    // The run may already have finished during the kills; resuming a finished run is then a no-op.
    assert!(o.status.success(), "final resume failed: {e}");
    assert_eq!(
        losses(&pieces),
        reference,
        "resumed losses differ from the uninterrupted run"
    );
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = prepare(tmp.path());
    let ds = ds.to_str().unwrap();
    let whole = tmp.path().join("whole");
    ok(&train_args(ds, whole.to_str().unwrap(), "16"));
    let run = tmp.path().join("int");
    let r = run.to_str().unwrap();
    let mut args = train_args(ds, r, "16");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run.join("metrics.jsonl").exists()
        || std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 3
    {
        assert!(t0.elapsed() < Duration::from_secs(120));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = String::from_utf8_lossy(&out.stderr);
    if e.contains("stopped after step") {
        args.push("--resume");
        ok(&args);
    }
    assert_eq!(losses(&run), losses(&whole));
}

/// `kiln train --precision bf16` trains where the CPU has AVX-512 BF16 and is refused by name
/// elsewhere; resuming it as f32 (the default) is refused naming the setting.
#[test]
fn bf16_training_runs_or_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = prepare(tmp.path());
    let run = tmp.path().join("run");
    let mut f32_args = vec![
        "train",
        "--data",
        ds.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "4",
        "--quiet",
    ];
    f32_args.extend_from_slice(TINY);
    let args = [&f32_args[..], &["--precision", "bf16"]].concat();
    if !kiln_nn::fused::bf16_available() {
        let e = err(&[&args[..], &["--until-step", "2"]].concat());
        assert!(e.contains("AVX-512 BF16"), "{e}");
        return;
    }
    ok(&[&args[..], &["--until-step", "2"]].concat());
    let e = err(&[&f32_args[..], &["--resume"]].concat());
    assert!(
        e.contains("different settings") && e.contains("precision"),
        "{e}"
    );
    ok(&[&args[..], &["--resume"]].concat());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
}

#[test]
fn bad_training_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = prepare(tmp.path());
    let ds_s = ds.to_str().unwrap();
    let out = tmp.path().join("r");
    let o = out.to_str().unwrap();
    // Not a dataset.
    let e = err(&["train", "--data", tmp.path().to_str().unwrap(), "--out", o]);
    assert!(e.contains("meta.json"), "{e}");
    // A resume with nothing to resume.
    let e = err(&["train", "--data", ds_s, "--out", o, "--resume"]);
    assert!(e.contains("no checkpoint"), "{e}");
    // Windows longer than the validation split.
    let e = err(&[
        "train",
        "--data",
        ds_s,
        "--out",
        o,
        "--seq-len",
        "100000",
        "--depth",
        "1",
    ]);
    assert!(e.contains("seq_len"), "{e}");
    let e = err(&["train", "--data", ds_s, "--out", o, "--depth", "0"]);
    assert!(e.contains("depth"), "{e}");
    // The tokenizer replaced after the data was prepared.
    let tok = ds.join("tokenizer.json");
    let mut t = std::fs::read(&tok).unwrap();
    t.extend_from_slice(b"\n");
    std::fs::write(&tok, t).unwrap();
    let e = err(&["train", "--data", ds_s, "--out", o, "--depth", "1"]);
    assert!(e.contains("sha256"), "{e}");
    // Nonsense settings.
    let e = err(&["speedrun", "--minutes=0"]);
    assert!(e.contains("--minutes"), "{e}");
}
