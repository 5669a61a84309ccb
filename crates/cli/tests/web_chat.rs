//! The web chat page of `kiln serve`, clicked through in headless Chromium: `kiln serve --model
//! smollm2 --port 0` runs, and `tests/web/click_through.mjs` (playwright-core, pinned by
//! `tests/web/package-lock.json`, driving Debian's `/usr/bin/chromium`; no browser is downloaded)
//! loads `/`, waits for the model list, sends a message and watches the reply stream in, stops a
//! long reply mid-stream, checks that the server dropped it and that the conversation goes on, and
//! that a refused request shows the server's error. It saves screenshots to `target/web_chat.png`
//! (the end) and `target/web_chat_streaming.png` (mid-stream).
//!
//! Needs `chromium` (or `KILN_CHROMIUM=/path`), `node` and `npm` (playwright-core is installed with
//! `npm ci` under `target/tmp/`). Without them the test prints `SKIPPED` and passes, unless
//! `KILN_REQUIRE_BROWSER=1` (as in CI), when it fails.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WEB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/web");

fn required() -> bool {
    std::env::var("KILN_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

/// Skips loudly, or fails when a browser run is required.
fn skip(why: &str) {
    if required() {
        panic!("web_chat: {why}, and KILN_REQUIRE_BROWSER=1 requires the browser test to run");
    }
    eprintln!(
        "\n**************** SKIPPED: web_chat (the browser click-through): {why} ****************"
    );
    eprintln!("**************** install Debian's `chromium` and `npm`, or set KILN_REQUIRE_BROWSER=1 to make this fail ****************\n");
}

fn runs(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to its end or until `limit`; returns its status (None: killed at the limit) and its
/// stdout and stderr.
fn run_for(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// `npm ci` of the pinned playwright-core into `dir` (once per lock file), plus the driver script.
fn install_driver(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).unwrap();
    let lock = std::fs::read(Path::new(WEB).join("package-lock.json")).unwrap();
    let installed = dir
        .join("node_modules/playwright-core/package.json")
        .exists()
        && std::fs::read(dir.join("package-lock.json")).is_ok_and(|l| l == lock);
    for f in ["package.json", "package-lock.json", "click_through.mjs"] {
        std::fs::copy(Path::new(WEB).join(f), dir.join(f)).unwrap();
    }
    if !installed {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir);
        match run_for(npm, Duration::from_secs(300)) {
            (Some(s), ..) if s.success() => {}
            (s, out, err) => {
                return Err(format!(
                    "`npm ci` of playwright-core failed ({s:?}):\n{out}\n{err}"
                ))
            }
        }
    }
    Ok(dir.join("click_through.mjs"))
}

/// `kiln serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start() -> Server {
        // Fetched (and checksummed) on first use, so the server's start is only the model load.
        kiln_assets::ensure("smollm2").expect("the smollm2 asset");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--model", "smollm2", "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln serve");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let out_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().trim_end_matches('/').to_string());
                }
                out_log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let stderr = child.stderr.take().unwrap();
        let err_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut server = Server {
            child,
            base: String::new(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => server.base = base,
            Err(_) => panic!("kiln serve did not print its address:\n{}", server.log()),
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn web_chat_click_through_in_headless_chromium() {
    let chromium =
        std::env::var("KILN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    if !Path::new(&chromium).is_file() {
        return skip(&format!(
            "no Chromium at {chromium} (apt-get install chromium)"
        ));
    }
    for tool in ["node", "npm"] {
        if !runs(tool) {
            return skip(&format!("`{tool}` is not installed"));
        }
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let script = match install_driver(&tmp.join("web_chat_driver")) {
        Ok(s) => s,
        Err(e) => return skip(&e),
    };
    let screenshot = tmp.parent().unwrap().join("web_chat.png");
    let _ = std::fs::remove_file(&screenshot);
    let _ = std::fs::remove_file(screenshot.with_file_name("web_chat_streaming.png"));
    let profile = tempfile::tempdir().unwrap();

    let started = Instant::now();
    let mut server = Server::start();
    eprintln!(
        "web_chat: kiln serve at {} after {:.1?}",
        server.base,
        started.elapsed()
    );
    let mut node = Command::new("node");
    node.arg(&script)
        .arg(&server.base)
        .arg(&screenshot)
        .arg(&chromium)
        .arg(profile.path());
    let (status, out, err) = run_for(node, Duration::from_secs(150));
    eprintln!("{out}");
    if !err.trim().is_empty() {
        eprintln!("{err}");
    }
    if !status.is_some_and(|s| s.success()) {
        let alive = match server.child.try_wait().unwrap() {
            None => "still running".to_string(),
            Some(s) => format!("exited: {s}"),
        };
        panic!(
            "the click-through failed ({}):\n{err}\n--- kiln serve ({alive}) ---\n{}",
            status.map_or("timed out".to_string(), |s| s.to_string()),
            server.log()
        );
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "kiln serve exited during the click-through:\n{}",
        server.log()
    );
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
    eprintln!(
        "web_chat: passed in {:.1?}; screenshot {}",
        started.elapsed(),
        screenshot.display()
    );
}
